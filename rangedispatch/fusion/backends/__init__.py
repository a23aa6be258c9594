"""Registry of the fused op's kernels. A backend runs the whole fused op or says why it cannot
(``unsupported``); the op then falls back to ``reference`` and warns once per reason."""

from __future__ import annotations

import importlib
import logging
from typing import Optional, Protocol

import torch

log = logging.getLogger("rangedispatch")

# name -> module defining BACKEND; modules import lazily (flashinfer only when asked for)
_MODULES = {
    "reference": "rangedispatch.fusion.backends.reference",
    "flashinfer": "rangedispatch.fusion.backends.flashinfer",
}
_loaded: dict[str, "FusedBackend"] = {}
_warned: set[str] = set()


class FusedBackend(Protocol):
    name: str

    def unsupported(self, input: torch.Tensor, weight: Optional[torch.Tensor], group_name: str,
                    quant: bool) -> Optional[str]:
        """None if this backend runs the call, else why not."""

    def run(self, input, residual, weight, scale, eps, weight_mode, group_name) -> tuple[torch.Tensor, torch.Tensor]:
        ...


def names() -> list[str]:
    return list(_MODULES)


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


def run_fused(name, input, residual, weight, scale, eps, weight_mode, group_name):
    backend = get(name)
    if name != "reference":
        reason = backend.unsupported(input, weight, group_name, scale is not None)
        if reason is not None:
            if reason not in _warned:
                _warned.add(reason)
                log.warning("fused backend %s falls back to reference: %s", name, reason)
            backend = get("reference")
    return backend.run(input, residual, weight, scale, eps, weight_mode, group_name)


class _Unavailable:
    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def unsupported(self, *args) -> Optional[str]:
        return self.reason

    def run(self, *args):
        raise RuntimeError(self.reason)
