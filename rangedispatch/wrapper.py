"""RangeCompiledModule: one trace, one compiled graph per token-count range, dispatch per call.

Read top to bottom, this file is the lifecycle of a wrapped model:

1. construct: the config gives split points; the wrapper gets its own Dynamo entry point;
2. trace: the first call runs under Dynamo, token dims symbolic; every traced graph becomes a
   ``RangeGraph`` and the passes read their split points off it;
3. finalize: the config's and the passes' split points become the final ranges;
4. per-range compile: each ``RangeGraph`` compiles a range on the first call that needs it
   (``graph_cache.py``), with the passes that apply to that range;
5. dispatch: every call counts its tokens, looks up its range and runs through Dynamo's guards
   (or, opted in, the guard-free path, or a captured CUDA graph) into that range's artifact.

Around the call, the program is left as it would be without the wrapper: hooks on the wrapped
model (and on the wrapper) run as in eager, outside the compiled region; grad mode is the call's;
an outer ``torch.compile`` that traces into the wrapper gets the plain model; threads run compiled
calls concurrently; copies and pickles of the wrapper are new, untraced wrappers.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from rangedispatch import dynamic_dims, guardless, logs, torch_internals
from rangedispatch.config import RangeDispatchConfig, load_config, to_schema
from rangedispatch.cudagraphs import CudaGraphRunner, resize_tokens, stateful_leaves
from rangedispatch.errors import NotTracedError, OutOfRangeError
from rangedispatch.graph_cache import CompilePolicy, RangeCompiler, compile_lock
from rangedispatch.passes import GraphPass
from rangedispatch.ranges import Range, RangeTable
from rangedispatch.token_count import TokenCounter

log = logging.getLogger("rangedispatch")


class RangeCompiledModule(nn.Module):
    """Wraps ``model``; calls look like the model's. Ranges become final when the first call (or
    ``warmup``) traces the model; each range compiles on its first call after that.

    ``passes`` adds graph passes to those the config enables (fusion). Hooks registered on the
    wrapped model or on the wrapper run as in eager, around the compiled call (hooks registered on
    submodules are traced with them, as ``torch.compile`` does: ones added after a trace go
    unnoticed). Attributes the wrapper lacks are read from the wrapped model. Its state dict is the
    model's, keys unchanged: a model that holds a wrapper saves and loads as it would without it.
    """

    # ------------------------------------------------------------------ 1. construct
    def __init__(self, model: nn.Module, cfg: Any = None, passes: Sequence[GraphPass] = ()):
        super().__init__()
        logs.configure_from_env()
        self.module = model
        self.register_state_dict_post_hook(_state_dict_of_the_model)
        self.register_load_state_dict_pre_hook(_load_as_the_model)
        self.config: RangeDispatchConfig = to_schema(cfg) if cfg is not None else load_config()
        self.extra_passes: list[GraphPass] = list(passes)
        d = self.config.dispatch
        self._counter = TokenCounter(model.forward, d.token_arg, d.token_dims)
        self.passes: list[GraphPass] = [*_config_passes(self.config), *passes]
        self._table: Optional[RangeTable] = None
        self._calls: dict[Range, int] = {}
        self._extra_sizes: list[int] = []
        self._warned: set[str] = set()
        self._compiler = RangeCompiler(CompilePolicy(self.passes, self.config.compile.max_autotune,
                                                     self.config.compile.max_autotune_gemm), d.max_num_tokens,
                                       traced_call=self._traced_call)
        self._state = self._compiler.state
        self._cudagraphs = CudaGraphRunner(d.cudagraph_sizes, self._run_for_capture) if d.cudagraph_sizes else None
        self._guard_free = _GuardFree() if d.skip_dynamo_guards else None
        self._dispatch: Optional[Callable] = None  # the per-call path, built once the model is traced
        self._first_call = threading.RLock()
        self._swap = _ForwardSwap(model, self._dispatch_as_forward)
        object.__setattr__(self, "_model", model)  # `self.module` goes through nn.Module.__getattr__: slow
        object.__setattr__(self, "_forward", model.forward)  # the model's own forward, hooks excluded
        # every hook dict a call must honour: the wrapper's, the model's, the process-wide ones
        self._hook_dicts = (*torch_internals.module_hooks(self), *torch_internals.module_hooks(model),
                            *torch_internals.global_module_hooks())
        # Our own entry function (own Dynamo cache entries and recompile limit), not registered as a
        # submodule: the state dict stays that of `module`. dynamic=None: only the token dims that
        # dynamic_dims marks are symbolic from the start; a dim that changes between calls (a KV
        # cache's length) becomes symbolic by Dynamo's automatic dynamic shapes; a static hidden
        # size keeps fusion possible.
        self._entry, self._entry_codes = guardless.make_entry(self, model)
        object.__setattr__(self, "_compiled", torch.compile(self._entry, backend=self._compiler.backend, dynamic=None))
        dynamic_dims.install()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _traced_by_an_outer_compile():
            torch_internals.at_trace_time(_say_inside_outer_compile)
            return self._model(*args, **kwargs)
        for hooks in self._hook_dicts:
            if hooks:
                return self._call_with_hooks(args, kwargs)
        dispatch = self._dispatch
        if dispatch is None:
            return self._trace_call(args, kwargs)
        return dispatch(args, kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The dispatch, with the wrapped model's hooks (and the process-wide ones) run around it."""
        if _traced_by_an_outer_compile():  # an outer compile (or an outer wrapper)
            torch_internals.at_trace_time(_say_inside_outer_compile)
            return self._model(*args, **kwargs)
        if any(self._hook_dicts[4:]):
            with self._swap:  # the model's own __call__ runs its hooks and calls the dispatch as forward
                return self._model(*args, **kwargs)
        return self._dispatch_as_forward(*args, **kwargs)

    def _call_with_hooks(self, args: tuple, kwargs: dict) -> Any:
        if any(self._hook_dicts[:4]):  # the wrapper's own hooks: nn.Module's call machinery
            return nn.Module.__call__(self, *args, **kwargs)
        return self.forward(*args, **kwargs)

    def _dispatch_as_forward(self, *args: Any, **kwargs: Any) -> Any:
        dispatch = self._dispatch
        return dispatch(args, kwargs) if dispatch is not None else self._trace_call(args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_model")
            if model is None or name.startswith("__"):
                raise
            return getattr(model, name)

    # ------------------------------------------------------------------ 2. trace (first call)
    def _trace_call(self, args: tuple, kwargs: dict) -> Any:
        with self._first_call:
            if self._dispatch is not None:  # another thread traced first
                return self._dispatch(args, kwargs)
            x, n, dims = self._counter.read(args, kwargs)
            if self._cudagraphs is not None:
                self._cudagraphs.check_device(x)
            d = self.config.dispatch
            if n < 1 or (n > d.max_num_tokens and d.out_of_range != "compile"):
                return self._out_of_range(n, args, kwargs)  # nothing is traced from an empty call
            dynamic_dims.install()  # (again, if torch._dynamo.reset() dropped it since construction)
            self._run_guarded = self._guarded_runner()
            # r=None: the graphs run as traced, since ranges are not final yet
            if self._guard_free is not None and min(x.shape[i] for i in dims) >= 2:
                out = self._run_and_learn_guard_free(None, x, dims, args, kwargs)
            else:
                out = self._run_guarded(None, x, dims, args, kwargs)
            self._finalize_ranges()
            self._build_call_path()
            r = self._table.lookup(n)
            if r is not None:
                self._calls[r] += 1
            return out

    def _traced_call(self) -> tuple[Optional[int], list[str]]:
        """For the backend: the token count of the call Dynamo is tracing on this thread, and where
        its token dims are, as the sources Dynamo names them."""
        call = dynamic_dims.active_call.call
        if call is None:
            return None, []
        x, dims, args, kwargs = call
        n = self._counter(args, kwargs)
        where = next((i for i, a in enumerate(args) if a is x), None)
        if where is None:
            where = next((k for k, v in kwargs.items() if v is x), None)
        return n, [torch_internals.input_size_source(where, d) for d in dims] if where is not None else []

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
                 f"; passes: {', '.join(passes)}" if passes else "; no range has passes")
        self._table = table
        self._compiler.final_split_points = set(table.split_points)

    # ------------------------------------------------------------------ 4. per-range compile
    # A range compiles on the first call that needs it (RangeGraph.compile, graph_cache.py), with
    # the passes that apply to it; warmup() compiles every range now.
    def warmup(self, *args: Any, **kwargs: Any) -> "RangeCompiledModule":
        """Compile every range now. The first time, pass example inputs (any size in range): they
        trace the model (the example runs once, like a call). An example with a token dim of size 1
        is also run at size 2, so that the graph for larger calls exists too, unless it holds state
        the model updates (a KV cache), which is never run twice: the first larger call traces that
        graph. CUDA graphs are captured here from stateless examples only."""
        if self._table is None:
            if not args and not kwargs:
                raise NotTracedError("warmup() needs example inputs the first time: warmup(x) traces the model")
            self._trace_call(args, kwargs)
        stateful = stateful_leaves(pytree.tree_leaves((args, kwargs)))
        if stateful:
            log.info("warmup: the example holds a %s, state the model updates: it is not run again; calls with "
                     "other shapes trace on first use%s", type(stateful[0]).__name__,
                     ", and CUDA graphs are captured on first use" if self._cudagraphs is not None else "")
        elif args or kwargs:
            x, _, dims = self._counter.read(args, kwargs)
            size_one = [d for d in dims if x.shape[d] == 1]
            for dim in size_one:
                args, kwargs = resize_tokens(args, kwargs, dim, 1, 2)
            if size_one:
                self(*args, **kwargs)
        for r in self._table.ranges:
            for g in self._compiler.graphs:
                if g.runs_in(r):
                    g.compile(r)
        if self._cudagraphs is not None and not stateful:
            self._capture_all(args, kwargs)
        return self

    # ------------------------------------------------------------------ 5. dispatch
    def _build_call_path(self) -> None:
        """After tracing: the per-call path, as a closure over everything it reads. It runs on every
        forward call, so it does no attribute lookups on self (each costs more than a dict hit)."""
        read, lookup, calls = self._counter.read, self._table.lookup, self._calls
        cudagraphs, guard_free, model = self._cudagraphs, self._guard_free, self._model
        run_guarded, out_of_range = self._run_guarded, self._out_of_range
        mismatch = CudaGraphRunner.MISMATCH

        def call(args: tuple, kwargs: dict) -> Any:
            x, n, dims = read(args, kwargs)
            r = lookup(n)
            if r is None:
                return out_of_range(n, args, kwargs)
            if cudagraphs is not None:
                s = cudagraphs.size_for(r, n)
                if s is not None:
                    out = cudagraphs.replay(r, s, n, x, dims, args, kwargs)
                    if out is not mismatch:
                        calls[r] += 1
                        return out
            if guard_free is not None and (n >= 2 if len(dims) == 1 else min(x.shape[i] for i in dims) >= 2):
                out = guard_free.run(r, x, model, args, kwargs)
                if out is mismatch:
                    out = self._run_and_learn_guard_free(r, x, dims, args, kwargs)
            else:
                out = run_guarded(r, x, dims, args, kwargs)
            calls[r] += 1
            return out

        self._dispatch = call

    def _guarded_runner(self) -> Callable[[Optional[Range], torch.Tensor, tuple, tuple, dict], Any]:
        """``run(r, x, dims, args, kwargs)``: through Dynamo's guards into range ``r``'s graphs
        (``None``: the tracing call, whose graphs run as traced). The call names itself on this
        thread for the graphs (its range) and for any compile it starts (its token dims). No lock is
        held while the model runs; while another thread traces (FX's tracing flag is process-wide
        and Dynamo refuses to run under it), the call waits for Dynamo's compile lock first.
        A closure: it runs on every guarded call."""
        state, compiled, forward, wrapper = self._state, self._compiled, self._forward, self
        active = dynamic_dims.active_call
        fx_tracing, lock = torch_internals.fx_tracing, compile_lock()

        def run(r: Optional[Range], x: torch.Tensor, dims: tuple, args: tuple, kwargs: dict) -> Any:
            previous_call, previous_range = active.call, state.range
            active.call, state.range = (x, dims, args, kwargs), r
            runs = state.graph_runs
            try:
                if fx_tracing():
                    with lock:
                        out = compiled(forward, *args, **kwargs)
                else:
                    try:
                        out = compiled(forward, *args, **kwargs)
                    except RuntimeError as e:  # another thread began tracing after the check
                        if not torch_internals.is_nested_fx_trace_error(e):
                            raise
                        with lock:
                            out = compiled(forward, *args, **kwargs)
            finally:
                active.call, state.range = previous_call, previous_range
            if state.graph_runs == runs:
                wrapper._said_eager(r, args, kwargs)
            return out

        return run

    def _said_eager(self, r: Optional[Range], args: tuple, kwargs: dict) -> None:
        self._warn_once(
            "eager", "a call of %d tokens (range %s) ran eagerly: Dynamo ran no compiled graph for it "
            "(torch._dynamo.config.recompile_limit=%d reached for this wrapper, or the frame was skipped); "
            "TORCH_LOGS=recompiles shows which guard failed", self._counter(args, kwargs), r,
            torch_internals.recompile_limit())

    def _run_and_learn_guard_free(self, r: Optional[Range], x: torch.Tensor, dims: tuple, args: tuple,
                                  kwargs: dict) -> Any:
        """The guarded path; the first such call that traces one whole graph for token dims >= 2
        gives the guard-free path its bytecode and the signature calls must match to use it."""
        guard_free = self._guard_free
        codes_before, graphs_before = len(self._entry_codes), len(self._compiler.graphs)
        out = self._run_guarded(r, x, dims, args, kwargs)
        if guard_free.signature is None and guard_free.reason is None:
            new_codes, new_graphs = self._entry_codes[codes_before:], self._compiler.graphs[graphs_before:]
            if len(new_codes) == 1 and len(new_graphs) == 1:
                forward = guardless.guardless_forward(self._entry, new_codes[0])
                signature = guardless.CallSignature(x, dims, args, kwargs, self._model)
                reason = ("the trace has graph breaks or resumes" if forward is None else signature.reason)
                if reason is None and new_graphs[0].token_symbol is None:
                    reason = "the traced graph is not symbolic in the token count alone"
                if reason is not None:
                    guard_free.reason = reason
                    log.info("dispatch.skip_dynamo_guards: every call keeps Dynamo's guards: %s", reason)
                else:
                    guard_free.learn(forward, new_graphs[0], signature, self._state, self._forward)
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
            return self._dispatch_as_forward(*args, **kwargs)
        if mode == "error" or (mode == "compile" and n >= 1):
            raise OutOfRangeError(
                f"{n} tokens is outside the compiled ranges [1, {d.max_num_tokens}] "
                f"(dispatch.max_num_tokens); dispatch.out_of_range=error. Allowed: 1..{d.max_num_tokens}, "
                "or set dispatch.out_of_range to eager or compile"
            )
        self._warn_once("out_of_range", "%d tokens is outside the compiled ranges [1, %d] (dispatch.out_of_range=%s): "
                        "running the module eagerly (said once)", n, d.max_num_tokens, mode,
                        level=logging.INFO if mode == "eager" else logging.WARNING)
        return self._forward(*args, **kwargs)

    # ------------------------------------------------------------------ CUDA graphs
    def _run_for_capture(self, r: Range, args: tuple, kwargs: dict) -> Any:
        x, _, dims = self._counter.read(args, kwargs)
        return self._run_guarded(r, x, dims, args, kwargs)

    def _capture_all(self, args: tuple, kwargs: dict) -> None:
        """Capture every CUDA graph, largest first (they share one memory pool), from a stateless
        example resized along its one token dim larger than 1."""
        if not args and not kwargs:
            log.info("warmup: no example inputs, CUDA graphs are captured on first use")
            return
        x, n, dims = self._counter.read(args, kwargs)
        larger = [d for d in dims if x.shape[d] != 1]
        if len(larger) > 1:
            log.info("warmup: the example's tokens span several dims %s; CUDA graphs are captured on first use",
                     tuple(x.shape))
            return
        dim = larger[0] if larger else dims[0]
        for s in sorted(self._cudagraphs.sizes, reverse=True):
            r = self._table.lookup(s)
            if r is None:
                continue
            s_args, s_kwargs = resize_tokens(args, kwargs, dim, x.shape[dim], s)
            sx, _, s_dims = self._counter.read(s_args, s_kwargs)
            self._cudagraphs.replay(r, s, s, sx, s_dims, s_args, s_kwargs)

    # ------------------------------------------------------------------ copies
    def __reduce__(self) -> tuple:
        """A copy or an unpickled wrapper is a new, untraced wrapper of (a copy of) the model, with
        the same config and passes: it traces on its first call (Inductor's cache makes its range
        compiles cheap)."""
        return (RangeCompiledModule, (self._model, self.config, self.extra_passes))

    def __deepcopy__(self, memo: dict) -> "RangeCompiledModule":
        return RangeCompiledModule(copy.deepcopy(self._model, memo), copy.deepcopy(self.config, memo),
                                   copy.deepcopy(self.extra_passes, memo))

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
        """The graphs Dynamo produced, each a ``RangeGraph`` (``.reason`` says why it was traced):
        one per graph break and one per guard set (a size-1 token dim, other keyword arguments,
        other dtypes, a KV length that became symbolic)."""
        return list(self._compiler.graphs)

    def range_for(self, num_tokens: int) -> Optional[Range]:
        if self._table is None:
            raise NotTracedError("range_for() needs the traced model: call the module or warmup(example_inputs) first")
        return self._table.lookup(num_tokens)

    def stats(self) -> dict[Range, dict[str, Any]]:
        """Per range: compiled?, calls that returned, compile seconds, passes applied and matches
        per pass (summed over the model's graphs: ``graphs[i].records[r].matches`` has them per
        graph), how many graphs compiled it, captured CUDA graph sizes."""
        table = self._table
        ranges = table.ranges if table is not None else self.ranges
        captured = sorted({key[0] for key in self._cudagraphs.captured}) if self._cudagraphs else []
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
                "compile_s": round(sum(rec.seconds for rec in records), 2),
                "graphs": len(records),
                "passes": _applied_passes(records) if records else [p.name for p in self._compiler.policy.passes_for(r)],
                "matches": matches,
                "cache_hits": sum(rec.cache_hit for rec in records),
                "extra": r.is_single_size and r.start in self._extra_sizes,
                "cudagraphs": [s for s in captured if s in r],
            }
        return out

    def _warn_once(self, key: str, msg: str, *args: Any, level: int = logging.WARNING) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.log(level, msg, *args)


_said_outer_compile = False


def _traced_by_an_outer_compile() -> bool:
    """Dynamo (torch.compile, an outer wrapper, strict export) traces this call, or torch.export runs
    it. Not ``torch.compiler.is_compiling()``: torch 2.13 sets that flag for the whole process while
    any thread compiles, and calls from other threads would silently run the model eagerly."""
    return torch.compiler.is_dynamo_compiling() or torch.compiler.is_exporting()


def _state_dict_of_the_model(wrapper: nn.Module, state_dict: dict, prefix: str, _metadata: Any) -> None:
    """``module.`` leaves the wrapper's keys: a checkpoint saved through it (``save_pretrained`` of a
    model whose ``model.model`` is a wrapper) loads into the plain model."""
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _load_as_the_model(wrapper: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    """The other way: the model's keys load into the wrapper (keys that still name ``module.`` too)."""
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


def _say_inside_outer_compile(_context: Any) -> None:
    """Called while an outer torch.compile traces a wrapper (module level: Dynamo calls it for real)."""
    global _said_outer_compile
    if not _said_outer_compile:
        _said_outer_compile = True
        log.warning("a RangeCompiledModule is called inside another torch.compile: that compile traces the wrapped "
                    "model itself, without range dispatch (said once). To dispatch by token count, call the wrapper "
                    "outside compiled code (Hugging Face generate: disable_compile=True)")


class _ForwardSwap:
    """While active (any thread), the model's ``forward`` is the wrapper's dispatch, so that the
    model's own ``__call__`` runs its hooks as in eager around it. Re-entrant and shared by threads:
    the first to enter installs it, the last to leave restores what was there."""

    def __init__(self, model: nn.Module, dispatch: Callable) -> None:
        self.model, self.dispatch = model, dispatch
        self.lock, self.depth, self.saved = threading.Lock(), 0, None

    def __enter__(self) -> None:
        with self.lock:
            if self.depth == 0:
                self.saved = self.model.__dict__.get("forward")
                self.model.__dict__["forward"] = self.dispatch
            self.depth += 1

    def __exit__(self, *exc: Any) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                if self.saved is None:
                    del self.model.__dict__["forward"]
                else:
                    self.model.__dict__["forward"] = self.saved


class _GuardFree:
    """The opt-in guard-free path (``dispatch.skip_dynamo_guards``), learned from one guarded call:
    Dynamo's transformed entry bytecode, bound per range to that range's artifact, for the ranges
    over which the learned graph's shape guards hold."""

    def __init__(self) -> None:
        self.signature: Optional[guardless.CallSignature] = None
        self.reason: Optional[str] = None
        self.forward: Optional[guardless.GuardlessForward] = None
        self.graph: Any = None
        self.state: Any = None
        self.model_forward: Any = None
        self.lock = compile_lock()
        self.bound: dict[Range, Optional[Callable]] = {}  # range -> bytecode calling its artifact; None: guarded

    def learn(self, forward: guardless.GuardlessForward, graph: Any, signature: guardless.CallSignature,
              state: Any, model_forward: Any) -> None:
        self.forward, self.graph, self.state, self.model_forward = forward, graph, state, model_forward
        self.signature = signature

    def run(self, r: Range, x: torch.Tensor, model: nn.Module, args: tuple, kwargs: dict) -> Any:
        """The call without Dynamo's guards, or ``CudaGraphRunner.MISMATCH`` when it must take them."""
        signature = self.signature
        if signature is None or not signature.accepts(x, args, kwargs, model):
            return CudaGraphRunner.MISMATCH
        f = self.bound.get(r, self)
        if f is None:
            return CudaGraphRunner.MISMATCH
        try:
            if f is not self:
                return f(self.model_forward, *args, **kwargs)
            return self._bind_and_run(r, args, kwargs)
        except guardless.STRUCTURE_CHANGED as e:
            log.info("dispatch.skip_dynamo_guards: the module changed (%s: %s); calls take Dynamo's guards until "
                     "one traces again", type(e).__name__, e)
            self.signature, self.bound = None, {}
            return CudaGraphRunner.MISMATCH

    def _bind_and_run(self, r: Range, args: tuple, kwargs: dict) -> Any:
        if not guardless.range_guards_hold(self.graph, r):
            log.info("dispatch.skip_dynamo_guards: range %s keeps Dynamo's guards (a shape guard of the learned "
                     "graph does not hold for every size in it)", r)
            self.bound[r] = None
            return CudaGraphRunner.MISMATCH
        state = self.state
        with self.lock:
            previous, state.range = state.range, r
            try:  # compiles r through the graph's own dispatch, then binds its artifact
                out = self.forward.generic(self.model_forward, *args, **kwargs)
            finally:
                state.range = previous
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
