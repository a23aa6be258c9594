"""Writing a measured hardware profile: YAML with the measurement's provenance in comments."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rangedispatch.config.schema import HardwareConfig, TierThresholds
from rangedispatch.tune.crossover import Thresholds


def measured_entry(measured: Thresholds) -> TierThresholds:
    """The profile's entry for the measured world size: the one object that both the YAML and the
    summary are written from."""
    return TierThresholds(
        measured.fused_max_bytes, measured.oneshot_max_bytes, {str(h): b for h, b in sorted(measured.by_hidden.items())},
        measured.symm_mem_min_bytes, measured.symm_mem_max_bytes, measured.symm_mem_oneshot_max_bytes,
        measured.sp_min_bytes, {str(h): b for h, b in sorted(measured.sp_by_hidden.items())},
        measured.async_tp_min_bytes, {str(h): b for h, b in sorted(measured.async_by_hidden.items())})


def render(name: str, fused_backend: str, world_size: int, measured: TierThresholds, base: HardwareConfig,
           provenance: list[str], device_name: str = "") -> str:
    """The profile: ``measured`` (``measured_entry``) for ``world_size``, every other world size kept
    from ``base``; ``device_name`` lets ``hardware=auto`` pick it on that device."""
    lines = [f"# Written by rangedispatch-tune. {line}" if i == 0 else f"# {line}" for i, line in enumerate(provenance)]
    lines += [f"name: {name}", f"fused_backend: {fused_backend}"]
    if device_name:
        lines.append(f"device_name: {device_name!r}")
    if base.compile_sizes:
        lines.append(f"compile_sizes: {base.compile_sizes}  # kept from profile {base.name!r} (tune does not measure them)")
    if base.compile_sizes_with_cudagraphs is not None:
        lines.append(f"compile_sizes_with_cudagraphs: {base.compile_sizes_with_cudagraphs}  # kept from profile "
                     f"{base.name!r} (tune does not measure them)")
    if base.skinny_gemm_max_tokens:
        lines.append(f"skinny_gemm_max_tokens: {base.skinny_gemm_max_tokens}  # kept from profile {base.name!r} "
                     "(tune does not measure it)")
    lines.append("thresholds:")
    entries = {ws: t for ws, t in base.thresholds.items() if ws != str(world_size)}
    order = sorted(entries, key=lambda k: (k == "default", int(k) if k.isdigit() else 0))
    lines += [f'  "{world_size}":  # measured', *entry_lines(measured)]
    for ws in order:
        key = ws if ws == "default" else f'"{ws}"'
        lines += [f"  {key}:  # kept from profile {base.name!r}", *entry_lines(entries[ws])]
    return "\n".join(lines) + "\n"


def entry_lines(t: TierThresholds) -> list[str]:
    """Every key of ``t`` the profile needs: the two fused ones always, the others where they differ
    from their default (so a key added to ``TierThresholds`` is never dropped from a kept entry)."""
    lines = []
    for f in dataclasses.fields(TierThresholds):
        value = getattr(t, f.name)
        if f.name not in ("fused_max_bytes", "oneshot_max_bytes") and value == getattr(TierThresholds(), f.name):
            continue
        if isinstance(value, dict):
            lines.append(f"    {f.name}:")
            lines += [f'      "{k}": {v}' for k, v in value.items()]
        else:
            lines.append(f"    {f.name}: {value}")
    return lines


def write(out_dir: Path, name: str, text: str) -> Path:
    path = out_dir / "hardware" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
