"""CUDA graphs per token count: ``dispatch.cudagraph_sizes``.

A call of ``n`` tokens whose range holds a captured size ``s >= n`` copies its inputs into that
graph's static buffers (the first ``n`` rows along the token dim), replays, and gets the outputs
sliced back to ``n`` rows. Outputs are views of the graph's static buffers, as in vLLM: the next
replay of the same size overwrites them. Graphs share one memory pool, captured largest first at
``warmup``.

Padding is exact only for computations that treat tokens independently or causally (MLPs, norms,
TP collectives, causal attention with the padding at the end). Bidirectional attention, a softmax
or mean over tokens, or routing with capacity change the real rows. So the first padded replay of
each size is compared once with the unpadded call; if the real rows differ, it raises.

A replay checks what Dynamo's guards would: the call's argument structure, its non-tensor values,
and each tensor's dtype, device and non-token sizes must be those captured. A call that differs
runs without the graph (said once).
"""

from __future__ import annotations

import bisect
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils import _pytree as pytree

from rangedispatch.errors import ConfigError
from rangedispatch.ranges import Range

log = logging.getLogger("rangedispatch")


@dataclass
class CapturedCall:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: "CapturedInputs"
    output: Any
    checked_padding: bool = False


class CapturedInputs:
    """The static input buffers of one captured graph, and what a call must match to use them."""

    def __init__(self, args: tuple, kwargs: dict, token_dim: int, n: int, s: int):
        leaves, self.spec = pytree.tree_flatten((args, kwargs))
        self.token_dim, self.size = token_dim, s
        self.buffers: list = []  # per leaf: its static buffer (tensors) or value
        self.token_leaf: list[bool] = []  # per leaf: does it carry the token dim
        for leaf in leaves:
            token = _carries_tokens(leaf, token_dim, n)
            if token:
                buf = _resized(leaf, token_dim, n, s)
            elif isinstance(leaf, torch.Tensor) and not isinstance(leaf, torch.nn.Parameter):
                buf = leaf.clone()
            else:
                buf = leaf
            self.buffers.append(buf)
            self.token_leaf.append(token)

    def call_inputs(self) -> tuple[tuple, dict]:
        return pytree.tree_unflatten(self.buffers, self.spec)

    def mismatch(self, leaves: list, spec: Any, n: int) -> Optional[str]:
        """Why a call of ``n`` tokens (flattened: ``leaves``, ``spec``) cannot replay into these
        buffers, or None."""
        if spec != self.spec:
            return "the call's arguments differ from the captured call's (keywords, nesting or count)"
        d = self.token_dim
        for i, (buf, live, token) in enumerate(zip(self.buffers, leaves, self.token_leaf)):
            if isinstance(buf, torch.Tensor) != isinstance(live, torch.Tensor):
                return f"input {i} is a {type(live).__name__}; a {type(buf).__name__} was captured"
            if not isinstance(buf, torch.Tensor):
                if type(buf) is not type(live) or buf != live:
                    return f"input {i} is {live!r}; {buf!r} was captured"
                continue
            if live.dtype != buf.dtype or live.device != buf.device or live.dim() != buf.dim():
                return f"input {i} is {live.dtype} on {live.device}; {buf.dtype} on {buf.device} was captured"
            expected = list(buf.shape)
            if token:
                expected[d] = n
            if list(live.shape) != expected:
                return f"input {i} has shape {tuple(live.shape)}; {tuple(expected)} fits the captured graph"
        return None

    def copy_in(self, leaves: list, n: int) -> None:
        d = self.token_dim
        for buf, live, token in zip(self.buffers, leaves, self.token_leaf):
            if token:
                buf.narrow(d, 0, n).copy_(live)
            elif isinstance(buf, torch.Tensor) and buf is not live:
                buf.copy_(live)


_RUNNERS: "weakref.WeakSet[CudaGraphRunner]" = weakref.WeakSet()


def release_cuda_graphs() -> int:
    """Frees every CUDA graph rangedispatch captured in this process and returns how many; each
    is captured again by the next call of its size. Call it before
    ``torch.distributed.destroy_process_group()``: NCCL cannot destroy a communicator while a graph
    that captured its collectives exists, and destroying it hangs."""
    freed = 0
    for runner in list(_RUNNERS):
        freed += len(runner.captured)
        runner.captured.clear()
        runner.pool = None
    return freed


class CudaGraphRunner:
    """Captures and replays one CUDA graph per configured size."""

    MISMATCH = object()  # replay's answer when the call cannot use the graph: run it without

    def __init__(self, sizes: Sequence[int], token_dim: int, run: Callable[[Range, tuple, dict], Any]):
        self.sizes = sorted(sizes)
        self.token_dim = token_dim
        self.run = run  # runs the model for a range, outside any graph
        self.captured: dict[int, CapturedCall] = {}
        self.pool: Any = None
        self.warned = False
        _RUNNERS.add(self)

    def size_for(self, r: Range, n: int) -> Optional[int]:
        """The captured size serving ``n`` tokens in range ``r``: the smallest size >= n inside r."""
        i = bisect.bisect_left(self.sizes, n)
        if i < len(self.sizes) and self.sizes[i] in r:
            return self.sizes[i]
        return None

    def replay(self, r: Range, s: int, n: int, x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        call = self.captured.get(s)
        if call is None:
            call = self.capture(r, s, x, args, kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        reason = call.inputs.mismatch(leaves, spec, n)
        if reason is not None:
            if not self.warned:
                self.warned = True
                log.warning("CUDA graph for %d tokens not used: %s; such calls run without a graph (said once)",
                            s, reason)
            return self.MISMATCH
        expected = self.run(r, args, kwargs) if n < s and not call.checked_padding else None
        call.inputs.copy_in(leaves, n)
        call.graph.replay()
        got = self._sliced(call.output, s, n)
        if expected is not None:
            self._check_padding(expected, got, s, n)
            call.checked_padding = True
        return got

    @staticmethod
    def _check_padding(expected: Any, got: Any, s: int, n: int) -> None:
        """The first padded replay of a size must equal the unpadded call on the real rows."""
        for e, g in zip(pytree.tree_leaves(expected), pytree.tree_leaves(got)):
            if isinstance(e, torch.Tensor) and e.is_floating_point():
                try:
                    torch.testing.assert_close(g, e)
                except AssertionError:
                    raise ConfigError(
                        f"dispatch.cudagraph_sizes: padding {n} tokens to the captured size {s} changes the first "
                        f"{n} rows of the output (max abs diff {(g.float() - e.float()).abs().max().item():.3g}): the "
                        f"model mixes tokens (bidirectional attention, softmax or mean over tokens, routing); "
                        f"remove {s} from dispatch.cudagraph_sizes or list exactly the sizes it is called with"
                    ) from None

    def _sliced(self, output: Any, s: int, n: int) -> Any:
        if n == s:
            return output
        d = self.token_dim
        return pytree.tree_map(
            lambda t: t.narrow(d, 0, n) if isinstance(t, torch.Tensor) and t.dim() > d and t.shape[d] == s else t,
            output)

    def capture(self, r: Range, s: int, x: torch.Tensor, args: tuple, kwargs: dict) -> CapturedCall:
        if not x.is_cuda:
            raise ConfigError(f"dispatch.cudagraph_sizes={self.sizes} needs CUDA inputs; the token input is on {x.device}")
        inputs = CapturedInputs(args, kwargs, self.token_dim, x.shape[self.token_dim], s)
        s_args, s_kwargs = inputs.call_inputs()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile, create workspaces, warm NCCL outside the capture
            for _ in range(2):
                self.run(r, s_args, s_kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.run(r, s_args, s_kwargs)
        if self.pool is None:
            self.pool = graph.pool()
        call = CapturedCall(graph, inputs, output)
        self.captured[s] = call
        log.info("captured CUDA graph for %d tokens (range %s)", s, r)
        return call


def resize_tokens(args: tuple, kwargs: dict, token_dim: int, n: int, s: int) -> tuple[tuple, dict]:
    """Inputs like ``(args, kwargs)`` with ``s`` instead of ``n`` rows along ``token_dim`` (zero
    padded or cut): example inputs for capturing size ``s`` at warmup."""

    return pytree.tree_map(lambda t: _resized(t, token_dim, n, s) if _carries_tokens(t, token_dim, n) else t,
                           (args, kwargs))


def _carries_tokens(t: Any, token_dim: int, n: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() > token_dim and t.shape[token_dim] == n


def _resized(t: torch.Tensor, token_dim: int, n: int, s: int) -> torch.Tensor:
    """``t`` with ``s`` rows instead of ``n`` along ``token_dim``: zero padded or cut."""
    shape = list(t.shape)
    shape[token_dim] = s
    out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    k = min(n, s)
    out.narrow(token_dim, 0, k).copy_(t.narrow(token_dim, 0, k))
    return out
