"""``hardware=auto``: pick the hardware profile for the machine we run on.

A user profile written by ``rangedispatch-tune`` on this device (its ``device_name``) with
thresholds for this world size wins. Otherwise the GPU's name decides (H100, H200, B200...), CPU
when there is no CUDA device; a GPU without a profile gets the conservative ``gpu_generic`` with a
warning that names the tune command. An explicit ``hardware=NAME`` always wins: detection only runs
for ``auto``.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

log = logging.getLogger("rangedispatch")

# substring of the CUDA device name -> profile
GPU_PROFILES = (("H100", "h100"), ("H200", "h200"), ("B200", "b200"))
FALLBACK_GPU_PROFILE = "gpu_generic"
TUNE_HINT = "torchrun --nproc-per-node <tp> -m rangedispatch.cli.tune tune.name=<name>"


def profile_for_device(device_name: Optional[str], capability: Optional[tuple[int, int]],
                       available: Sequence[str]) -> tuple[str, str]:
    """``(profile, why)`` for a CUDA device (``device_name=None``: no CUDA)."""
    if device_name is None:
        return "cpu", "no CUDA device"
    upper = device_name.upper()
    for key, profile in GPU_PROFILES:
        if key in upper and profile in available:
            return profile, f"CUDA device {device_name!r} (sm_{capability[0]}{capability[1]})"
    return FALLBACK_GPU_PROFILE, (
        f"no profile for CUDA device {device_name!r} (sm_{capability[0]}{capability[1]}): conservative "
        f"'{FALLBACK_GPU_PROFILE}'; measure this machine with `{TUNE_HINT}` and use hardware=<name>"
    )


def tuned_profile_for(device_name: str, world_size: Optional[int], tuned: dict[str, dict]) -> Optional[str]:
    """The user profile measured on ``device_name`` with thresholds for ``world_size`` (any world size
    when unknown), or None. ``tuned``: profile name -> its mapping."""
    for name, profile in sorted(tuned.items()):
        sizes = {str(k) for k in (profile.get("thresholds") or {})}
        if profile.get("device_name") == device_name and (world_size is None or str(world_size) in sizes):
            return name
    return None


def _world_size() -> Optional[int]:
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if os.environ.get("WORLD_SIZE", "").isdigit() else None


def detect_profile(available: Sequence[str], tuned: Optional[dict[str, dict]] = None,
                   world_size: Optional[int] = None) -> str:
    """The profile for this machine; ``world_size``: the ranks that will run (default: this process's)."""
    import torch

    if torch.cuda.is_available():
        name, cap = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    else:
        name, cap = None, None
    mine = tuned_profile_for(name or "cpu", world_size or _world_size(), tuned or {})
    if mine is not None:
        log.info("hardware=auto picked the tuned profile %r (measured on %s)", mine, name or "cpu")
        return mine
    profile, why = profile_for_device(name, cap, available)
    (log.warning if profile == FALLBACK_GPU_PROFILE else log.info)("hardware=auto picked %r: %s", profile, why)
    return profile
