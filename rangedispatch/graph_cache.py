"""Per-range lazy compilation of the graphs Dynamo hands to our backend.

Dynamo traces the model with the token dimensions symbolic and calls ``RangeCompiler.backend`` for
every graph it produces (one per graph break, one per guard set: a call with a size-1 token dim, a
new keyword argument or a new dtype gets a graph of its own). Each becomes a ``RangeGraph``: a
callable that Dynamo runs in place of the graph, which reads the range of the current forward call
(``CallState``, set by the wrapper for the duration of the call) and runs that range's Inductor
artifact, compiling it on first use.

Compiles take Dynamo's own process-wide compile lock: Inductor is not thread-safe, and two wrappers
compiling from two threads would otherwise corrupt each other's state.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.fx

from torch._inductor.custom_graph_pass import CustomGraphPass

from rangedispatch.passes import GraphPass, RangePassPipeline
from rangedispatch.ranges import Range

log = logging.getLogger("rangedispatch")


def compile_lock() -> Any:
    """The one lock every Dynamo trace and Inductor compile in this process takes."""
    return torch._dynamo.convert_frame.compile_lock


@dataclass
class CompileRecord:
    """What compiling one graph for one range did."""

    seconds: float
    passes: list[str]
    matches: dict[str, int]
    cache_hit: bool


@dataclass
class CompilePolicy:
    """How ranges are compiled: the passes (each says where it applies) and when to max-autotune."""

    passes: list[GraphPass]
    max_autotune: str  # compile.max_autotune: "never", "single_sizes" or "always"
    max_autotune_gemm: bool  # compile.max_autotune_gemm

    def passes_for(self, r: Range) -> list[GraphPass]:
        return [p for p in self.passes if p.applies(r)]

    def inductor_options(self, r: Range) -> dict[str, Any]:
        """Inductor options for ``r``'s graphs: those of torch.compile's "max-autotune-no-cudagraphs"
        mode where it autotunes (the wrapper captures CUDA graphs itself), none elsewhere."""
        from torch._inductor import list_mode_options

        if self.max_autotune == "always" or (self.max_autotune == "single_sizes" and r.is_single_size):
            return {**list_mode_options("max-autotune-no-cudagraphs"), "max_autotune": self.max_autotune_gemm}
        return {}


def _free_symbols(values: Sequence[Any]) -> set:
    symbols = set()
    for v in values:
        if isinstance(v, torch.SymInt):
            symbols |= v.node.expr.free_symbols
        elif isinstance(v, torch.Tensor):
            for s in (*v.shape, *v.stride()):
                if isinstance(s, torch.SymInt):
                    symbols |= s.node.expr.free_symbols
    return symbols


def _concrete(v: Any, bindings: dict) -> Any:
    """A real value standing in for the fake placeholder ``v`` with its symbols bound."""

    def num(s: Any) -> int:
        return int(s.node.expr.subs(bindings)) if isinstance(s, torch.SymInt) else int(s)

    if isinstance(v, torch.SymInt):
        return num(v)
    if isinstance(v, torch.Tensor):
        shape = [num(s) for s in v.shape]
        stride = [num(s) for s in v.stride()]
        out = torch.empty_strided(shape, stride, dtype=v.dtype, device=v.device)
        return out.normal_() if out.is_floating_point() else out.zero_()
    return v


POST_GRAD_GRAPH = "rangedispatch_post_grad_graph"  # gm.meta key: the post-grad graph, where it differs


def _holds_dtensors(gm: torch.fx.GraphModule) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(n.meta.get("example_value"), DTensor) for n in gm.graph.nodes)


def _compile_fx(gm: torch.fx.GraphModule, inputs: list, symbolic: bool) -> Callable:
    """Inductor on a fresh copy of ``gm`` (passes must not touch the shared graph); from the
    symbolic fake placeholders, under their shape environment, when ``symbolic``."""
    from torch._inductor.compile_fx import compile_fx

    gm_copy = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    if not symbolic:
        return compile_fx(gm_copy, inputs)
    fake_mode = torch._guards.detect_fake_mode(inputs)
    with torch._guards.tracing(torch._guards.TracingContext(fake_mode)):
        return compile_fx(gm_copy, inputs)


def size_hints(shape_env: Any) -> dict:
    """The shape environment's symbol -> size hint mapping (its attribute's name differs across torch
    versions)."""
    hints = getattr(shape_env, "backed_var_to_val", None)
    return hints if hints is not None else shape_env.var_to_val


@contextlib.contextmanager
def _range_size_hint(fakes: Sequence[Any], symbols: set, r: Range) -> Iterator[list]:
    """While a range compiles, the token count's size hint is the range's end. Inductor picks kernel
    launch configs (reductions, pointwise blocks) from hints, and the traced size (often 16 tokens,
    or 1) would tune a range of thousands of tokens for the wrong size. Yields the shape guards the
    compile added that some size of the range breaks: the range's graph is called without re-checking
    guards, so they are reported (a guard that holds for every size of a one-symbol range, such as an
    indexing bound ``8192*s0 <= 2**31-1``, is not)."""
    fake_mode = torch._guards.detect_fake_mode(list(fakes)) if symbols else None
    shape_env = getattr(fake_mode, "shape_env", None)
    if shape_env is None:
        yield []
        return
    hints = size_hints(shape_env)
    saved = {s: hints[s] for s in symbols if s in hints}
    if len(symbols) == 1:
        (sym,) = symbols
        hints[sym] = type(hints[sym])(r.end) if sym in hints else r.end
    guards_before = len(shape_env.guards)
    added: list = []
    try:
        yield added
    finally:
        hints.update(saved)
        new = [g.expr for g in shape_env.guards[guards_before:]]
        if len(symbols) == 1:
            new = [g for g in new if not _holds_over(g, *symbols, r)]
        added += new


@contextlib.contextmanager
def _range_bounds(fakes: Sequence[Any], symbols: set, r: Range) -> Iterator[None]:
    """While the passes of a range run, the token count's value range is the range's. A pass that
    traces new ops on fake values (make_fx) has their sizes checked against the traced size's hint
    otherwise: a graph traced at 2 tokens would make sequence parallelism's token block "one row" for
    a range of thousands. Not around the whole compile: the bounds would become guards of Inductor's
    cache entry, which the next process checks against the traced size. A range reaching below the
    traced bounds (1 token; a symbol is never below 2) keeps them."""
    fake_mode = torch._guards.detect_fake_mode(list(fakes)) if len(symbols) == 1 else None
    shape_env = getattr(fake_mode, "shape_env", None)
    traced = shape_env.var_to_range.get(next(iter(symbols))) if shape_env is not None else None
    if traced is None or r.is_single_size or not (traced.lower <= r.start and r.end <= traced.upper):
        yield
        return
    from torch.utils._sympy.value_ranges import ValueRanges

    (sym,) = symbols
    shape_env.var_to_range[sym] = ValueRanges(r.start, r.end)
    try:
        yield
    finally:
        shape_env.var_to_range[sym] = traced


def _holds_over(guard: Any, sym: Any, r: Range) -> bool:
    """True if ``guard`` (a sympy relation in ``sym``) holds for every token count in ``r``, by the
    value-range analysis the shape environment itself uses (interval arithmetic: "unknown" is False)."""
    import sympy
    from torch.utils._sympy.value_ranges import ValueRanges, bound_sympy

    if guard.free_symbols != {sym}:
        return False
    bound = bound_sympy(guard, {sym: ValueRanges(r.start, r.end)})
    return bool(bound.is_singleton() and bound.lower == sympy.true)


def _matches(pipeline: RangePassPipeline, code: list[str]) -> dict[str, int]:
    """Per pass: its ``output_ops`` calls in the generated code, else what it returned; -1 when
    neither is known (a cache hit of a pass without ``output_ops``)."""
    returned = pipeline.returned or {}
    out = {}
    for p in pipeline.passes:
        if p.output_ops:
            out[p.name] = sum(c.count(f"{op}(") for op in p.output_ops for c in code)
        else:
            out[p.name] = returned.get(p.name, -1)
    if -1 in out.values():
        log.info("Inductor cache hit for %s: matches of %s unknown (-1); a pass that sets output_ops is counted in "
                 "the generated code", pipeline.range, ", ".join(k for k, v in out.items() if v == -1))
    return out


@contextlib.contextmanager
def _generated_code() -> Iterator[list[str]]:
    """The Python code of every graph Inductor compiles or loads from its cache inside the block,
    through the hook Inductor calls with that code (set by ``torch._inductor.utils.run_and_get_code``)."""
    from torch._inductor.graph import GraphLowering

    code: list[str] = []
    previous = GraphLowering.save_output_code

    def keep(source: str) -> None:
        code.append(source)
        if previous is not None:
            previous(source)

    GraphLowering.save_output_code = keep
    try:
        yield code
    finally:
        GraphLowering.save_output_code = previous


class _PostGradCaptured(Exception):
    pass


class _CapturePostGrad(CustomGraphPass):
    """A post-grad custom pass that keeps the graph and stops the compile."""

    def __init__(self) -> None:
        self.graph: Optional[torch.fx.Graph] = None

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.graph = graph
        raise _PostGradCaptured()

    def uuid(self) -> Optional[Any]:
        return None


class CallState:
    """What the wrapper's call in progress tells the graphs it runs. Calls that reach the graphs
    through Dynamo hold the process-wide compile lock: one at a time, so no thread-local is needed."""

    range: Optional[Range] = None  # the call's range; None: the tracing call (graphs run as traced)
    graph_runs: int = 0  # RangeGraph calls so far: unchanged by a call means Dynamo ran it eagerly


class RangeGraph:
    """One Dynamo graph and its compiled artifact per range."""

    def __init__(self, compiler: "RangeCompiler", index: int, gm: torch.fx.GraphModule, traced_at: Optional[int]):
        self.compiler = compiler
        self.state = compiler.state
        self.index = index
        self.gm = gm
        self.traced_at = traced_at  # token count of the call that traced it
        self.fakes = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        self.symbols = _free_symbols(self.fakes)
        # traced with grad mode on and inputs (parameters) that require grad: AOT compiles a backward
        self.records_grad = torch.is_grad_enabled() and any(
            isinstance(f, torch.Tensor) and f.requires_grad for f in self.fakes)
        self.artifacts: dict[Range, Callable] = {}
        self.records: dict[Range, CompileRecord] = {}

    @property
    def is_symbolic(self) -> bool:
        return bool(self.symbols)

    def __call__(self, *args: Any) -> Any:
        state = self.state
        state.graph_runs += 1
        r = state.range
        fn = self.artifacts.get(r)
        if fn is None:
            if r is None:  # the tracing call (or a call that bypassed the wrapper)
                return self.gm(*args)
            fn = self.compile(r, args)
        return fn(*args)

    def compiles_static(self, r: Range) -> bool:
        """Single-size ranges compile static when one symbol (the token count) sizes the graph; with
        several ([batch, seq] token dims) one token count has many shapes, so they stay symbolic."""
        return not self.is_symbolic or (r.is_single_size and len(self.symbols) == 1)

    def compile(self, r: Range, args: Optional[Sequence[Any]] = None) -> Callable:
        """Compile for ``r`` once (concurrent callers wait for the first). Single-size ranges are
        compiled static, from the call's inputs or, in warmup, from inputs made to that size."""
        with compile_lock():
            fn = self.artifacts.get(r)
            if fn is not None:
                return fn
            if self.is_symbolic and self.compiles_static(r):
                if args is None:
                    (sym,) = self.symbols
                    args = [_concrete(v, {sym: r.start}) for v in self.fakes]
                inputs = list(args)
            else:
                inputs = self.fakes
            symbolic = inputs is self.fakes
            with _range_size_hint(self.fakes, self.symbols if symbolic else set(), r) as new_guards:
                fn, record = self.compiler.compile_graph(self, inputs, r, symbolic=symbolic)
            if new_guards:
                log.warning("compiling graph %d for %s added shape guards that no call checks: %s", self.index, r,
                            ", ".join(map(str, new_guards)))
            self.records[r] = record
            self.artifacts[r] = fn
            name = f"graph {self.index} " if len(self.compiler.graphs) > 1 else ""
            log.info(
                "compiled %s%s in %.1f s%s, passes: %s, matches: %s",
                name, r, record.seconds, " (Inductor cache hit)" if record.cache_hit else "",
                ", ".join(record.passes) or "none", record.matches or "none",
            )
            return fn


class RangeCompiler:
    """The Dynamo backend that collects every graph of one wrapped model, and the compiler of their
    ranges (with the passes that apply to each)."""

    def __init__(self, policy: CompilePolicy, max_num_tokens: int, tokens_now: Callable[[], Optional[int]]):
        self.policy = policy
        self.max_num_tokens = max_num_tokens
        # where the passes want ranges to end, over every graph traced so far
        self.split_points: set[int] = set()
        # the split points of the final ranges, once the wrapper has made them
        self.final_split_points: Optional[set[int]] = None
        self.tokens_now = tokens_now  # token count of the call being traced
        self.graphs: list[RangeGraph] = []
        self.state = CallState()

    def backend(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        """The ``torch.compile`` backend: keep the graph, compile nothing yet. A graph of DTensor
        ops has no collectives yet (DTensor emits them during AOT dispatch): its post-grad graph,
        from a compile stopped right after the post-grad passes, is where the passes find them."""
        graph = RangeGraph(self, len(self.graphs), gm, self.tokens_now())
        if _holds_dtensors(gm):
            start = time.perf_counter()
            gm.meta[POST_GRAD_GRAPH] = self.post_grad_graph(graph)
            log.info("graph %d holds DTensors: collectives read off its post-grad graph (%.1f s)", graph.index,
                     time.perf_counter() - start)
        self._add_split_points(gm)
        self.graphs.append(graph)
        log.debug("traced graph %d (%d nodes, symbolic: %s)", graph.index, len(gm.graph.nodes), graph.is_symbolic)
        return graph

    def _add_split_points(self, gm: torch.fx.GraphModule) -> None:
        wanted = {p for ps in (pass_.split_points(gm) for pass_ in self.policy.passes) for p in ps}
        usable = {p for p in wanted if 1 <= p < self.max_num_tokens}
        late = usable - self.final_split_points if self.final_split_points is not None else set()
        if late:
            log.warning("a graph traced after the ranges became final asks for split points %s; ranges stay as they "
                        "are (passes still only apply where they pay)", sorted(late))
        self.split_points |= usable

    def compile_graph(self, graph: RangeGraph, inputs: list, r: Range, symbolic: bool) -> tuple[Callable, CompileRecord]:
        from torch._dynamo.utils import counters
        from torch._inductor import config as inductor_config

        passes = self.policy.passes_for(r)
        if graph.records_grad and any(p.inference_only for p in passes):
            log.info("graph %d records gradients (grad mode on, parameters require grad): %s stay(s) off; "
                     "call the model under torch.no_grad() or torch.inference_mode() to apply them",
                     graph.index, ", ".join(p.name for p in passes if p.inference_only))
            passes = [p for p in passes if not p.inference_only]
        bounds = (lambda: _range_bounds(graph.fakes, graph.symbols, r)) if symbolic else None
        pipeline = RangePassPipeline(passes, r, previous=inductor_config.post_grad_custom_post_pass, bounds=bounds)
        hits_before = counters["inductor"]["fxgraph_cache_hit"]
        start = time.perf_counter()
        patch = {"post_grad_custom_post_pass": pipeline, **self.policy.inductor_options(r)}
        with inductor_config.patch(patch), _generated_code() as code:
            fn = _compile_fx(graph.gm, inputs, symbolic)
        seconds = time.perf_counter() - start
        cache_hit = counters["inductor"]["fxgraph_cache_hit"] > hits_before
        return fn, CompileRecord(seconds, [p.name for p in passes], _matches(pipeline, code), cache_hit)

    @staticmethod
    def post_grad_graph(graph: RangeGraph) -> Optional[torch.fx.Graph]:
        """The graph Inductor's post-grad passes leave for ``graph`` (caches off, compile stopped
        there): what every range's passes will see, before any range is compiled."""
        from torch._functorch import config as functorch_config
        from torch._inductor import config as inductor_config

        capture = _CapturePostGrad()
        try:
            with inductor_config.patch(post_grad_custom_post_pass=capture, fx_graph_cache=False), \
                    functorch_config.patch(enable_autograd_cache=False):
                _compile_fx(graph.gm, graph.fakes, symbolic=True)
        except Exception as e:  # the capture stops the compile with an exception (Inductor may wrap it)
            if capture.graph is None:
                log.info("graph %d: no post-grad graph to read collectives from (%s: %s)", graph.index,
                         type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return capture.graph
