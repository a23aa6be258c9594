"""RangeCompiledModule: one trace, one compiled graph per token-count range, dispatch per call.

Read top to bottom, this file is the lifecycle of a wrapped model:

1. construct: the config gives split points; the wrapper gets its own Dynamo entry point;
2. trace: the first call runs under Dynamo, token dims symbolic; every traced graph becomes a
   ``RangeGraph`` and the passes read their split points off it;
3. finalize: the config's and the passes' split points become the final ranges;
4. per-range compile: each ``RangeGraph`` compiles a range on the first call that needs it
   (``graph_cache.py``), with the passes that apply to that range;
5. dispatch: every call counts its tokens, looks up its range and runs through Dynamo's guards
   (or, opted in, the guard-free path) into that range's artifact.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from rangedispatch import dynamic_dims, guardless, hosts, logs
from rangedispatch.config import RangeDispatchConfig, load_config, to_schema
from rangedispatch.cudagraphs import CudaGraphRunner, resize_tokens
from rangedispatch.errors import ConfigError, NotTracedError, OutOfRangeError
from rangedispatch.graph_cache import CompilePolicy, RangeCompiler, compile_lock
from rangedispatch.passes import GraphPass
from rangedispatch.ranges import Range, RangeTable
from rangedispatch.token_count import TokenCounter

log = logging.getLogger("rangedispatch")


class RangeCompiledModule(nn.Module):
    """Wraps ``model``; calls look like the model's. Ranges become final when the first call (or
    ``warmup``) traces the model; each range compiles on its first call.

    ``passes`` adds graph passes to those the config enables (fusion). Calling the wrapper skips
    ``nn.Module``'s hook machinery (the dispatch path runs on every call); hooks registered on the
    wrapped model run as usual.
    """

    # ------------------------------------------------------------------ 1. construct
    def __init__(self, model: nn.Module, cfg: Any = None, passes: Sequence[GraphPass] = ()):
        super().__init__()
        logs.configure_from_env()
        self.module = model
        self.config: RangeDispatchConfig = to_schema(cfg) if cfg is not None else load_config()
        d = self.config.dispatch
        self._counter = TokenCounter(model.forward, d.token_arg, d.token_dims)
        self.passes: list[GraphPass] = [*_config_passes(self.config), *passes]
        self._table: Optional[RangeTable] = None
        self._calls: dict[Range, int] = {}
        self._extra_sizes: list[int] = []
        self._warned: set[str] = set()
        self._compiler = RangeCompiler(CompilePolicy(self.passes, self.config.compile.max_autotune,
                                                     self.config.compile.max_autotune_gemm), d.max_num_tokens,
                                       tokens_now=self._pending_tokens)
        self._state = self._compiler.state
        self._lock = compile_lock()
        self._cudagraphs: Optional[CudaGraphRunner] = None
        self._guard_free: Optional[_GuardFree] = None
        self._call: Optional[Callable] = None  # the per-call path, built once the model is traced
        object.__setattr__(self, "_model", model)  # `self.module` goes through nn.Module.__getattr__: slow
        # Our own entry function (own Dynamo cache entries and recompile limit), not registered as a
        # submodule: the state dict stays that of `module`. dynamic=False: only the token dims that
        # dynamic_dims marks are symbolic; a symbolic hidden size would disable fusion.
        self._entry, self._entry_codes = guardless.make_entry(self, model)
        object.__setattr__(self, "_compiled", torch.compile(self._entry, backend=self._compiler.backend, dynamic=False))
        dynamic_dims.install()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = self._call
        if call is None:
            return self._trace_call(args, kwargs)
        return call(args, kwargs)

    forward = __call__

    # ------------------------------------------------------------------ 2. trace (first call)
    def _trace_call(self, args: tuple, kwargs: dict) -> Any:
        with compile_lock():
            if self._table is not None:  # another thread traced first
                return self(*args, **kwargs)
            self._counter.check(args, kwargs)
            hosts.exchange()  # a collective, once per process: every rank makes its first call
            self._run_guarded = self._guarded_runner()
            x, n, all_dims_above_one = self._counter.read(args, kwargs)
            d = self.config.dispatch
            if n < 1 or (n > d.max_num_tokens and d.out_of_range != "compile"):
                return self._out_of_range(n, args, kwargs)  # nothing is traced from an empty call
            if d.cudagraph_sizes:
                self._cudagraphs = self._make_cudagraphs(x)
            # r=None: the graphs run as traced, since ranges are not final yet
            if d.skip_dynamo_guards:
                self._guard_free = _GuardFree()
            if d.skip_dynamo_guards and all_dims_above_one:
                out = self._run_and_learn_guard_free(None, x, args, kwargs)
            else:
                out = self._run_guarded(None, x, args, kwargs)
            self._finalize_ranges()
            self._build_call_path()
            r = self._table.lookup(n)
            if r is not None:
                self._calls[r] += 1
            return out

    def _pending_tokens(self) -> Optional[int]:
        """Token count of the call Dynamo is tracing on this thread (for the graph's record)."""
        call = dynamic_dims.call_in_progress()
        return self._counter(call[2], call[3]) if call is not None else None

    # ------------------------------------------------------------------ 3. finalize ranges
    def _finalize_ranges(self) -> None:
        d = self.config.dispatch
        from_passes = self._compiler.split_points
        points = set(d.split_points) | from_passes
        table = RangeTable(points, [*self.config.compile_sizes, *self._extra_sizes], d.max_num_tokens)
        self._calls = {r: 0 for r in table.ranges}
        added = sorted(from_passes - set(d.split_points))
        passes = [f"{r} {'+'.join(p.name for p in ps)}" for r in table.ranges
                  if (ps := self._compiler.policy.passes_for(r))]
        log.info("ranges: %s%s%s", " ".join(map(str, table.ranges)),
                 f" (split points added by passes: {added})" if added else "",
                 f"; passes: {', '.join(passes)}" if passes else "")
        self._table = table
        self._compiler.final_split_points = set(table.split_points)

    # ------------------------------------------------------------------ 4. per-range compile
    # A range compiles on the first call that needs it (RangeGraph.compile, graph_cache.py), with
    # the passes that apply to it; warmup() compiles every range now.
    def warmup(self, *args: Any, **kwargs: Any) -> "RangeCompiledModule":
        """Compile every range now. The first time, pass example inputs (any size in range): they
        trace the model. An example with a token dim of size 1 is also run at size 2 there, so that
        the graph for larger calls exists too."""
        if self._table is None:
            if not args and not kwargs:
                raise NotTracedError("warmup() needs example inputs the first time: warmup(x) traces the model")
            self._trace_call(args, kwargs)
        if args or kwargs:
            x = self._counter.token_input(args, kwargs)
            size_one = [dim for dim in self._counter.dims if x.shape[dim] == 1]
            for dim in size_one:
                args, kwargs = resize_tokens(args, kwargs, dim, 1, 2)
            if size_one:
                self(*args, **kwargs)
        for r in self._table.ranges:
            for g in self._compiler.graphs:
                if not g.is_symbolic and g.traced_at is not None and g.traced_at not in r:
                    continue  # a static graph only ever runs at the size it was traced at
                g.compile(r)
        if self._cudagraphs is not None:
            self._capture_all(args, kwargs)
        return self

    # ------------------------------------------------------------------ 5. dispatch
    def _build_call_path(self) -> None:
        """After tracing: the per-call path, as a closure over everything it reads. It runs on every
        forward call, so it does no attribute lookups on self (each costs more than a dict hit)."""
        read, lookup, calls = self._counter.read, self._table.lookup, self._calls
        cudagraphs, guard_free, model = self._cudagraphs, self._guard_free, self._model
        run_guarded, out_of_range = self._run_guarded, self._out_of_range

        def call(args: tuple, kwargs: dict) -> Any:
            x, n, all_dims_above_one = read(args, kwargs)
            r = lookup(n)
            if r is None:
                return out_of_range(n, args, kwargs)
            if cudagraphs is not None:
                s = cudagraphs.size_for(r, n)
                if s is not None:
                    out = cudagraphs.replay(r, s, n, x, args, kwargs)
                    if out is not cudagraphs.MISMATCH:
                        calls[r] += 1
                        return out
            if guard_free is not None and all_dims_above_one:
                signature = guard_free.signature
                if signature is not None and signature.accepts(x, args, kwargs, model):
                    out = guard_free.run(r, model, args, kwargs)
                else:
                    out = self._run_and_learn_guard_free(r, x, args, kwargs)
            else:
                out = run_guarded(r, x, args, kwargs)
            calls[r] += 1
            return out

        self._call = call

    def _guarded_runner(self) -> Callable[[Optional[Range], torch.Tensor, tuple, dict], Any]:
        """``run(r, x, args, kwargs)``: through Dynamo's guards into range ``r``'s graphs (``None``:
        the tracing call, whose graphs run as traced). It holds the process-wide compile lock
        (Dynamo refuses to run while another thread traces: FX's tracing flag is global), which
        also makes the call state one per process. Any Dynamo compile the call starts finds
        ``x``, ``args``, ``kwargs`` and ``wrapper`` in this frame and marks the token dims dynamic.
        A closure: it runs on every guarded call."""
        state, lock, compiled, model, wrapper = self._state, self._lock, self._compiled, self._model, self

        def run(r: Optional[Range], x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
            with lock:
                state.range = r
                runs = state.graph_runs
                try:
                    out = compiled(model, *args, **kwargs)
                finally:
                    state.range = None
                if state.graph_runs == runs:
                    wrapper._said_eager(r, args, kwargs)
            return out

        dynamic_dims.register_call_site(run)
        return run

    def _said_eager(self, r: Optional[Range], args: tuple, kwargs: dict) -> None:
        self._warn_once(
            "eager", "a call of %d tokens (range %s) ran eagerly: Dynamo ran no compiled graph for it "
            "(torch._dynamo.config.recompile_limit=%d reached for this wrapper, or the frame was skipped); "
            "TORCH_LOGS=recompiles shows which guard failed", self._counter(args, kwargs), r,
            torch._dynamo.config.recompile_limit)

    def _run_and_learn_guard_free(self, r: Optional[Range], x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        """The guarded path; the first such call that traces one whole graph for token dims >= 2
        gives the guard-free path its bytecode and the signature calls must match to use it."""
        guard_free = self._guard_free
        codes_before, graphs_before = len(self._entry_codes), len(self._compiler.graphs)
        out = self._run_guarded(r, x, args, kwargs)
        if guard_free.signature is None and guard_free.reason is None:
            new_codes, new_graphs = self._entry_codes[codes_before:], self._compiler.graphs[graphs_before:]
            if len(new_codes) == 1 and len(new_graphs) == 1:
                forward = guardless.guardless_forward(self._entry, new_codes[0])
                signature = guardless.CallSignature(x, self._counter.dims, args, kwargs, self._model)
                reason = ("the trace has graph breaks or resumes" if forward is None else signature.reason)
                if reason is not None:
                    guard_free.reason = reason
                    log.info("dispatch.skip_dynamo_guards: every call keeps Dynamo's guards: %s", reason)
                else:
                    guard_free.learn(forward, new_graphs[0], signature, self._state)
                    log.info("dispatch.skip_dynamo_guards: calls like this one now skip Dynamo's guards")
        return out

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
        self._warn_once("out_of_range", "%d tokens is outside the compiled ranges [1, %d] (dispatch.out_of_range=%s): "
                        "running the module eagerly (said once)", n, d.max_num_tokens, mode,
                        level=logging.INFO if mode == "eager" else logging.WARNING)
        return self._model(*args, **kwargs)

    # ------------------------------------------------------------------ CUDA graphs
    def _make_cudagraphs(self, x: torch.Tensor) -> CudaGraphRunner:
        d = self.config.dispatch
        dims = self._counter.dims
        if len(dims) != 1:
            raise ConfigError(
                f"dispatch.cudagraph_sizes={d.cudagraph_sizes} needs a single token dim; dispatch.token_dim="
                f"{d.token_dim} gives {dims} for the token input of shape {tuple(x.shape)}: set dispatch.token_dim")
        return CudaGraphRunner(d.cudagraph_sizes, dims[0], self._run_for_capture)

    def _run_for_capture(self, r: Range, args: tuple, kwargs: dict) -> Any:
        x = self._counter.token_input(args, kwargs)
        return self._run_guarded(r, x, args, kwargs)

    def _capture_all(self, args: tuple, kwargs: dict) -> None:
        """Capture every CUDA graph, largest first (they share one memory pool)."""
        if not args and not kwargs:
            log.info("warmup: no example inputs, CUDA graphs are captured on first use")
            return
        x, n, _ = self._counter.read(args, kwargs)
        dim = self._counter.dims[0]
        for s in sorted(self._cudagraphs.sizes, reverse=True):
            r = self._table.lookup(s)
            if r is None or s in self._cudagraphs.captured:
                continue
            s_args, s_kwargs = resize_tokens(args, kwargs, dim, n, s)
            sx = self._counter.token_input(s_args, s_kwargs)
            self._cudagraphs.capture(r, s, sx, s_args, s_kwargs)

    # ------------------------------------------------------------------ inspection
    @property
    def ranges(self) -> list[Range]:
        """The ranges in order; before the model is traced, those the config alone gives."""
        if self._table is not None:
            return self._table.ranges
        d = self.config.dispatch
        return RangeTable(d.split_points, self.config.compile_sizes, d.max_num_tokens).ranges

    @property
    def graphs(self) -> list:
        """The graphs Dynamo produced, each a ``RangeGraph``: one per graph break and one per guard
        set (a size-1 token dim, other keyword arguments, other dtypes)."""
        return list(self._compiler.graphs)

    def range_for(self, num_tokens: int) -> Optional[Range]:
        if self._table is None:
            raise NotTracedError("range_for() needs the traced model: call the module or warmup(example_inputs) first")
        return self._table.lookup(num_tokens)

    def stats(self) -> dict[Range, dict[str, Any]]:
        """Per range: compiled?, calls that returned, compile seconds, passes applied and matches
        per pass (summed over the model's graphs: ``graphs[i].records[r].matches`` has them per graph)."""
        table = self._table
        ranges = table.ranges if table is not None else self.ranges
        out = {}
        for r in ranges:
            records = [g.records[r] for g in self._compiler.graphs if r in g.records]
            matches: dict[str, int] = {}
            for rec in records:
                for name, count in rec.matches.items():
                    matches[name] = matches.get(name, 0) + count
            out[r] = {
                "compiled": bool(records),
                "calls": self._calls.get(r, 0),
                "compile_s": sum(rec.seconds for rec in records),
                "passes": _applied_passes(records) if records else [p.name for p in self._compiler.policy.passes_for(r)],
                "matches": matches,
                "cache_hits": sum(rec.cache_hit for rec in records),
                "extra": r.is_single_size and r.start in self._extra_sizes,
                "cudagraphs": sorted(s for s in (self._cudagraphs.captured if self._cudagraphs else ()) if s in r),
            }
        return out

    def _warn_once(self, key: str, msg: str, *args: Any, level: int = logging.WARNING) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.log(level, msg, *args)


class _GuardFree:
    """The opt-in guard-free path (``dispatch.skip_dynamo_guards``), learned from one guarded call:
    Dynamo's transformed entry bytecode, bound per range to that range's artifact."""

    def __init__(self) -> None:
        self.signature: Optional[guardless.CallSignature] = None
        self.reason: Optional[str] = None
        self.forward: Optional[guardless.GuardlessForward] = None
        self.graph: Any = None
        self.state: Any = None
        self.lock = compile_lock()
        self.bound: dict[Range, Callable] = {}  # range -> bytecode calling its artifact directly

    def learn(self, forward: guardless.GuardlessForward, graph: Any, signature: guardless.CallSignature,
              state: Any) -> None:
        self.forward, self.graph, self.state = forward, graph, state
        self.signature = signature

    def run(self, r: Range, model: nn.Module, args: tuple, kwargs: dict) -> Any:
        f = self.bound.get(r)
        if f is not None:
            return f(model, *args, **kwargs)
        state = self.state
        with self.lock:
            state.range = r
            try:  # compiles r through the graph's own dispatch, then binds its artifact
                out = self.forward.generic(model, *args, **kwargs)
            finally:
                state.range = None
        artifact = self.graph.artifacts.get(r)
        if artifact is not None:
            self.bound[r] = self.forward.for_artifact(artifact)
        return out


def _applied_passes(records: list) -> list[str]:
    """The passes the range's compiles applied, in order (graphs that record gradients skip some)."""
    return list(dict.fromkeys(name for rec in records for name in rec.passes))


def _config_passes(cfg: RangeDispatchConfig) -> list[GraphPass]:
    """The passes the config turns on: the all-reduce tiers (fusion.enabled) and the skinny GEMM of
    the decode ranges (where the hardware profile gives it a token limit)."""
    passes: list[GraphPass] = []
    if cfg.fusion.enabled:
        from rangedispatch.fusion import build_fusion_passes

        passes += build_fusion_passes(cfg)
    if cfg.skinny_gemm_tokens:
        from rangedispatch.gemm.skinny_gemm_pass import SkinnyGemm

        passes.append(SkinnyGemm(cfg.skinny_gemm_tokens, cfg.compile.skinny_gemm))
    return passes
