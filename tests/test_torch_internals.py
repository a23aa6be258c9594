"""The private PyTorch surfaces stay in one module, and each of them works on the installed torch.

The library's modules name torch's private APIs only through ``rangedispatch/torch_internals.py``;
the scan below fails with file:line for any that does not. Every public entry of that module is
then called for real on the installed torch: a small ``torch.compile`` whose backend reads the
shape environment, Inductor compiling its graph, a one-rank gloo group for the collectives. A torch
release that moves one of them fails here, naming the entry.
"""

from __future__ import annotations

import ast
import copy
import inspect
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import torch.distributed as dist

from rangedispatch import torch_internals

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "rangedispatch"
TOOLS = ("cli", "bench", "tune")  # not imported by the library: they may reach into torch themselves
ADAPTER = LIBRARY / "torch_internals.py"
# Allowed outside the adapter: Inductor's pass extension points, the API a custom graph pass is
# written against, and torch's pytree utilities, which torch.export documents for registering
# users' own containers (and which have no public twin)
ALLOWED = ("torch._inductor.pattern_matcher", "torch._inductor.custom_graph_pass", "torch.utils._pytree")
EXPERIMENTAL = ("torch.fx.experimental",)  # public by name, without torch's stability promise


# ---------------------------------------------------------------------------------------- the scan


def _private_prefix(dotted: str) -> Optional[str]:
    """The private part of a dotted torch name (``torch._dynamo`` of ``torch._dynamo.config.x``), or
    None. An op's name (``torch.ops.aten._to_copy``) is the graph's vocabulary, not torch's Python
    API; a private op namespace (``torch.ops._c10d_functional``) is."""
    parts = dotted.split(".")
    if parts[0] != "torch" or any(dotted == a or dotted.startswith(f"{a}.") for a in ALLOWED):
        return None
    for name in EXPERIMENTAL:
        if dotted == name or dotted.startswith(f"{name}."):
            return name
    if parts[1:2] == ["ops"]:
        parts = parts[:3]
    for i, part in enumerate(parts):
        if part.startswith("_") and not (part.startswith("__") and part.endswith("__")):
            return ".".join(parts[:i + 1])
    return None


def private_torch_names(source: str) -> list[tuple[int, str]]:
    """``(line, private name)`` for each private torch name the code names: in imports, and in
    attribute chains from a name an import bound (``dist.distributed_c10d._x``). Strings and
    comments do not count."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}  # local name -> the dotted name it stands for
    named: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                local = alias.asname or alias.name.split(".")[0]
                bound[local] = alias.name if alias.asname else local
                named.append((node.lineno, alias.name))
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                named.append((node.lineno, f"{node.module}.{alias.name}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, base = [], node
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                named.append((node.lineno, ".".join([bound[base.id], *reversed(chain)])))
    found = {(line, prefix) for line, dotted in named if (prefix := _private_prefix(dotted)) is not None}
    return sorted(found)


def _library_modules() -> list[Path]:
    return [p for p in sorted(LIBRARY.rglob("*.py"))
            if p != ADAPTER and p.relative_to(LIBRARY).parts[0] not in TOOLS]


def test_library_modules_name_private_torch_apis_only_through_the_adapter():
    found = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in _library_modules()
             for line, name in private_torch_names(path.read_text())]
    assert not found, "private torch names outside rangedispatch/torch_internals.py:\n" + "\n".join(found)


def test_the_scan_finds_each_form_of_private_name_and_passes_the_allowed_ones():
    source = '''
import torch._dynamo
import torch.distributed as dist
from torch import _guards
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree
from torch._inductor.pattern_matcher import stable_topological_sort

dist.distributed_c10d._resolve_process_group("0")
WAIT = torch.ops._c10d_functional.wait_tensor.default
VIEW = torch.ops.aten._unsafe_view.default
pytree.tree_leaves(([], {}))
print(torch.__version__, "torch._dynamo in a string")  # torch._C in a comment
'''
    assert private_torch_names(source) == [
        (2, "torch._dynamo"), (4, "torch._guards"), (5, "torch.fx.experimental"),
        (9, "torch.distributed.distributed_c10d._resolve_process_group"), (10, "torch.ops._c10d_functional")]
    assert _library_modules() and all(p.suffix == ".py" for p in _library_modules())


def test_every_public_entry_of_the_adapter_is_exercised_here():
    entries = {name for name, value in vars(torch_internals).items() if not name.startswith("_") and (
        name.isupper() or (inspect.isfunction(value) and value.__module__ == torch_internals.__name__))}
    here = {name for _, name in _attributes_of(Path(__file__).read_text(), "torch_internals")}
    assert entries - here == set()


def _attributes_of(source: str, module: str) -> list[tuple[int, str]]:
    return [(node.lineno, node.attr) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == module]


# ---------------------------------------------------------------------------------------- Dynamo


def _entry(forward, *args, **kwargs):
    """Shaped like the wrapper's entry function: Dynamo names sizes after ``args`` / ``kwargs``."""
    return forward(*args, **kwargs)


def _model(x, scale):
    if x.shape[0] > 3:  # a shape guard on the token count
        x = x * 2
    return torch.relu(x) * scale


@dataclass
class Trace:
    """What a recording backend saw of one Dynamo graph."""

    gm: torch.fx.GraphModule
    fakes: list
    reason: Optional[str]  # torch_internals.recompile_reason() inside the backend


def _symbols(values: list) -> set:
    out = set()
    for v in values:
        sizes = v.shape if isinstance(v, torch.Tensor) else [v]
        out |= {s for size in sizes if isinstance(size, torch.SymInt)
                for s in torch_internals.symint_expr(size).free_symbols}
    return out


def _compile_and_record(fn: Any, dynamic: Optional[bool] = None) -> tuple[Any, list[Trace]]:
    """``fn`` compiled with a backend that records each graph (and runs it as traced)."""
    traces: list[Trace] = []

    def backend(gm, example_inputs):
        fakes = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
        traces.append(Trace(gm, fakes, torch_internals.recompile_reason()))
        return gm

    return torch.compile(fn, backend=backend, dynamic=dynamic), traces


def _fresh(fn: Any) -> Any:
    """A new function object of ``fn``'s code: Dynamo compiles it anew."""
    return types.FunctionType(fn.__code__, fn.__globals__, fn.__name__)


@pytest.fixture(scope="module")
def traces() -> list[Trace]:
    """``_model`` through the entry: first [6, 4] float with a symbolic token dim, then float64
    (a failed dtype guard: a second graph)."""
    compiled, traces = _compile_and_record(_fresh(_entry))
    x = torch.randn(6, 4)
    torch_internals.maybe_mark_dynamic(x, 0)
    compiled(_model, x, torch.ones(4))
    compiled(_model, x.double(), torch.ones(4, dtype=torch.float64))
    return traces


@pytest.fixture(scope="module")
def traced(traces) -> Trace:
    return traces[0]


def _token_symbol(trace: Trace) -> Any:
    (symbol,) = _symbols(trace.fakes)
    return symbol


def test_maybe_mark_dynamic_makes_a_symbolic_size_of_a_first_trace(traced):
    compiled, unmarked = _compile_and_record(_fresh(_entry))
    compiled(_model, torch.randn(6, 4), torch.ones(4))
    assert _symbols(unmarked[0].fakes) == set()
    assert len(_symbols(traced.fakes)) == 1


def test_recompile_reason_names_the_failed_guard_and_none_on_a_first_trace(traces):
    assert traces[0].reason is None
    assert "dtype mismatch" in traces[1].reason


def test_recompile_limit_is_dynamos():
    assert torch_internals.recompile_limit() == torch._dynamo.config.recompile_limit >= 1


def test_set_duck_shape_decides_whether_equal_sizes_share_a_symbol():
    def two_symbolic(a, b):
        return a.sum() + b.sum()

    def symbols_at_equal_sizes() -> int:
        compiled, traces = _compile_and_record(_fresh(two_symbolic), dynamic=True)  # duck-sized dims
        compiled(torch.ones(5), torch.ones(5))
        return len(_symbols(traces[0].fakes))

    previous = torch_internals.set_duck_shape(False)
    try:
        assert symbols_at_equal_sizes() == 2
        assert torch_internals.set_duck_shape(True) is False
        assert symbols_at_equal_sizes() == 1
    finally:
        torch_internals.set_duck_shape(previous)


def test_on_compile_and_on_bytecode_see_a_compile():
    events, codes = [], []
    torch_internals.on_compile(lambda _: events.append("start"), lambda _: events.append("end"))
    torch_internals.on_bytecode(lambda original, transformed: codes.append((original, transformed)))
    fn = _fresh(_model)
    torch.compile(fn, backend="eager")(torch.randn(2, 4), torch.ones(4))
    assert events[:1] == ["start"] and events[-1:] == ["end"]
    transformed = [new for original, new in codes if original is fn.__code__]
    assert transformed and any(name.startswith("__compiled_fn") for name in transformed[0].co_names)


_traced_notes: list = []


def _note_trace(context: Any) -> None:
    _traced_notes.append(context)


def _noted(x):
    torch_internals.at_trace_time(_note_trace)
    return x + 1


def test_at_trace_time_runs_once_per_trace_and_not_when_the_code_runs():
    _traced_notes.clear()
    compiled = torch.compile(_fresh(_noted), backend="eager")
    for _ in range(3):
        compiled(torch.ones(3))
    assert len(_traced_notes) == 1
    _noted(torch.ones(3))
    assert len(_traced_notes) == 1


def test_compile_lock_is_dynamos_reentrant_lock():
    with torch_internals.compile_lock(), torch_internals.compile_lock():
        assert torch.compile(_fresh(_noted), backend="eager")(torch.ones(2)).tolist() == [2.0, 2.0]


def test_global_state_guard_fails_once_grad_mode_changes():
    guard = torch_internals.global_state_guard()
    assert guard.check()
    with torch.no_grad():
        assert not guard.check()
    assert guard.check()


def test_transforms_active_under_vmap_and_a_torch_function_mode():
    seen = []

    def body(x):
        seen.append(torch_internals.transforms_active())
        return x * 2

    class PassThrough(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    assert not torch_internals.transforms_active()
    torch.func.vmap(body)(torch.ones(2, 3))
    with PassThrough():
        body(torch.ones(1))
    assert seen == [True, True]


def test_fx_tracing_and_the_error_dynamo_raises_under_it():
    seen, errors = [], []
    compiled = torch.compile(_fresh(_noted), backend="eager")

    class CallsCompiled(torch.nn.Module):
        def forward(self, x):
            seen.append(torch_internals.fx_tracing())
            try:
                compiled(x)
            except RuntimeError as e:
                errors.append(e)
            return x

    torch.fx.symbolic_trace(CallsCompiled())
    assert seen == [True] and not torch_internals.fx_tracing()
    assert [torch_internals.is_nested_fx_trace_error(e) for e in errors] == [True]
    assert not torch_internals.is_nested_fx_trace_error(RuntimeError("another error"))


def test_module_hooks_and_global_module_hooks_hold_the_registered_hooks():
    def hook(module, args):
        return None

    module = torch.nn.Linear(2, 2)
    handle = module.register_forward_pre_hook(hook)
    assert hook in torch_internals.module_hooks(module)[0].values()
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        assert hook in torch_internals.global_module_hooks()[0].values()
    finally:
        handle.remove()
    assert not any(hook in hooks.values() for hooks in torch_internals.global_module_hooks())


def test_dynamo_utils_module_is_what_the_transformed_bytecode_imports():
    import builtins

    entry_globals = {"__builtins__": builtins, "__name__": "entry_with_private_globals"}
    entry = types.FunctionType(_entry.__code__, entry_globals, "entry")
    x = torch.randn(5, 4)
    torch_internals.maybe_mark_dynamic(x, 0)
    torch.compile(entry, backend="eager")(_model, x, torch.ones(4))
    module = torch_internals.dynamo_utils_module()
    assert entry_globals["__import_torch_dot__dynamo_dot_utils"] is module
    assert callable(module.call_size)


# ---------------------------------------------------------------------------------------- shapes


def test_fake_values_their_mode_and_shape_environment(traced):
    mode = torch_internals.detect_fake_mode(traced.fakes)
    assert mode is not None and torch_internals.detect_fake_mode([torch.ones(1)]) is None
    assert torch_internals.shape_env_of(traced.fakes) is mode.shape_env
    x, scale = [f for f in traced.fakes if isinstance(f, torch.Tensor)]
    out = torch_internals.call_on_fakes(torch.add, (x, scale))
    assert torch_internals.detect_fake_mode([out]) is mode and out.shape == x.shape
    with mode:
        assert torch_internals.detect_fake_mode([torch.ones(2)]) is mode
        with torch_internals.real_tensors():
            assert torch_internals.detect_fake_mode([torch.ones(2)]) is None


def test_trace_with_inductor_decompositions_gives_what_inductor_lowers(traced):
    x = next(f for f in traced.fakes if isinstance(f, torch.Tensor))
    gm = torch_internals.trace_with_inductor_decompositions(lambda t: t.to(torch.float64) * 2, [x])
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.prims.convert_element_type.default in targets
    assert torch.ops.aten._to_copy.default not in targets


def test_a_size_symbol_its_source_hint_range_and_guard(traced):
    shape_env = torch_internals.shape_env_of(traced.fakes)
    symbol = _token_symbol(traced)
    x = next(f for f in traced.fakes if isinstance(f, torch.Tensor))
    assert torch_internals.symint_expr(x.shape[0]) == symbol
    assert torch_internals.symbol_sources(shape_env, symbol) == [torch_internals.input_size_source(0, 0)]
    assert torch_internals.size_hints(shape_env)[symbol] == 6
    traced_range = torch_internals.value_ranges(shape_env)[symbol]
    assert traced_range.lower == 4  # the guard x.shape[0] > 3
    made = torch_internals.make_value_range(4, 64)
    assert type(made) is type(traced_range) and (made.lower, made.upper) == (4, 64)
    (guard,) = torch_internals.shape_guards(shape_env)
    assert guard.free_symbols == {symbol}
    assert torch_internals.holds_over(guard, symbol, 4, 4096)
    assert not torch_internals.holds_over(guard, symbol, 1, 4096)


def test_a_keyword_argument_size_source():
    compiled, traces = _compile_and_record(_fresh(_entry))
    x = torch.randn(6, 4)
    torch_internals.maybe_mark_dynamic(x, 0)
    compiled(_model, x=x, scale=torch.ones(4))
    shape_env = torch_internals.shape_env_of(traces[0].fakes)
    assert torch_internals.symbol_sources(shape_env, _token_symbol(traces[0])) == [
        torch_internals.input_size_source("x", 0)]


def test_known_equal_decides_without_a_guard(traced):
    shape_env = torch_internals.shape_env_of(traced.fakes)
    tokens = next(f for f in traced.fakes if isinstance(f, torch.Tensor)).shape[0]
    guards = len(torch_internals.shape_guards(shape_env))
    assert torch_internals.known_equal(tokens, tokens) and torch_internals.known_equal(3, 3)
    assert not torch_internals.known_equal(tokens, tokens + 1)
    assert not torch_internals.known_equal(tokens, 6)  # its hint, but not for every value
    assert len(torch_internals.shape_guards(shape_env)) == guards


# ---------------------------------------------------------------------------------------- Inductor


class _Capture(torch._inductor.custom_graph_pass.CustomGraphPass):
    """Keeps the targets of each post-grad graph it is run on (later passes go on changing it)."""

    def __init__(self) -> None:
        self.targets: list[list] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.targets.append([n.target for n in graph.nodes if n.op == "call_function"])

    def uuid(self) -> Optional[Any]:
        return None


def _copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    return torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))


def _inputs(trace: Trace, x: torch.Tensor) -> list:
    """The graph's inputs for a call of ``_model`` with ``x`` (and the size of its token dim)."""
    return [x.shape[0] if isinstance(f, torch.SymInt) else x if f.dim() == 2 else torch.ones(4) for f in trace.fakes]


def test_compile_fx_symbolic_serves_every_size_and_shows_its_code_and_post_grad_graph(traced):
    capture = _Capture()
    assert torch_internals.post_grad_custom_post_pass() is None
    with torch_internals.inductor_config_patch(post_grad_custom_post_pass=capture), \
            torch_internals.generated_code() as code:
        assert torch_internals.post_grad_custom_post_pass() is capture
        fn = torch_internals.compile_fx(_copy(traced.gm), traced.fakes, symbolic=True)
    assert torch_internals.post_grad_custom_post_pass() is None
    assert torch.ops.aten.relu.default in capture.targets[0]
    assert len(code) == 1 and "def call(" in code[0]
    for n in (4, 9):
        x = torch.randn(n, 4)
        (out,) = fn(*_inputs(traced, x))
        torch.testing.assert_close(out, _model(x, torch.ones(4)))


def test_compile_fx_static_compiles_for_the_inputs_sizes(traces):
    static = traces[1]  # the float64 graph: no symbols
    x = torch.randn(6, 4, dtype=torch.float64)
    scale = torch.ones(4, dtype=torch.float64)
    (out,) = torch_internals.compile_fx(_copy(static.gm), [x, scale], symbolic=False)(x, scale)
    torch.testing.assert_close(out, _model(x, scale))


def test_fx_graph_cache_hits_count_a_cached_compile_and_caches_off_stops_them(traced):
    torch_internals.compile_fx(_copy(traced.gm), traced.fakes, symbolic=True)
    hits = torch_internals.fx_graph_cache_hits()
    torch_internals.compile_fx(_copy(traced.gm), traced.fakes, symbolic=True)
    assert torch_internals.fx_graph_cache_hits() == hits + 1
    with torch_internals.caches_off():
        torch_internals.compile_fx(_copy(traced.gm), traced.fakes, symbolic=True)
    assert torch_internals.fx_graph_cache_hits() == hits + 1


def test_inductor_options_read():
    assert torch_internals.mode_options("max-autotune-no-cudagraphs")["max_autotune"] is True
    assert torch_internals.compile_threads() == torch._inductor.config.compile_threads >= 1


# ---------------------------------------------------------------------------------------- distributed


@pytest.fixture(scope="module")
def group_name() -> Any:
    """A one-rank gloo group for the duration of these tests."""
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of the caller")
    with tempfile.TemporaryDirectory(prefix="rd-store-") as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=0, world_size=1)
        try:
            yield dist.group.WORLD.group_name
        finally:
            dist.destroy_process_group()


def test_resolve_process_group_and_the_functional_collectives(group_name):
    assert torch_internals.resolve_process_group(group_name) is dist.group.WORLD
    x = torch.arange(6.0).reshape(3, 2)
    for out in (torch_internals.all_reduce_sum(x, group_name), torch_internals.reduce_scatter_sum(x, 1, group_name),
                torch_internals.all_gather(x, 1, group_name)):
        assert out is not x and torch.equal(out, x)  # one rank: the sum, its block and the gather are x


def test_the_collective_targets_match_the_graphs_of_a_traced_all_reduce(group_name):
    def all_reduce(x):
        y = x * 2
        dist.all_reduce(y)
        return y + 1

    compiled, traces = _compile_and_record(all_reduce)
    compiled(torch.ones(3, 2))
    gm = traces[0].gm
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert [t for t in targets if t in torch_internals.ALL_REDUCE_TARGETS] and \
        [torch_internals.functional_collective(t) for t in targets] == [None, "all_reduce", None, None]
    capture = _Capture()
    with torch_internals.inductor_config_patch(post_grad_custom_post_pass=capture):
        torch_internals.compile_fx(gm, traces[0].fakes, symbolic=True)
    (post_grad,) = capture.targets
    assert torch_internals.FUNCTIONAL_ALL_REDUCE in post_grad and torch_internals.FUNCTIONAL_WAIT in post_grad


def test_symmetric_memory_entries_reach_torchs_symmetric_memory(group_name):
    if not torch.cuda.is_available():  # torch's symmetric memory itself refuses CPU tensors
        with pytest.raises(RuntimeError):
            torch_internals.symmetric_buffer(16, torch.float32, torch.device("cpu"), group_name)
        with pytest.raises(RuntimeError):
            torch_internals.reserve_symm_mem_workspace(group_name, 1024)
        return
    buf = torch_internals.symmetric_buffer(16, torch.float32, torch.device("cuda"), group_name)
    assert buf.is_cuda and buf.numel() == 16
    torch_internals.reserve_symm_mem_workspace(group_name, 1024)
