"""Calling Dynamo's transformed forward directly, without its guards.

Once the model is traced, Dynamo's per-call work (frame interception and guard evaluation) costs
about 10 us on a CPU core: more than our whole dispatch. Like vLLM, we keep the bytecode Dynamo
wrote for ``forward`` (it flattens the inputs, calls the graph, rebuilds the outputs) and call it as
a plain function; once a range is compiled, a variant of it calls that range's artifact directly. Guards exist to catch a changed model or inputs; the wrapper replaces the ones
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
_COMPILED_FN_PREFIX = "__compiled_fn"


class _PlainDynamoUtils:
    """Stands in for ``torch._dynamo.utils`` in the transformed bytecode. Its helpers (``call_size``,
    the pre-graph profiler markers) are wrapped in ``torch._disable_dynamo``, which costs ~0.8 us a
    call; outside Dynamo there is nothing to disable, so C callables do the same work (the profiler
    markers only record when a profiler runs: here they are no-ops)."""

    call_size = staticmethod(torch.Tensor.size)
    call_stride = staticmethod(torch.Tensor.stride)
    call_storage_offset = staticmethod(torch.Tensor.storage_offset)
    record_pregraph_bytecode_enter = staticmethod(type(None))  # () -> None
    record_pregraph_bytecode_exit = staticmethod(bool)  # (None) -> ignored

    def __getattr__(self, name: str) -> Any:
        return getattr(torch._dynamo.utils, name)


class GuardlessForward:
    """Dynamo's transformed ``forward``, callable as a plain function (unbound: pass the module
    first). It runs with a private copy of the module's globals, so nothing is added to the user's
    namespace: there ``torch._dynamo.utils`` is replaced by plain helpers and, in the per-range
    variants, the graph Dynamo calls is replaced by that range's compiled artifact itself (no
    per-call range dispatch at all)."""

    def __init__(self, func: Callable, code: types.CodeType, compiled_name: str):
        self.func = func
        self.code = code
        self.compiled_name = compiled_name
        self.globals = dict(func.__globals__)
        self.globals[_DYNAMO_UTILS_GLOBAL] = _PlainDynamoUtils()
        self.generic = self._function(self.globals)

    def for_artifact(self, artifact: Callable) -> Callable:
        """The forward with the graph call bound to ``artifact`` (one range's compiled graph)."""
        return self._function({**self.globals, self.compiled_name: artifact})

    def _function(self, globals_: dict) -> Callable:
        f = self.func
        return types.FunctionType(self.code, globals_, f.__name__, f.__defaults__, f.__closure__)


def guardless_forward(fn: Callable, codes: list) -> Optional[GuardlessForward]:
    """``fn``'s transformed code as a ``GuardlessForward``, or None unless Dynamo made exactly one
    transformed code calling exactly one graph (graph breaks need Dynamo to compile the rest)."""
    if len(codes) != 1:
        return None
    code = codes[0]
    compiled = [n for n in code.co_names if n.startswith(_COMPILED_FN_PREFIX)]
    if len(compiled) != 1 or any(n.startswith("__resume_at") for n in code.co_names):
        return None
    return GuardlessForward(getattr(fn, "__func__", fn), code, compiled[0])


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
