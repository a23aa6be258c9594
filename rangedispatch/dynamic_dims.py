"""Which dims Dynamo treats as symbolic: the token dims, at every compile a wrapper's call starts.

Dynamo traces again whenever a guard fails (a keyword argument appears, a dtype changes, a token dim
of size 1 meets a graph traced with a larger one). Each of those traces must make the token dims
symbolic again, or it would produce a graph static in the token count and every later size would
trace once more. So the token dims are not marked once, on the first call: while a wrapper's
guarded call is in progress, the wrapper names it on this thread (``active_call``), and a Dynamo
compile-start callback marks the dims of that call's inputs. Nothing is looked up on the stack, and
compiles that start while no wrapper call is in progress on their thread are left alone.

Marking rules:
- the token input's token dims of size >= 2 (Dynamo specializes sizes 0 and 1 anyway: a call with a
  size-1 token dim gets a graph of its own, static in that dim, symbolic in the others);
- every dim of every other input tensor whose size equals one of those token sizes (attention masks
  ``[b, 1, s, s]``, residuals, position ids): "maybe" dynamic, so that a dim the graph ties to a static
  size (a weight's) is specialized silently instead of raising ``ConstraintViolationError``;
- duck sizing is off while tracing, so two token dims of equal size (``[4, 4]`` ids) get separate
  symbols instead of a graph that requires them equal.

Other dims that change between calls (a KV cache's length) become symbolic by Dynamo's own
automatic dynamic shapes, on the second size they take.
"""

from __future__ import annotations

import threading
from typing import Any, Optional, Sequence

import torch
from torch.utils import _pytree as pytree

from rangedispatch import torch_internals

_install_lock = threading.Lock()


class _ActiveCall(threading.local):
    """The innermost guarded wrapper call on this thread: ``(x, dims, args, kwargs)`` or None."""

    call: Optional[tuple] = None
    saved_duck_shape: list = []

    def __init__(self) -> None:
        self.saved_duck_shape = []


active_call = _ActiveCall()


def mark_token_dims(x: torch.Tensor, dims: Sequence[int], args: tuple, kwargs: dict) -> None:
    """Mark the token dims of ``x`` and the same-sized dims of the other inputs as dynamic."""
    sizes = {x.shape[d] for d in dims if x.shape[d] >= 2}
    if not sizes:
        return
    for d in dims:
        if x.shape[d] >= 2:
            torch_internals.maybe_mark_dynamic(x, d)
    for t in pytree.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and t is not x and not isinstance(t, torch.nn.Parameter):
            for d, size in enumerate(t.shape):
                if size in sizes:
                    torch_internals.maybe_mark_dynamic(t, d)


def _on_compile_start(_: Any) -> None:
    call = active_call.call
    if call is None:
        return  # a compile that is not one of ours
    mark_token_dims(*call)
    active_call.saved_duck_shape.append(torch_internals.set_duck_shape(False))


def _on_compile_end(_: Any) -> None:
    if active_call.saved_duck_shape:
        torch_internals.set_duck_shape(active_call.saved_duck_shape.pop())


def install() -> None:
    """Register the callbacks (once; again after ``torch._dynamo.reset()``). They do nothing for
    compiles that no wrapper call starts."""
    with _install_lock:
        torch_internals.on_compile(_on_compile_start, _on_compile_end)
