"""CUDA graphs per token count: ``dispatch.cudagraph_sizes``.

A call of ``n`` tokens whose range holds a captured size ``s >= n`` copies its inputs into that
graph's static buffers (the first ``n`` rows along the token dim), replays, and gets the outputs
sliced back to ``n`` rows. Outputs are views of the graph's static buffers, as in vLLM: the next
replay of the same size overwrites them. Padding rows hold earlier inputs (finite values), so
token-wise models (MLP, norms, TP collectives) are exact; a model mixing tokens (attention over the
padded dim) needs sizes that match its calls. Graphs share one memory pool, captured largest first
at ``warmup``.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils import _pytree as pytree

from rangedispatch.errors import ConfigError
from rangedispatch.ranges import Range

log = logging.getLogger("rangedispatch")


@dataclass
class CapturedCall:
    graph: torch.cuda.CUDAGraph
    size: int
    static_leaves: list  # the static buffers, in the order of the flattened call inputs
    token_leaf: list  # per leaf: does it carry the token dim
    output: Any


class CudaGraphRunner:
    """Captures and replays one CUDA graph per configured size."""

    def __init__(self, sizes: Sequence[int], token_dim: int, run: Callable[[Range, tuple, dict], Any]):
        self.sizes = sorted(sizes)
        self.token_dim = token_dim
        self.run = run  # runs the model for a range, outside any graph
        self.captured: dict[int, CapturedCall] = {}
        self.pool: Any = None

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
        d = self.token_dim
        leaves = pytree.tree_leaves((args, kwargs))
        for static, live, token in zip(call.static_leaves, leaves, call.token_leaf):
            if token:
                static.narrow(d, 0, n).copy_(live)
            elif isinstance(static, torch.Tensor) and static is not live:
                static.copy_(live)
        call.graph.replay()
        if n == s:
            return call.output
        return pytree.tree_map(lambda t: self._slice(t, s, n), call.output)

    def _slice(self, t: Any, s: int, n: int) -> Any:
        d = self.token_dim
        if isinstance(t, torch.Tensor) and t.dim() > d and t.shape[d] == s:
            return t.narrow(d, 0, n)
        return t

    def capture(self, r: Range, s: int, x: torch.Tensor, args: tuple, kwargs: dict) -> CapturedCall:
        if not x.is_cuda:
            raise ConfigError(f"dispatch.cudagraph_sizes={self.sizes} needs CUDA inputs; the token input is on {x.device}")
        d = self.token_dim % x.dim()
        self.token_dim = d
        n = x.shape[d]
        leaves, spec = pytree.tree_flatten((args, kwargs))
        static_leaves, token_leaf = [], []
        for leaf in leaves:
            token = isinstance(leaf, torch.Tensor) and leaf.dim() > d and leaf.shape[d] == n
            if token:
                shape = list(leaf.shape)
                shape[d] = s
                buf = torch.zeros(shape, dtype=leaf.dtype, device=leaf.device)
                buf.narrow(d, 0, min(n, s)).copy_(leaf.narrow(d, 0, min(n, s)))
                static_leaves.append(buf)
            elif isinstance(leaf, torch.Tensor) and not isinstance(leaf, torch.nn.Parameter):
                static_leaves.append(leaf.clone())
            else:
                static_leaves.append(leaf)
            token_leaf.append(token)
        s_args, s_kwargs = pytree.tree_unflatten(static_leaves, spec)
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
        call = CapturedCall(graph, s, static_leaves, token_leaf, output)
        self.captured[s] = call
        log.info("captured CUDA graph for %d tokens (range %s)", s, r)
        return call


def resize_tokens(args: tuple, kwargs: dict, token_dim: int, n: int, s: int) -> tuple[tuple, dict]:
    """Inputs like ``(args, kwargs)`` with ``s`` instead of ``n`` rows along ``token_dim`` (zero
    padded or cut): example inputs for capturing size ``s`` at warmup."""

    def resize(t: Any) -> Any:
        if not (isinstance(t, torch.Tensor) and t.dim() > token_dim and t.shape[token_dim] == n):
            return t
        shape = list(t.shape)
        shape[token_dim] = s
        out = torch.zeros(shape, dtype=t.dtype, device=t.device)
        k = min(n, s)
        out.narrow(token_dim, 0, k).copy_(t.narrow(token_dim, 0, k))
        return out

    return pytree.tree_map(resize, (args, kwargs))
