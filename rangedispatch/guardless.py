"""Calling Dynamo's transformed forward directly, without its guards.

Once the model is traced, Dynamo's per-call work (frame interception and guard evaluation) costs
about 10 us on a CPU core: more than our whole dispatch. Like vLLM, we keep the bytecode Dynamo
wrote for ``forward`` (it flattens the inputs, calls our graph, rebuilds the outputs) and call it as
a plain function. Guards exist to catch a changed model or inputs; the wrapper replaces the ones
that matter on a serving path with cheap checks (dtype, device and rank of the token input, grad
mode, training flag), and takes Dynamo's guarded path whenever they differ or the trace had
graph breaks (resume functions only compile under Dynamo).
"""

from __future__ import annotations

import contextlib
import threading
import types
from typing import Any, Callable, Iterator, Optional

import torch

_lock = threading.Lock()
_recording = threading.local()  # .target: code object being watched in this thread, .codes: what Dynamo made
_hook_installed = False


def _hook(old_code: types.CodeType, new_code: types.CodeType) -> None:
    if getattr(_recording, "target", None) is old_code:
        _recording.codes.append(new_code)


@contextlib.contextmanager
def recording(fn: Callable) -> Iterator[list]:
    """Collect the bytecode Dynamo produces for ``fn`` while this thread runs the block (the
    tracing call). Per thread and per block, so that several wrappers of one class don't mix."""
    global _hook_installed
    with _lock:
        if not _hook_installed:
            torch._dynamo.convert_frame.register_bytecode_hook(_hook)
            _hook_installed = True
    codes: list = []
    _recording.target, _recording.codes = getattr(fn, "__func__", fn).__code__, codes
    try:
        yield codes
    finally:
        _recording.target = None


_DYNAMO_UTILS_GLOBAL = "__import_torch_dot__dynamo_dot_utils"
_SHIM_GLOBAL = "__rangedispatch_dynamo_utils"


class _PlainDynamoUtils:
    """Stands in for ``torch._dynamo.utils`` in the transformed bytecode. Its helpers (``call_size``,
    the pre-graph profiler markers) are wrapped in ``torch._disable_dynamo``, which costs ~0.8 us a
    call; outside Dynamo there is nothing to disable, so plain versions do the same work."""

    @staticmethod
    def call_size(x: Any, i: int) -> int:
        return x.size(i)

    @staticmethod
    def call_stride(x: Any, i: int) -> int:
        return x.stride(i)

    @staticmethod
    def call_storage_offset(x: Any) -> int:
        return x.storage_offset()

    @staticmethod
    def record_pregraph_bytecode_enter() -> Any:
        return None

    @staticmethod
    def record_pregraph_bytecode_exit(cm: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(torch._dynamo.utils, name)


def guardless_forward(fn: Callable, codes: list) -> Optional[Callable]:
    """A plain function running Dynamo's transformed code of ``fn`` (unbound: pass ``self`` first), or
    None when there is no single transformed code free of graph breaks."""
    if len(codes) != 1:
        return None
    code = codes[0]
    if any(name.startswith("__resume_at") for name in code.co_names):
        return None
    func = getattr(fn, "__func__", fn)
    if _DYNAMO_UTILS_GLOBAL in code.co_names:
        names = tuple(_SHIM_GLOBAL if n == _DYNAMO_UTILS_GLOBAL else n for n in code.co_names)
        code = code.replace(co_names=names)
        func.__globals__.setdefault(_SHIM_GLOBAL, _PlainDynamoUtils())  # Dynamo puts its globals there too
    return types.FunctionType(code, func.__globals__, func.__name__, func.__defaults__, func.__closure__)


class TraceSignature:
    """What the guardless path checks on every call instead of Dynamo's guards."""

    __slots__ = ("dtype", "device", "ndim", "grad", "training")

    def __init__(self, x: torch.Tensor, module: torch.nn.Module):
        self.dtype = x.dtype
        self.device = x.device
        self.ndim = x.dim()
        self.grad = torch.is_grad_enabled()
        self.training = module.training

    def matches(self, x: Any, module: torch.nn.Module) -> bool:
        return (
            x.dtype is self.dtype
            and x.dim() == self.ndim
            and x.device == self.device
            and torch.is_grad_enabled() is self.grad
            and module.training is self.training
        )
