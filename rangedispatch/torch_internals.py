"""The private PyTorch surfaces rangedispatch relies on, in one module.

Everything here reaches below torch's public API (``torch._dynamo``, ``torch._inductor``, the shape
environment, c10d internals). Each entry says what it stands for and the torch versions it was
checked on; ``tests/test_torch_internals.py`` exercises every entry on the installed torch. When a
torch release moves one of them, this is the one file to change. Library modules outside it name
only Inductor's pass extension points (its pattern matcher and ``CustomGraphPass``) and torch's
pytree utilities, which ``torch.export`` documents for users' own containers; the test also
enforces that.

Checked on torch 2.11 (GPU machines), 2.13 and 2.14 (CPU) unless an entry says otherwise.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

# ---------------------------------------------------------------------------------------- Dynamo


def compile_lock() -> Any:
    """The re-entrant lock Dynamo holds while it traces and compiles a frame (process-wide)."""
    return torch._dynamo.convert_frame.compile_lock


def on_compile(start: Callable[[Any], None], end: Callable[[Any], None]) -> None:
    """Call ``start`` / ``end`` around every Dynamo compile in the process (argument: Dynamo's
    callback record, unused here). Idempotent; call it again after ``torch._dynamo.reset()``,
    which drops every callback."""
    handler = torch._dynamo.callback_handler
    if start not in handler.start_callbacks:
        handler.register_start_callback(start)
    if end not in handler.end_callbacks:
        handler.register_end_callback(end)


def on_bytecode(hook: Callable[[Any, Any], None]) -> None:
    """``hook(original_code, transformed_code)`` for every frame Dynamo transforms."""
    torch._dynamo.convert_frame.register_bytecode_hook(hook)


def maybe_mark_dynamic(t: torch.Tensor, dim: int) -> None:
    """Ask Dynamo for a symbolic size at ``t.shape[dim]``, unless the graph ties it to a constant."""
    torch._dynamo.maybe_mark_dynamic(t, dim)


def set_duck_shape(enabled: bool) -> bool:
    """Duck sizing (equal sizes share one symbol) for shape environments created from now on;
    returns the previous setting. Dynamo creates one shape environment per compile."""
    import torch.fx.experimental._config as fx_config

    previous = fx_config.use_duck_shape
    fx_config.use_duck_shape = enabled
    return previous



def at_trace_time(fn: Callable[[Any], None]) -> None:
    """Inside code Dynamo traces: call ``fn(context)`` while tracing (once per trace), not when the
    compiled code runs. Outside Dynamo: nothing. ``fn`` must be a module-level function. (No import
    statement here: Dynamo would break the graph on it; a trace has loaded the module already.)"""
    torch._dynamo.comptime.comptime(fn)


def recompile_reason() -> Optional[str]:
    """Inside a Dynamo backend: the failed guard that made Dynamo trace this frame again (None for
    a first trace, or where this torch does not record it)."""
    try:
        from torch._dynamo.utils import get_metrics_context

        return get_metrics_context()._metrics.get("recompile_reason")
    except (ImportError, AttributeError):
        return None


def recompile_limit() -> int:
    return torch._dynamo.config.recompile_limit


def global_state_guard() -> Any:
    """Dynamo's own guard on global state (grad mode, autocast, default dtype, deterministic
    algorithms, torch-function state...): ``.check()`` is True while that state is unchanged."""
    return torch._C._dynamo.guards.GlobalStateGuard()


_functorch_level = torch._C._functorch.maybe_current_level
_torch_function_modes = torch._C._len_torch_function_stack
_dispatch_modes = torch._C._len_torch_dispatch_stack


def transforms_active() -> bool:
    """A functorch transform (vmap, grad), a torch-function mode or a dispatch mode is active:
    Dynamo's guards account for these; a call that skips them must not run under one. (The C
    functions are bound once: this runs on every guard-free call.)"""
    return _functorch_level() is not None or _torch_function_modes() > 0 or _dispatch_modes() > 0


def fx_tracing() -> bool:
    """FX's process-wide tracing flag (torch 2.11-2.13). While it is set (another thread traces),
    Dynamo refuses to enter a compiled function, so such a call must wait for Dynamo's compile
    lock. torch 2.14 keeps the flag per thread: another thread's trace never stops this one."""
    return getattr(torch.fx._symbolic_trace, "_is_fx_tracing_flag", False)


def global_module_hooks() -> tuple[dict, ...]:
    """The dicts of hooks registered for every nn.Module (``register_module_forward_hook``...)."""
    from torch.nn.modules import module as m

    return (m._global_forward_pre_hooks, m._global_forward_hooks, m._global_backward_pre_hooks,
            m._global_backward_hooks)


def module_hooks(module: torch.nn.Module) -> tuple[dict, ...]:
    """The dicts of hooks registered on ``module`` itself."""
    return (module._forward_pre_hooks, module._forward_hooks, module._backward_pre_hooks, module._backward_hooks)


def dynamo_utils_module() -> Any:
    """The module Dynamo's transformed bytecode imports its helpers from."""
    return torch._dynamo.utils


# ---------------------------------------------------------------------------------------- shapes


def detect_fake_mode(values: Sequence[Any]) -> Any:
    """The fake mode of the fake tensors in ``values`` (nested containers too); None for real ones."""
    return torch._guards.detect_fake_mode(list(values))


def call_on_fakes(fn: Callable, args: Sequence[Any]) -> Any:
    """``fn(*args)`` under the fake mode of the fake values in ``args``: a new graph node's value."""
    with detect_fake_mode(args):
        return fn(*args)


def trace_with_inductor_decompositions(fn: Callable, values: Sequence[Any]) -> torch.fx.GraphModule:
    """``fn`` traced into an FX graph on the fake ``values`` (under their fake mode, without grad),
    decomposed as Inductor's lowerings expect (``convert_element_type``, not ``_to_copy``)."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    with detect_fake_mode(values), torch.no_grad():
        return make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="real")(*values)


def real_tensors() -> Any:
    """Inside the block, new tensors are real even under a fake mode (a pass that times kernels
    while Inductor compiles on fake values)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def shape_env_of(values: Sequence[Any]) -> Any:
    """The shape environment of a traced graph's fake placeholders (None when it has none)."""
    mode = detect_fake_mode(values)
    return getattr(mode, "shape_env", None)


def symbol_sources(shape_env: Any, symbol: Any) -> list[str]:
    """Where Dynamo read a size symbol from, as source names (``"L['args'][0].size()[1]"``)."""
    names = []
    for source in shape_env.var_to_sources.get(symbol, ()):
        name = source.name
        names.append(name() if callable(name) else name)
    return names


def input_size_source(where: Any, dim: int) -> str:
    """The source name Dynamo gives the size ``dim`` of an argument of a wrapper's entry function
    ``entry(forward, *args, **kwargs)``: ``where`` is a position in ``args`` or a keyword."""
    base = f"L['args'][{where}]" if isinstance(where, int) else f"L['kwargs'][{where!r}]"
    return f"{base}.size()[{dim}]"


def size_hints(shape_env: Any) -> dict:
    """symbol -> size hint (the attribute's name differs across torch versions)."""
    hints = getattr(shape_env, "backed_var_to_val", None)
    return hints if hints is not None else shape_env.var_to_val


def value_ranges(shape_env: Any) -> dict:
    """symbol -> the ``ValueRanges`` the shape environment assumes for it."""
    return shape_env.var_to_range


def make_value_range(lo: int, hi: int) -> Any:
    from torch.utils._sympy.value_ranges import ValueRanges

    return ValueRanges(lo, hi)


def shape_guards(shape_env: Any) -> list:
    """The shape guards (sympy relations) the shape environment holds, in order."""
    return [g.expr for g in shape_env.guards]


def holds_over(relation: Any, symbol: Any, lo: int, hi: int) -> bool:
    """True if ``relation`` (in ``symbol`` only) holds for every value in ``[lo, hi]``, by the
    interval analysis the shape environment itself uses ("unknown" is False)."""
    import sympy
    from torch.utils._sympy.value_ranges import ValueRanges, bound_sympy

    if relation.free_symbols != {symbol}:
        return False
    bound = bound_sympy(relation, {symbol: ValueRanges(lo, hi)})
    return bool(bound.is_singleton() and bound.lower == sympy.true)


def symint_expr(s: Any) -> Any:
    """The sympy expression behind a ``SymInt``."""
    return s.node.expr


def known_equal(a: Any, b: Any) -> bool:
    """Whether two sizes (ints or SymInts) are equal for every value of their symbols, decided
    without adding a guard ("unknown" is False)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(a == b)


# ---------------------------------------------------------------------------------------- Inductor


def compile_fx(gm: torch.fx.GraphModule, inputs: list, symbolic: bool) -> Callable:
    """Inductor on ``gm``; from symbolic fake ``inputs`` under their shape environment when
    ``symbolic`` (a graph generic in its symbols), else from real inputs (static)."""
    from torch._inductor.compile_fx import compile_fx as inductor_compile

    if not symbolic:
        return inductor_compile(gm, inputs)
    with torch._guards.tracing(torch._guards.TracingContext(detect_fake_mode(inputs))):
        return inductor_compile(gm, inputs)


def inductor_config_patch(**options: Any) -> Any:
    """Inductor options for the compiles inside the block (scoped; nothing global is left set)."""
    from torch._inductor import config

    return config.patch(options)


def post_grad_custom_post_pass() -> Any:
    """The post-grad custom pass a user may have configured (ours runs after it)."""
    from torch._inductor import config

    return config.post_grad_custom_post_pass


def mode_options(mode: str) -> dict:
    """The Inductor options of a ``torch.compile`` mode (e.g. "max-autotune-no-cudagraphs")."""
    from torch._inductor import list_mode_options

    return list_mode_options(mode)


def compile_threads() -> int:
    """How many threads Inductor compiles kernels on."""
    from torch._inductor import config

    return config.compile_threads


def fx_graph_cache_hits() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"]


@contextlib.contextmanager
def generated_code() -> Iterator[list[str]]:
    """The Python code of every graph Inductor compiles or loads from its cache inside the block,
    through the hook Inductor calls with that code (the one ``run_and_get_code`` sets)."""
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


def caches_off() -> Any:
    """Inductor's FX-graph cache and AOT's autograd cache off inside the block."""
    from torch._functorch import config as functorch_config

    stack = contextlib.ExitStack()
    stack.enter_context(inductor_config_patch(fx_graph_cache=False))
    stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
    return stack


# ---------------------------------------------------------------------------------------- distributed

# The functional collectives that Dynamo (traced ``dist.all_reduce``...) and DTensor put in graphs,
# naming their process group by a string: passes find all-reduces by these targets (pre-grad graphs
# may call the overload packet, post-grad graphs the overload).
FUNCTIONAL_ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
FUNCTIONAL_WAIT = torch.ops._c10d_functional.wait_tensor.default
ALL_REDUCE_TARGETS = (torch.ops._c10d_functional.all_reduce, FUNCTIONAL_ALL_REDUCE)


def functional_collective(target: Any) -> Optional[str]:
    """The collective a graph node's target is (``"all_reduce"``, ``"all_gather_into_tensor"``...);
    None for other targets and for the waits that follow collectives."""
    name = str(target)
    if not name.startswith("_c10d_functional.") or name.startswith("_c10d_functional.wait_tensor"):
        return None
    return name.split(".")[1]


# The same collectives called by our ops: they take the group name a traced collective carries
# (torch's public collectives take a ProcessGroup, which only a private resolver gives from a name).
def all_reduce_sum(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """The sum of ``x`` over the group, as a new tensor."""
    funcol = torch.ops._c10d_functional
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", group_name))


def reduce_scatter_sum(x: torch.Tensor, world: int, group_name: str) -> torch.Tensor:
    """This rank's block of rows (dim 0 split in ``world``) of the sum of ``x`` over the group."""
    funcol = torch.ops._c10d_functional
    return funcol.wait_tensor(funcol.reduce_scatter_tensor(x, "sum", world, group_name))


def all_gather(x: torch.Tensor, world: int, group_name: str) -> torch.Tensor:
    """The ranks' ``x`` concatenated along dim 0, in rank order."""
    funcol = torch.ops._c10d_functional
    return funcol.wait_tensor(funcol.all_gather_into_tensor(x, world, group_name))


def resolve_process_group(group_name: str) -> Any:
    """The process group a traced collective names."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def symmetric_buffer(numel: int, dtype: torch.dtype, device: torch.device, group_name: str) -> torch.Tensor:
    """A buffer of ``numel`` elements that every rank of the group has mapped (symmetric memory),
    for the ``torch.ops.symm_mem`` kernels. Collective: every rank of the group calls it."""
    import torch.distributed._symmetric_memory as symm_mem

    buf = symm_mem.empty(numel, dtype=dtype, device=device)
    symm_mem.rendezvous(buf, group_name)
    return buf


def reserve_symm_mem_workspace(group_name: str, min_bytes: int) -> None:
    """Grow the group's shared symmetric workspace (what ``torch.ops.symm_mem``'s fused matmul
    collectives use) to at least ``min_bytes``; a no-op once it is that large."""
    from torch.distributed._symmetric_memory import get_symm_mem_workspace

    get_symm_mem_workspace(group_name, min_size=min_bytes)


def is_nested_fx_trace_error(e: BaseException) -> bool:
    """Dynamo's refusal to enter a compiled function while FX's tracing flag is set."""
    return isinstance(e, RuntimeError) and "symbolically trace a dynamo-optimized function" in str(e)
