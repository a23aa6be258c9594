"""Which dims Dynamo treats as symbolic: the token dims, at every compile a wrapper's call starts.

Dynamo traces again whenever a guard fails (a keyword argument appears, a dtype changes, a token dim
of size 1 meets a graph traced with a larger one). Each of those traces must make the token dims
symbolic again, or it would produce a graph static in the token count and every later size would
trace once more until Dynamo's recompile limit. So the token dims are not marked once, on the first
call: a Dynamo compile-start callback marks them on the inputs of whichever wrapper call is in
progress on this thread (found on the stack), whenever Dynamo starts compiling for it.

Marking rules:
- the token input's token dims of size >= 2 (Dynamo specializes sizes 0 and 1 anyway: a call with a
  size-1 token dim gets a graph of its own, static in that dim, symbolic in the others);
- every dim of every other input tensor whose size equals one of those token sizes (attention masks
  ``[b, 1, s, s]``, residuals, position ids): "maybe" dynamic, so that a dim the graph ties to a static
  size (a weight's) is specialized silently instead of raising ``ConstraintViolationError``;
- duck sizing is off while tracing, so two token dims of equal size (``[4, 4]`` ids) get separate
  symbols instead of a graph that requires them equal.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Optional, Sequence

import torch
from torch.utils import _pytree as pytree


_calls: set = set()  # code objects of the functions that make guarded wrapper calls
_installed = False
_install_lock = threading.Lock()
_saved_duck_shape: list = []


def register_call_site(fn: Any) -> None:
    """``fn(r, x, args, kwargs)`` calls Dynamo for ``wrapper`` (a local of its frame); a compile it
    starts finds the call's inputs in that frame, so the per-call path stores nothing for the rare
    compile."""
    _calls.add(fn.__code__)


def call_in_progress() -> Optional[tuple]:
    """``(x, dims, args, kwargs)`` of the innermost guarded wrapper call on this thread's stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in _calls:
            f = frame.f_locals
            return f["x"], f["wrapper"]._counter.dims, f["args"], f["kwargs"]
        frame = frame.f_back
    return None


def mark_token_dims(x: torch.Tensor, dims: Sequence[int], args: tuple, kwargs: dict) -> None:
    """Mark the token dims of ``x`` and the same-sized dims of the other inputs as dynamic."""
    sizes = {x.shape[d] for d in dims if x.shape[d] >= 2}
    if not sizes:
        return
    for d in dims:
        if x.shape[d] >= 2:
            torch._dynamo.maybe_mark_dynamic(x, d)
    for t in pytree.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and t is not x and not isinstance(t, torch.nn.Parameter):
            for d, size in enumerate(t.shape):
                if size in sizes:
                    torch._dynamo.maybe_mark_dynamic(t, d)


def _on_compile_start(_: Any) -> None:
    import torch.fx.experimental._config as fx_config

    call = call_in_progress()
    if call is None:
        return  # a compile that is not one of ours
    x, dims, args, kwargs = call
    mark_token_dims(x, dims, args, kwargs)
    _saved_duck_shape.append(fx_config.use_duck_shape)
    fx_config.use_duck_shape = False


def _on_compile_end(_: Any) -> None:
    import torch.fx.experimental._config as fx_config

    if _saved_duck_shape:
        fx_config.use_duck_shape = _saved_duck_shape.pop()


def install() -> None:
    """Register the callbacks once per process (they do nothing for other compiles)."""
    global _installed
    with _install_lock:
        if not _installed:
            torch._dynamo.callback_handler.register_start_callback(_on_compile_start)
            torch._dynamo.callback_handler.register_end_callback(_on_compile_end)
            _installed = True
