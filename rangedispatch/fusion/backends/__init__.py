"""Registry of the fused op's kernels. A backend runs the whole fused op or says why it cannot
(``unsupported``); the op then falls back to ``reference`` and warns once per reason."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from rangedispatch.logs import warn_once

# name -> module defining BACKEND; modules import lazily (flashinfer only when asked for)
_MODULES = {
    "reference": "rangedispatch.fusion.backends.reference",
    "flashinfer": "rangedispatch.fusion.backends.flashinfer",
}
_loaded: dict[str, "FusedBackend"] = {}


@dataclass
class FusedCall:
    """The arguments of one fused op call (see ``rangedispatch.fusion.allreduce_rmsnorm_op``)."""

    input: torch.Tensor
    residual: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    scale: Optional[torch.Tensor]
    eps: float
    weight_mode: str
    group_name: str
    oneshot_max_bytes: int
    max_tokens: int


class FusedBackend(Protocol):
    name: str

    def site_unsupported(self, device: torch.device, dtype: torch.dtype, hidden: int, world: int) -> Optional[str]:
        """Why a traced all-reduce site cannot use this backend at all (it is left unfused), or None."""

    def unsupported(self, call: FusedCall) -> Optional[str]:
        """None if this backend runs the call, else why not (the call falls back to reference)."""

    def run(self, call: FusedCall) -> tuple[torch.Tensor, torch.Tensor]:
        ...


def get(name: str) -> FusedBackend:
    backend = _loaded.get(name)
    if backend is None:
        if name not in _MODULES:
            raise ValueError(f"unknown fused backend {name!r}; available: {', '.join(_MODULES)}")
        try:
            backend = importlib.import_module(_MODULES[name]).BACKEND
        except ImportError as e:
            backend = _Unavailable(name, f"cannot import: {e}")
        _loaded[name] = backend
    return backend


def run_fused(name: str, call: FusedCall) -> tuple[torch.Tensor, torch.Tensor]:
    backend = get(name)
    if name != "reference":
        reason = backend.unsupported(call)
        if reason is not None:
            warn_once(f"fused backend {name} falls back to reference: {reason}")
            backend = get("reference")
    return backend.run(call)


class _Unavailable:
    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def site_unsupported(self, *args) -> Optional[str]:
        return None  # decided per call: the fused op falls back to reference with one warning

    def unsupported(self, *args) -> Optional[str]:
        return self.reason

    def run(self, *args):
        raise RuntimeError(self.reason)
