"""The fused op's kernels, one module each, named by the fused tier's ``backends`` (``tiers.py``). A
backend runs the whole fused op or says why it cannot (``unsupported``); the op then falls back to
``reference`` and warns once per reason."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from rangedispatch.fusion.tiers import FUSED, REFERENCE
from rangedispatch.logs import warn_once

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
        if name not in FUSED.backends:
            raise ValueError(f"unknown fused backend {name!r}; available: {', '.join(FUSED.backends)}")
        try:  # each backend's module on first use: FlashInfer's only where it is asked for
            backend = importlib.import_module(f"{__name__}.{name}").BACKEND
        except ImportError as e:
            backend = _Unavailable(name, f"cannot import: {e}")
        _loaded[name] = backend
    return backend


def run_fused(name: str, call: FusedCall) -> tuple[torch.Tensor, torch.Tensor]:
    backend = get(name)
    if name != REFERENCE:
        reason = backend.unsupported(call)
        if reason is not None:
            warn_once(f"fused backend {name} falls back to reference: {reason}")
            backend = get(REFERENCE)
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
