"""CUDA graphs per token count: ``dispatch.cudagraph_sizes``.

A call of ``n`` tokens whose range holds a captured size ``s >= n`` copies its inputs into that
graph's static buffers (the first ``n`` rows along the padded token dim), replays, and gets the
outputs sliced back to ``n`` rows. Outputs are views of the graph's static buffers, as in vLLM: the
next replay of the same size overwrites them. Graphs share one memory pool. The padded dim is the
call's one token dim larger than 1 (``[1, seq]`` prefill pads the sequence, ``[batch, 1]`` decode
the batch); a call with several token dims larger than 1 only uses a graph of exactly its size.

Padding is exact only for computations that treat tokens independently or causally (MLPs, norms,
TP collectives, causal attention with the padding at the end). Bidirectional attention, a softmax
or mean over tokens, or routing with capacity change the real rows. So the first padded replay of
each size is compared once with the unpadded call; if the real rows differ, it raises.

A replay checks what Dynamo's guards would: the call's argument structure, its non-tensor values,
and each tensor's dtype, device and non-token sizes must be those captured. A call that differs
runs without the graph (said once).

Stateful arguments (objects that hold tensors, such as a KV cache) are captured by reference: the
graph reads and writes their tensors in place. That is only right while those tensors stay where
they were, so such an object must say so (``is_compileable = True``, as Hugging Face's static
caches do); a call with any other such object runs without graphs (said once: a dynamic cache
reallocates its tensors every step). A graph is captured for exactly the call's size (a cache
has a fixed batch). Every such call runs exactly once, as without graphs (a static cache also
advances a position counter on the device): the first call of its kind runs without a graph, as
the warm-up (on the buffers the graph will read, so that nothing compiles during the capture), and
the next is captured and replayed. A new object in the same place (a new cache
for the next ``generate``) is captured again the same way.
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

_PLAIN_VALUES = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _holds_tensors(obj: Any, depth: int = 3) -> bool:
    """Whether an argument object reaches tensors through its attributes, lists or dicts."""
    if isinstance(obj, torch.Tensor):
        return True
    if depth == 0 or isinstance(obj, _PLAIN_VALUES):
        return False
    if isinstance(obj, (list, tuple)):
        return any(_holds_tensors(v, depth - 1) for v in obj)
    if isinstance(obj, dict):
        return any(_holds_tensors(v, depth - 1) for v in obj.values())
    return any(_holds_tensors(v, depth - 1) for v in getattr(obj, "__dict__", {}).values())


def _stateful(leaf: Any) -> bool:
    return not isinstance(leaf, (torch.Tensor, *_PLAIN_VALUES)) and _holds_tensors(leaf)


def stateful_leaves(leaves: Sequence[Any]) -> list:
    """The argument objects that hold tensors (state the model may update, such as a KV cache)."""
    return [leaf for leaf in leaves if _stateful(leaf)]


def moving_state(stateful: Sequence[Any]) -> Optional[str]:
    """Why a call with these stateful arguments cannot use CUDA graphs, or None."""
    for leaf in stateful:
        if getattr(leaf, "is_compileable", False) is not True:
            return (f"an argument is a {type(leaf).__name__} holding tensors that may move between calls (it does not "
                    "declare is_compileable=True); CUDA graphs need static state, e.g. Hugging Face's static cache "
                    "(cache_implementation='static')")
    return None


@dataclass
class CapturedCall:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: "CapturedInputs"
    output: Any
    checked_padding: bool = False


class CapturedInputs:
    """The static input buffers of one captured graph, and what a call must match to use them.
    ``pad_dim`` is the token dim padded from ``n`` to ``s`` rows (None: the call's own size)."""

    def __init__(self, args: tuple, kwargs: dict, pad_dim: Optional[int], n: int, s: int):
        leaves, self.spec = pytree.tree_flatten((args, kwargs))
        self.pad_dim, self.size = pad_dim, s
        self.buffers: list = []  # per leaf: its static buffer (tensors) or value (objects by reference)
        self.token_leaf: list[bool] = []  # per leaf: does it carry the padded token dim
        for leaf in leaves:
            token = pad_dim is not None and _carries_tokens(leaf, pad_dim, n)
            if token:
                buf = _resized(leaf, pad_dim, n, s)
            elif isinstance(leaf, torch.Tensor) and not isinstance(leaf, torch.nn.Parameter):
                buf = leaf.clone()
            else:
                buf = leaf
            self.buffers.append(buf)
            self.token_leaf.append(token)
        self.stateful = [i for i, leaf in enumerate(leaves) if _stateful(leaf)]

    def call_inputs(self) -> tuple[tuple, dict]:
        return pytree.tree_unflatten(self.buffers, self.spec)

    def new_state(self, leaves: list) -> bool:
        """Whether the call passes another object where a stateful one was captured."""
        return any(leaves[i] is not self.buffers[i] for i in self.stateful)

    def mismatch(self, leaves: list, spec: Any, n: int) -> Optional[str]:
        """Why a call of ``n`` tokens (flattened: ``leaves``, ``spec``) cannot replay into these
        buffers, or None."""
        if spec != self.spec:
            return "the call's arguments differ from the captured call's (keywords, nesting or count)"
        d = self.pad_dim
        for i, (buf, live, token) in enumerate(zip(self.buffers, leaves, self.token_leaf)):
            if isinstance(buf, torch.Tensor) != isinstance(live, torch.Tensor):
                return f"input {i} is a {type(live).__name__}; a {type(buf).__name__} was captured"
            if not isinstance(buf, torch.Tensor):
                if i in self.stateful:
                    continue  # by reference: new_state() decides
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
        d = self.pad_dim
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


def pad_dim(x: torch.Tensor, dims: Sequence[int], n: int, s: int) -> Optional[int]:
    """The token dim a call of ``n`` tokens pads to ``s`` (-1: none needed; None: ambiguous)."""
    if n == s:
        return -1
    larger = [d for d in dims if x.shape[d] != 1]
    if len(larger) > 1:
        return None
    return larger[0] if larger else dims[0]


class CudaGraphRunner:
    """Captures and replays one CUDA graph per configured size (and padded token-input shape)."""

    MISMATCH = object()  # replay's answer when the call cannot use the graph: run it without

    def __init__(self, sizes: Sequence[int], run: Callable[[Range, tuple, dict], Any]):
        self.sizes = sorted(sizes)
        self.run = run  # runs the model for a range, outside any graph
        self.captured: dict[tuple, CapturedCall] = {}  # (size, padded token-input shape) -> graph
        self.warmed: dict[tuple, tuple] = {}  # key -> (ids of its warm-up call's stateful arguments, its buffers)
        self.pool: Any = None
        self.said = False  # a call that cannot use a graph was reported
        _RUNNERS.add(self)

    def size_for(self, r: Range, n: int) -> Optional[int]:
        """The captured size serving ``n`` tokens in range ``r``: the smallest size >= n inside r."""
        i = bisect.bisect_left(self.sizes, n)
        if i < len(self.sizes) and self.sizes[i] in r:
            return self.sizes[i]
        return None

    def replay(self, r: Range, s: int, n: int, x: torch.Tensor, dims: Sequence[int], args: tuple, kwargs: dict) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        stateful = stateful_leaves(leaves)
        d = pad_dim(x, dims, n, s)
        reason = moving_state(stateful)
        if reason is None and d is None:
            reason = f"{n} tokens over several token dims {tuple(x.shape)} cannot be padded to {s}"
        if reason is None and stateful and n != s:
            reason = f"calls with stateful arguments use graphs of exactly their size; {n} is not in cudagraph_sizes"
        if reason is not None:
            return self._say_mismatch(s, reason)
        d = None if d == -1 else d
        shape = list(x.shape)
        if d is not None:
            shape[d] = s
        key = (s, tuple(shape))
        call = self.captured.get(key)
        if call is not None and call.inputs.new_state(leaves):
            call = None  # the old graph stays until its successor is captured: it keeps the memory pool alive
        if call is None:
            self.check_device(x)
            if stateful:  # this call is the warm-up; the next one of its kind is captured
                state = tuple(map(id, stateful))
                warmed = self.warmed.get(key)
                if warmed is None or warmed[0] != state:
                    return self._warm_up(key, state, r, n, args, kwargs)
                call = self.capture(r, s, warmed[1], warm_runs=0)
            else:
                call = self.capture(r, s, CapturedInputs(args, kwargs, d, n, s), warm_runs=2)
            self.captured[key] = call
        reason = call.inputs.mismatch(leaves, spec, n)
        if reason is not None:
            return self._say_mismatch(s, reason)
        expected = self.run(r, args, kwargs) if n < s and not call.checked_padding else None
        call.inputs.copy_in(leaves, n)
        call.graph.replay()
        got = self._sliced(call.output, d, s, n)
        if expected is not None:
            self._check_padding(expected, got, s, n)
            call.checked_padding = True
        return got

    def _say_mismatch(self, s: int, reason: str) -> Any:
        if not self.said:
            self.said = True
            log.warning("CUDA graph for %d tokens not used: %s; such calls run without a graph (said once)", s, reason)
        return self.MISMATCH

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

    @staticmethod
    def _sliced(output: Any, d: Optional[int], s: int, n: int) -> Any:
        """The captured output's tensors cut back to ``n`` rows, in new containers (a caller that
        edits the output object it gets must not edit the captured one)."""
        return pytree.tree_map(
            lambda t: t.narrow(d, 0, n) if d is not None and isinstance(t, torch.Tensor) and t.dim() > d
            and t.shape[d] == s else t, output)

    def check_device(self, x: torch.Tensor) -> None:
        """Refuse a token input that is not on a CUDA device: the wrapper asks on its first call,
        before anything is traced, so a CPU model with CUDA graphs configured fails at once."""
        if not x.is_cuda:
            raise ConfigError(f"dispatch.cudagraph_sizes={self.sizes} needs CUDA inputs; the token input is on {x.device}")

    def _warm_up(self, key: tuple, state: tuple, r: Range, n: int, args: tuple, kwargs: dict) -> Any:
        """Run a stateful call once, uncaptured, on the static buffers its graph will be captured
        with (its exact size): whatever that run sets up (a Dynamo trace for the buffers' strides,
        the range's compile, autotuning) then happens outside the capture, and the capture, which
        cannot run the call again first, finds it done."""
        inputs = CapturedInputs(args, kwargs, None, n, n)
        self.warmed[key] = (state, inputs)
        return self.run(r, *inputs.call_inputs())

    def capture(self, r: Range, s: int, inputs: CapturedInputs, warm_runs: int) -> CapturedCall:
        """Capture size ``s`` on ``inputs``' static buffers after ``warm_runs`` runs of the call on
        them (compiles, workspaces, NCCL set up outside the capture; 0 after a stateful call's
        warm-up on them, where running it again would update its state twice)."""
        s_args, s_kwargs = inputs.call_inputs()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warm_runs):
                self.run(r, s_args, s_kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.run(r, s_args, s_kwargs)
        if self.pool is None:
            self.pool = graph.pool()
        log.info("captured CUDA graph for %d tokens (range %s)", s, r)
        return CapturedCall(graph, inputs, output)


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
