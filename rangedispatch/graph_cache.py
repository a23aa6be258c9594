"""Per-range lazy compilation of the graphs Dynamo hands to our backend.

Dynamo traces the model with the token dimensions symbolic and calls ``RangeCompiler.backend`` for
every graph it produces (one per graph break, one per guard set: a call with a size-1 token dim, a
new keyword argument, a new dtype, a KV cache whose length became symbolic gets a graph of its own).
Each becomes a ``RangeGraph``: a callable that Dynamo runs in place of the graph, which reads the
range of the current forward call (``CallState``, set by the wrapper on the calling thread for the
duration of the call) and runs that range's Inductor artifact, compiling it on first use.

A graph's symbols are of two kinds: token symbols (the token input's token dims, known from the
sources Dynamo read them from) and others (a KV cache's length). Only token symbols meet the
range: a range's compile takes its end as the token count's size hint and its bounds as the token
count's value range; the other symbols keep their traced hints.

Compiles take Dynamo's own process-wide compile lock: Inductor is not thread-safe. Calls that only
run compiled artifacts take no lock.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import sympy
import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from rangedispatch import torch_internals
from rangedispatch.errors import GradientsUnsupportedError
from rangedispatch.passes import GraphPass, PassContext, RangePassPipeline
from rangedispatch.ranges import Range

log = logging.getLogger("rangedispatch")

compile_lock = torch_internals.compile_lock


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
        if self.max_autotune == "always" or (self.max_autotune == "single_sizes" and r.is_single_size):
            return {**torch_internals.mode_options("max-autotune-no-cudagraphs"), "max_autotune": self.max_autotune_gemm}
        return {}


class CallState(threading.local):
    """What the wrapper's call in progress on this thread tells the graphs it runs."""

    range: Optional[Range] = None  # the call's range; None: the tracing call (graphs run as traced)
    graph_runs: int = 0  # RangeGraph calls so far: unchanged by a call means Dynamo ran it eagerly


def _symbol_slots(values: Sequence[Any]) -> dict:
    """Where a call shows each size symbol of a graph's inputs: ``symbol -> (input, kind, dim)``,
    kind "int" (a SymInt input), "size" or "stride"."""
    slots: dict = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.SymInt):
            found = [("int", 0, v)]
        elif isinstance(v, torch.Tensor):
            found = [("size", d, s) for d, s in enumerate(v.shape)] + [("stride", d, s) for d, s in enumerate(v.stride())]
        else:
            continue
        for kind, d, s in found:
            expr = torch_internals.symint_expr(s) if isinstance(s, torch.SymInt) else None
            if expr is not None and expr.is_Symbol:
                slots.setdefault(expr, (i, kind, d))
    return slots


def _size_at(args: Sequence[Any], slot: tuple) -> int:
    i, kind, d = slot
    return args[i] if kind == "int" else args[i].shape[d] if kind == "size" else args[i].stride(d)


def _free_symbols(values: Sequence[Any]) -> set:
    symbols = set()
    for v in values:
        if isinstance(v, torch.SymInt):
            symbols |= torch_internals.symint_expr(v).free_symbols
        elif isinstance(v, torch.Tensor):
            for s in (*v.shape, *v.stride()):
                if isinstance(s, torch.SymInt):
                    symbols |= torch_internals.symint_expr(s).free_symbols
    return symbols


def _concrete(v: Any, bindings: dict) -> Any:
    """A real value standing in for the fake placeholder ``v`` with its symbols bound."""

    def num(s: Any) -> int:
        return int(torch_internals.symint_expr(s).subs(bindings)) if isinstance(s, torch.SymInt) else int(s)

    if isinstance(v, torch.SymInt):
        return num(v)
    if isinstance(v, torch.Tensor):
        shape = [num(s) for s in v.shape]
        stride = [num(s) for s in v.stride()]
        out = torch.empty_strided(shape, stride, dtype=v.dtype, device=v.device)
        return out.normal_() if out.is_floating_point() else out.zero_()
    return v


def _holds_dtensors(gm: torch.fx.GraphModule) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(n.meta.get("example_value"), DTensor) for n in gm.graph.nodes)


def _compile_fx(gm: torch.fx.GraphModule, inputs: list, symbolic: bool) -> Callable:
    """Inductor on a fresh copy of ``gm`` (passes must not touch the shared graph)."""
    gm_copy = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    return torch_internals.compile_fx(gm_copy, inputs, symbolic)


@contextlib.contextmanager
def _range_size_hint(shape_env: Any, token_symbol: Any, r: Range, since: int) -> Iterator[list]:
    """While a range compiles, the token count's size hint is the range's end. Inductor picks kernel
    launch configs (reductions, pointwise blocks) from hints, and the traced size (often 16 tokens,
    or 1) would tune a range of thousands of tokens for the wrong size. Yields the shape guards the
    compile relies on that some call of the range may break: Dynamo does not check them, so the
    range's calls do (a guard that holds for every size of the range, such as an indexing bound
    ``8192*s0 <= 2**31-1``, needs no check). ``since``: how many of the shape env's guards Dynamo
    checks (those it had when the graph was traced)."""
    if shape_env is None:
        yield []
        return
    hints = torch_internals.size_hints(shape_env)
    saved = {token_symbol: hints[token_symbol]} if token_symbol in hints else {}
    if token_symbol is not None:
        hints[token_symbol] = type(hints[token_symbol])(r.end) if token_symbol in hints else r.end
    added: list = []
    try:
        yield added
    finally:
        hints.update(saved)
        new = torch_internals.shape_guards(shape_env)[since:]
        added += [g for g in new if token_symbol is None
                  or not torch_internals.holds_over(g, token_symbol, r.start, r.end)]


@contextlib.contextmanager
def _range_bounds(shape_env: Any, token_symbol: Any, r: Range) -> Iterator[None]:
    """While the passes of a range run, the token count's value range is the range's. A pass that
    traces new ops on fake values (make_fx) has their sizes checked against the traced size's hint
    otherwise: a graph traced at 2 tokens would make sequence parallelism's token block "one row" for
    a range of thousands. Not around the whole compile: the bounds would become guards of Inductor's
    cache entry, which the next process checks against the traced size. A range reaching below the
    traced bounds (1 token; a symbol is never below 2) keeps them."""
    ranges = torch_internals.value_ranges(shape_env) if shape_env is not None and token_symbol is not None else {}
    traced = ranges.get(token_symbol)
    if traced is None or r.is_single_size or not (traced.lower <= r.start and r.end <= traced.upper):
        yield
        return
    ranges[token_symbol] = torch_internals.make_value_range(r.start, r.end)
    try:
        yield
    finally:
        ranges[token_symbol] = traced


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
                 "the generated code", pipeline.ctx.range, ", ".join(k for k, v in out.items() if v == -1))
    return out


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


class RangeGraph:
    """One Dynamo graph and its compiled artifact per range."""

    def __init__(self, compiler: "RangeCompiler", index: int, gm: torch.fx.GraphModule, traced_at: Optional[int],
                 token_sources: Sequence[str], reason: str):
        self.compiler = compiler
        self.state = compiler.state
        self.index = index
        self.gm = gm
        self.traced_at = traced_at  # token count of the call that traced it
        self.reason = reason  # why Dynamo traced it: the first trace, or the guard that failed
        self.fakes = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        self.symbols = _free_symbols(self.fakes)
        self.shape_env = torch_internals.shape_env_of(self.fakes) if self.symbols else None
        # the symbols read off the token input's token dims (several for [batch, seq] ids)
        self.token_symbols = {s for s in self.symbols
                              if set(torch_internals.symbol_sources(self.shape_env, s)) & set(token_sources)}
        # grad mode is part of Dynamo's guards: every call of this graph has the traced one
        self.grad_enabled = torch.is_grad_enabled()
        # traced with grad mode on and inputs (parameters) that require grad: AOT compiles a backward
        self.records_grad = self.grad_enabled and any(
            isinstance(f, torch.Tensor) and f.requires_grad for f in self.fakes)
        # the graph after Inductor's post-grad passes, captured for graphs of DTensor ops
        self.post_grad_graph: Optional[torch.fx.Graph] = None
        self.artifacts: dict[Range, Callable] = {}
        self.records: dict[Range, CompileRecord] = {}
        # shape guards Dynamo checks: those of the trace; a range's compile may add more (below)
        self.dynamo_guards = len(torch_internals.shape_guards(self.shape_env)) if self.shape_env is not None else 0
        # per range: the guards its compile relies on that Dynamo does not check, checked per call
        self.unchecked: dict[Range, list] = {}
        self.slots = _symbol_slots(self.fakes)
        self.said_broken: set[Range] = set()

    @property
    def is_symbolic(self) -> bool:
        return bool(self.symbols)

    @property
    def token_symbol(self) -> Any:
        """The one token symbol, or None (static in the token count, or several token dims)."""
        return next(iter(self.token_symbols)) if len(self.token_symbols) == 1 else None

    def __call__(self, *args: Any) -> Any:
        state = self.state
        state.graph_runs += 1
        r = state.range
        fn = self.artifacts.get(r)
        if fn is None:
            if r is None:  # the tracing call (or a call that bypassed the wrapper)
                return self.gm(*args)
            fn = self.compile(r, args)
        unchecked = self.unchecked.get(r)
        if unchecked is not None and not self._unchecked_guards_hold(r, unchecked, args):
            return self.gm(*args)
        return fn(*args)

    def _unchecked_guards_hold(self, r: Range, guards: list, args: Sequence[Any]) -> bool:
        """Whether this call's sizes meet the guards ``r``'s compile added; a call that breaks one
        (or whose sizes cannot be read) runs the traced graph instead of the artifact, said once."""
        values = {sym: sympy.Integer(_size_at(args, slot)) for sym, slot in self.slots.items()}
        for guard in guards:
            held = guard.xreplace(values)
            if held.free_symbols or not bool(held):
                if r not in self.said_broken:
                    self.said_broken.add(r)
                    log.warning("a call of graph %d in range %s does not meet %s, a shape guard its compile added: "
                                "such calls run the traced graph without Inductor (said once per range)",
                                self.index, r, guard)
                return False
        return True

    def runs_in(self, r: Range) -> bool:
        """Whether calls of range ``r`` can reach this graph (a graph static in the token count only
        runs at the size it was traced at)."""
        return bool(self.token_symbols) or self.traced_at is None or self.traced_at in r

    def compiles_static(self, r: Range) -> bool:
        """Single-size ranges compile static when the token count is the graph's only symbol; with
        several ([batch, seq] token dims) or other symbols (a KV length) they stay symbolic."""
        return not self.is_symbolic or (r.is_single_size and self.token_symbols == self.symbols
                                        and len(self.symbols) == 1)

    def compile(self, r: Range, args: Optional[Sequence[Any]] = None) -> Callable:
        """Compile for ``r`` once (concurrent callers wait for the first). Single-size ranges are
        compiled static, from the call's inputs or, in warmup, from inputs made to that size."""
        with compile_lock():
            fn = self.artifacts.get(r)
            if fn is not None:
                return fn
            if self.is_symbolic and self.compiles_static(r):
                if args is None:
                    args = [_concrete(v, {self.token_symbol: r.start}) for v in self.fakes]
                inputs = list(args)
            else:
                inputs = self.fakes
            symbolic = inputs is self.fakes
            shape_env = self.shape_env if symbolic else None
            with _range_size_hint(shape_env, self.token_symbol, r, self.dynamo_guards) as new_guards, \
                    torch.set_grad_enabled(self.grad_enabled):
                fn, record = self.compiler.compile_graph(self, inputs, r, symbolic=symbolic)
            if new_guards:
                self.unchecked[r] = new_guards
                log.info("compiling graph %d for %s added shape guards Dynamo does not check: %s; each call of the "
                         "range is checked against them", self.index, r, ", ".join(map(str, new_guards)))
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

    def __init__(self, policy: CompilePolicy, max_num_tokens: int,
                 traced_call: Callable[[], tuple[Optional[int], Sequence[str]]]):
        self.policy = policy
        self.max_num_tokens = max_num_tokens
        # where the passes want ranges to end, over every graph traced so far
        self.split_points: set[int] = set()
        # the split points of the final ranges, once the wrapper has made them
        self.final_split_points: Optional[set[int]] = None
        # (token count, source names of the token dims) of the call being traced on this thread
        self.traced_call = traced_call
        self.graphs: list[RangeGraph] = []
        self.state = CallState()

    def backend(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        """The ``torch.compile`` backend: keep the graph, compile nothing yet. A graph of DTensor
        ops has no collectives yet (DTensor emits them during AOT dispatch): its post-grad graph,
        from a compile stopped right after the post-grad passes, is where the passes find them."""
        tokens, token_sources = self.traced_call()
        reason = (torch_internals.recompile_reason() or ("first trace" if not self.graphs else "a graph break"))
        reason = reason.splitlines()[0].strip()  # Dynamo's reason goes on with the user's stack
        graph = RangeGraph(self, len(self.graphs), gm, tokens, token_sources, reason)
        if _holds_dtensors(gm):
            start = time.perf_counter()
            graph.post_grad_graph = self.capture_post_grad_graph(graph)
            log.info("graph %d holds DTensors: collectives read off its post-grad graph (%.1f s)", graph.index,
                     time.perf_counter() - start)
        self._add_split_points(graph)
        self.graphs.append(graph)
        others = sorted(map(str, graph.symbols - graph.token_symbols))
        log.info("traced graph %d at %s tokens (%s): token count %s%s; %d graph(s) in all", graph.index, tokens,
                 reason, "symbolic" if graph.token_symbols else "static",
                 f", also symbolic: {', '.join(others)}" if others else "", len(self.graphs))
        log.debug("graph %d: %d nodes", graph.index, len(gm.graph.nodes))
        return graph

    def _add_split_points(self, graph: RangeGraph) -> None:
        ctx = PassContext(post_grad_graph=graph.post_grad_graph)
        wanted = {p for pass_ in self.policy.passes for p in pass_.split_points(graph.gm, ctx)}
        usable = {p for p in wanted if 1 <= p < self.max_num_tokens}
        late = usable - self.final_split_points if self.final_split_points is not None else set()
        if late:
            log.warning("a graph traced after the ranges became final asks for split points %s; ranges stay as they "
                        "are (passes still only apply where they pay)", sorted(late))
        self.split_points |= usable

    def compile_graph(self, graph: RangeGraph, inputs: list, r: Range, symbolic: bool) -> tuple[Callable, CompileRecord]:
        passes = self.policy.passes_for(r)
        if graph.records_grad:
            passes = self._passes_recording_gradients(graph, passes, r)
        shape_env, token_symbol = (graph.shape_env, graph.token_symbol) if symbolic else (None, None)
        ctx = PassContext(range=r, post_grad_graph=graph.post_grad_graph,
                          size_hints=torch_internals.size_hints(shape_env) if shape_env is not None else {})
        pipeline = RangePassPipeline(passes, ctx, previous=torch_internals.post_grad_custom_post_pass(),
                                     bounds=lambda: _range_bounds(shape_env, token_symbol, r))
        hits_before = torch_internals.fx_graph_cache_hits()
        start = time.perf_counter()
        options = {"post_grad_custom_post_pass": pipeline, **self.policy.inductor_options(r)}
        with torch_internals.inductor_config_patch(**options), torch_internals.generated_code() as code:
            fn = _compile_fx(graph.gm, inputs, symbolic)
        seconds = time.perf_counter() - start
        cache_hit = torch_internals.fx_graph_cache_hits() > hits_before
        return fn, CompileRecord(round(seconds, 2), [p.name for p in passes], _matches(pipeline, code), cache_hit)

    @staticmethod
    def _passes_recording_gradients(graph: RangeGraph, passes: list[GraphPass], r: Range) -> list[GraphPass]:
        """A graph that records gradients cannot take passes whose ops have no backward. Where such a
        pass replaces the model's collectives, every rank must make the same choice, and grad mode is
        each rank's own: the call is refused rather than letting ranks run different collectives."""
        collective = [p.name for p in passes if p.replaces_collectives]
        if collective:
            raise GradientsUnsupportedError(
                f"range {r} runs {', '.join(collective)}, which replaces the model's collectives and has no backward; "
                f"this call records gradients (grad mode on, parameters that require grad). Call the model under "
                f"torch.no_grad() or torch.inference_mode(), or set fusion.enabled=false to keep the model's own "
                f"collectives in every range")
        skipped = [p.name for p in passes if p.inference_only]
        if skipped:
            log.info("graph %d records gradients (grad mode on, parameters require grad): %s stay(s) off in %s; call "
                     "the model under torch.no_grad() or torch.inference_mode() to apply them", graph.index,
                     ", ".join(skipped), r)
        return [p for p in passes if not p.inference_only]

    @staticmethod
    def capture_post_grad_graph(graph: RangeGraph) -> Optional[torch.fx.Graph]:
        """The graph Inductor's post-grad passes leave for ``graph`` (caches off, compile stopped
        there): what every range's passes will see, before any range is compiled."""
        capture = _CapturePostGrad()
        try:
            with torch_internals.inductor_config_patch(post_grad_custom_post_pass=capture), \
                    torch_internals.caches_off():
                _compile_fx(graph.gm, graph.fakes, symbolic=True)
        except Exception as e:  # the capture stops the compile with an exception (Inductor may wrap it)
            if capture.graph is None:
                log.info("graph %d: no post-grad graph to read collectives from (%s: %s)", graph.index,
                         type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return capture.graph
