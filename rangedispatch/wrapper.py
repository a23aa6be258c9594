"""RangeCompiledModule: one trace, one compiled graph per token-count range, dispatch per call."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx
from torch import nn

from rangedispatch import guardless
from rangedispatch.cudagraphs import CudaGraphRunner, resize_tokens
from rangedispatch.config import RangeDispatchConfig, load_config, to_schema
from rangedispatch.errors import NotTracedError, OutOfRangeError
from rangedispatch.graph_cache import TRACING, CompilePolicy, GraphCache
from rangedispatch.guardless import TraceSignature
from rangedispatch.passes import GraphPass
from rangedispatch.ranges import Range, RangeTable
from rangedispatch.token_count import TokenCounter

log = logging.getLogger("rangedispatch")


class RangeCompiledModule(nn.Module):
    """Wraps ``model``; calls look like the model's. Ranges become final when the first call (or
    ``warmup``) traces the model; each range compiles on its first call.

    ``passes`` adds graph passes to those the config enables (fusion). Calling the wrapper skips
    ``nn.Module``'s hook machinery (the dispatch path runs on every call); hooks registered on the
    wrapped model are traced as usual.
    """

    def __init__(self, model: nn.Module, cfg: Any = None, passes: Sequence[GraphPass] = ()):
        super().__init__()
        self.module = model
        self.config: RangeDispatchConfig = to_schema(cfg) if cfg is not None else load_config()
        d = self.config.dispatch
        self._counter = TokenCounter(model.forward, d.token_arg, d.token_dims)
        self.passes: list[GraphPass] = [*_config_passes(self.config), *passes]
        self._pass_split_points: set[int] = set()
        self._table: Optional[RangeTable] = None
        self._calls: dict[Range, int] = {}
        self._extra_sizes: list[int] = []
        self._trace_lock = threading.Lock()
        policy = CompilePolicy(passes_for=self._passes_for, max_autotune_for=self._max_autotune_for)
        self._graphs = GraphCache(policy, on_new_graph=self._on_new_graph)
        self._state = self._graphs.state
        self._guardless: Optional[guardless.GuardlessForward] = None
        self._call: Optional[Callable] = None  # the per-call path, built once the model is traced
        self._signature: Optional[TraceSignature] = None
        _reserve_dynamo_entries()
        self._cudagraphs: Optional[CudaGraphRunner] = (
            CudaGraphRunner(d.cudagraph_sizes, d.token_dims[0], self._run_for_capture) if d.cudagraph_sizes else None
        )
        object.__setattr__(self, "_model", model)  # `self.module` goes through nn.Module.__getattr__: slow
        # not registered as a submodule: the state dict stays that of `module`
        # dynamic=False: only the token dims marked at trace time are dynamic. Dynamo would otherwise
        # make any dim dynamic that changed between traces of the same forward code (another wrapper
        # of the same class with another hidden size), and a symbolic hidden size disables fusion.
        object.__setattr__(self, "_compiled", torch.compile(model, backend=self._graphs.backend, dynamic=False))

    # ----------------------------------------------------------------------------- hot path
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = self._call
        if call is None:
            return self._trace_call(args, kwargs)
        return call(args, kwargs)

    forward = __call__

    def _build_call_path(self) -> None:
        """After tracing: the per-call path, as closures over everything it reads. It runs on every
        forward call, so it does no attribute lookups on self (each costs more than a dict hit).
        Without guards, a compiled range runs Dynamo's bytecode bound to that range's artifact; the
        first call of a range (which compiles it) goes through the graph's range dispatch."""
        read, lookup, calls = self._counter.read, self._table.lookup, self._calls
        state, model, compiled, graphs = self._state, self._model, self._compiled, self._cudagraphs
        guardless_fwd = self._guardless
        fast = guardless_fwd.generic if guardless_fwd is not None else None
        matches = self._signature.matches if guardless_fwd is not None else None
        graph = self._graphs.graphs[0] if guardless_fwd is not None else None
        direct: dict[Range, Callable] = {}  # range -> guardless forward calling its artifact
        out_of_range = self._out_of_range

        def run(r: Range, x: Any, fast_ok: bool, args: tuple, kwargs: dict) -> Any:
            state.range = r
            try:
                if fast_ok and matches is not None and matches(x, model):
                    out = fast(model, *args, **kwargs)
                    if r in graph.artifacts:
                        direct[r] = guardless_fwd.for_artifact(graph.artifacts[r])
                    return out
                return compiled(*args, **kwargs)
            finally:
                state.range = None

        def call(args: tuple, kwargs: dict) -> Any:
            x, n, fast_ok = read(args, kwargs)
            r = lookup(n)
            if r is None:
                return out_of_range(n, args, kwargs)
            calls[r] += 1
            if graphs is not None:
                s = graphs.size_for(r, n)
                if s is not None:
                    return graphs.replay(r, s, n, x, args, kwargs)
            f = direct.get(r)
            if f is not None and fast_ok and matches(x, model):
                return f(model, *args, **kwargs)
            return run(r, x, fast_ok, args, kwargs)

        self._run, self._call = run, call

    def _run_for_capture(self, r: Range, args: tuple, kwargs: dict) -> Any:
        x, _, fast_ok = self._counter.read(args, kwargs)
        return self._run(r, x, fast_ok, args, kwargs)

    # ----------------------------------------------------------------------------- public API
    @property
    def ranges(self) -> list[Range]:
        """The ranges in order; before the model is traced, those the config alone gives."""
        if self._table is not None:
            return self._table.ranges
        d = self.config.dispatch
        return RangeTable(d.split_points, d.compile_sizes, d.max_num_tokens).ranges

    @property
    def graphs(self) -> list:
        """The graphs Dynamo produced (more than one after graph breaks), each a ``RangeGraph``."""
        return list(self._graphs.graphs)

    def range_for(self, num_tokens: int) -> Optional[Range]:
        table = self._require_table("range_for()")
        return table.lookup(num_tokens)

    def stats(self) -> dict[Range, dict[str, Any]]:
        """Per range: compiled?, calls, compile seconds, passes applied and matches per pass (summed
        over the model's graphs)."""
        table = self._table
        ranges = table.ranges if table is not None else self.ranges
        out = {}
        for r in ranges:
            records = [g.records[r] for g in self._graphs.graphs if r in g.records]
            matches: dict[str, int] = {}
            for rec in records:
                for name, count in rec.matches.items():
                    matches[name] = matches.get(name, 0) + count
            out[r] = {
                "compiled": bool(records),
                "calls": self._calls.get(r, 0),
                "compile_s": sum(rec.seconds for rec in records),
                "passes": [p.name for p in self._passes_for(r)],
                "matches": matches,
                "cache_hits": sum(rec.cache_hit for rec in records),
                "extra": r.is_single_size and r.start in self._extra_sizes,
                "cudagraphs": sorted(s for s in (self._cudagraphs.captured if self._cudagraphs else ()) if s in r),
            }
        return out

    def warmup(self, *args: Any, **kwargs: Any) -> "RangeCompiledModule":
        """Compile every range now. The first time, pass example inputs (any size in range): they
        trace the model."""
        if self._table is None:
            if not args and not kwargs:
                raise NotTracedError("warmup() needs example inputs the first time: warmup(x) traces the model")
            self._trace_call(args, kwargs)
        for r in self._table.ranges:
            for g in self._graphs.graphs:
                if not g.is_symbolic and g.traced_at is not None and g.traced_at not in r:
                    continue  # a static graph only ever runs at the size it was traced at
                if not g.can_compile_without_inputs(r):
                    log.info("warmup: graph %d has several symbolic sizes; %s compiles on its first call", g.index, r)
                    continue
                g.compile(r)
        if self._cudagraphs is not None:
            self._capture_all(args, kwargs)
        return self

    def _capture_all(self, args: tuple, kwargs: dict) -> None:
        """Capture every CUDA graph, largest first (they share one memory pool)."""
        if not args and not kwargs:
            log.info("warmup: no example inputs, CUDA graphs are captured on first use")
            return
        x, n, _ = self._counter.read(args, kwargs)
        dim = self.config.dispatch.token_dims[0] % x.dim()
        for s in sorted(self._cudagraphs.sizes, reverse=True):
            r = self._table.lookup(s)
            if r is None or s in self._cudagraphs.captured:
                continue
            s_args, s_kwargs = resize_tokens(args, kwargs, dim, n, s)
            sx = self._counter.token_input(s_args, s_kwargs)
            self._cudagraphs.capture(r, s, sx, s_args, s_kwargs)

    # ----------------------------------------------------------------------------- internals
    def _passes_for(self, r: Range) -> list[GraphPass]:
        return [p for p in self.passes if p.applies(r)]

    def _max_autotune_for(self, r: Range) -> bool:
        mode = self.config.compile.max_autotune
        return mode == "always" or (mode == "single_sizes" and r.is_single_size)

    def _on_new_graph(self, gm: torch.fx.GraphModule) -> None:
        wanted = {p for ps in (ps.split_points(gm) for ps in self.passes) for p in ps}
        max_n = self.config.dispatch.max_num_tokens
        usable = {p for p in wanted if 1 <= p < max_n}
        if self._table is not None and usable - set(self._table.split_points):
            log.warning(
                "a graph traced after the ranges became final asks for split points %s; ranges stay %s "
                "(passes still only apply where they pay)", sorted(usable - set(self._table.split_points)),
                self._table.ranges,
            )
        self._pass_split_points |= usable

    def _trace_call(self, args: tuple, kwargs: dict) -> Any:
        with self._trace_lock:
            if self._table is not None:
                return self(*args, **kwargs)
            x = self._counter.check(args, kwargs)
            n = self._counter(args, kwargs)
            d = self.config.dispatch
            if not 1 <= n <= d.max_num_tokens and d.out_of_range != "compile":
                return self._out_of_range(n, args, kwargs)
            self._mark_token_dims_dynamic(x, args, kwargs)
            self._graphs.traced_at = n
            self._state.range = TRACING
            try:
                with guardless.recording(self._model.forward) as codes:
                    out = self._compiled(*args, **kwargs)
            finally:
                self._state.range = None
            self._finalize_ranges()
            if self.config.dispatch.skip_dynamo_guards:
                self._guardless = guardless.guardless_forward(self._model.forward, codes)
                self._signature = guardless.TraceSignature(x, self._model)
                log.info("Dynamo guards: %s", "skipped after tracing (dispatch.skip_dynamo_guards)"
                         if self._guardless else "kept (graph breaks or no single transformed forward)")
            self._build_call_path()
            r = self._table.lookup(n)
            if r is not None:
                self._calls[r] += 1
            return out

    def _mark_token_dims_dynamic(self, x: torch.Tensor, args: tuple, kwargs: dict) -> None:
        """The token dims of the token input are dynamic (bounded by max_num_tokens unless calls
        beyond it compile on demand). Other inputs of the same size in those dims are marked
        "maybe" dynamic: the graph may force them equal (``x + residual``)."""
        d = self.config.dispatch
        bound = None if d.out_of_range == "compile" else d.max_num_tokens
        dims = [dim % x.dim() for dim in d.token_dims]
        for dim in dims:
            if x.shape[dim] >= 2:
                torch._dynamo.mark_dynamic(x, dim, **({"min": 2, "max": bound} if bound else {}))
        for t in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t is not x and not isinstance(t, nn.Parameter):
                for dim in dims:
                    if dim < t.dim() and t.shape[dim] == x.shape[dim] and t.shape[dim] >= 2:
                        torch._dynamo.maybe_mark_dynamic(t, dim)

    def _finalize_ranges(self) -> None:
        d = self.config.dispatch
        points = set(d.split_points) | self._pass_split_points
        table = RangeTable(points, [*d.compile_sizes, *self._extra_sizes], d.max_num_tokens)
        self._calls = {r: 0 for r in table.ranges}
        added = sorted(self._pass_split_points - set(d.split_points))
        log.info("ranges: %s%s", " ".join(map(str, table.ranges)),
                 f" (split points added by passes: {added})" if added else "")
        self._table = table

    def _out_of_range(self, n: int, args: tuple, kwargs: dict) -> Any:
        d = self.config.dispatch
        mode = d.out_of_range
        if mode == "compile" and n >= 1 and self._table is not None:
            if len(self._extra_sizes) >= d.max_extra_sizes:
                raise OutOfRangeError(
                    f"{n} tokens is outside [1, {d.max_num_tokens}] and dispatch.max_extra_sizes="
                    f"{d.max_extra_sizes} single-size graphs were already added ({self._extra_sizes}); "
                    "raise dispatch.max_num_tokens or dispatch.max_extra_sizes"
                )
            self._extra_sizes.append(n)
            r = self._table.add_single_size(n)
            self._calls[r] = 0
            log.info("dispatch.out_of_range=compile: added single-size range %s", r)
            return self(*args, **kwargs)
        if mode == "error" or (mode == "compile" and n >= 1):
            raise OutOfRangeError(
                f"{n} tokens is outside the compiled ranges [1, {d.max_num_tokens}] "
                f"(dispatch.max_num_tokens); dispatch.out_of_range=error. Allowed: 1..{d.max_num_tokens}, "
                "or set dispatch.out_of_range to eager or compile"
            )
        log.debug("%d tokens is outside [1, %d]: running the module eagerly", n, d.max_num_tokens)
        return self.module(*args, **kwargs)

    def _require_table(self, what: str) -> RangeTable:
        if self._table is None:
            raise NotTracedError(f"{what} needs the traced model: call the module or warmup(example_inputs) first")
        return self._table


ENTRIES_PER_WRAPPER = 4  # the symbolic trace, the 1-token trace, and room for a dtype change


def _reserve_dynamo_entries() -> None:
    """Dynamo's recompile limit counts cache entries per code object, across all torch.compile
    wrappers: with a few wrapped instances of one model class, later ones would silently run eager.
    Each wrapper raises the limit by the entries it may need."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = cfg.recompile_limit + ENTRIES_PER_WRAPPER
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, cfg.recompile_limit)


def _config_passes(cfg: RangeDispatchConfig) -> list[GraphPass]:
    """The passes the config turns on (the fusion pass, when enabled)."""
    if not cfg.fusion.enabled:
        return []
    from rangedispatch.fusion import build_fusion_passes

    return build_fusion_passes(cfg)
