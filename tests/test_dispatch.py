import logging
import os
import subprocess
import sys
import threading

import pytest
import torch

from helpers import CensusPass, Mlp
from rangedispatch import Range, RangeCompiledModule, load_config
from rangedispatch.errors import ConfigError, NotTracedError, OutOfRangeError
from rangedispatch.passes import GraphPass

BASE = ["hardware=cpu", "fusion.enabled=false", "dispatch.max_num_tokens=64", "dispatch.split_points=[8,32]"]


def make(*overrides, passes=()):
    torch.manual_seed(0)
    model = Mlp()
    return model, RangeCompiledModule(model, load_config([*BASE, *overrides]), passes=passes)


def run(m, n, seed=0):
    g = torch.Generator().manual_seed(seed + n)
    x, r = torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)
    return m(x, r), (x, r)


def test_every_boundary_matches_eager_and_runs_its_range(caplog):
    census = CensusPass(min_start=9)
    model, m = make(passes=[census])
    assert m.ranges == [Range(1, 8), Range(9, 32), Range(33, 64)]
    with caplog.at_level(logging.INFO, logger="rangedispatch"):
        for n in (2, 7, 8, 9, 31, 32, 33, 63, 64, 1):
            before = {r: s["calls"] for r, s in m.stats().items()}
            y, args = run(m, n)
            torch.testing.assert_close(y, model(*args))
            after = m.stats()
            ran = [r for r in after if after[r]["calls"] != before.get(r, 0)]
            assert ran == [m.range_for(n)] and n in ran[0]
    stats = m.stats()
    assert all(s["compiled"] for s in stats.values())
    assert stats[Range(1, 8)]["passes"] == [] and stats[Range(9, 32)]["passes"] == ["census"]
    assert set(census.seen) == {Range(9, 32), Range(33, 64)}  # the test pass ran exactly where it applies
    assert stats[Range(33, 64)]["matches"] == {"census": 1} and stats[Range(1, 8)]["matches"] == {}
    assert "compiled [9,32] in" in caplog.text and "passes: census" in caplog.text


def test_only_used_ranges_compile_and_single_sizes_win():
    model, m = make("dispatch.compile_sizes=[20]", "compile.max_autotune=never")
    run(m, 5)
    run(m, 20)
    stats = m.stats()
    assert m.range_for(20) == Range(20, 20)
    assert stats[Range(20, 20)]["compiled"] and stats[Range(20, 20)]["calls"] == 1
    assert not stats[Range(9, 32)]["compiled"] and not stats[Range(33, 64)]["compiled"]
    y, args = run(m, 20)
    torch.testing.assert_close(y, model(*args))


def test_hardware_profile_compile_sizes_join_the_ranges():
    model, m = make("+hardware.compile_sizes=[1,100]", "dispatch.compile_sizes=[20]", "compile.max_autotune=never")
    # 100 is above dispatch.max_num_tokens (64): not used
    assert m.ranges == [Range(1, 1), Range(1, 8), Range(9, 32), Range(20, 20), Range(33, 64)]
    run(m, 5)
    y, args = run(m, 1)
    torch.testing.assert_close(y, model(*args))
    stats = m.stats()
    assert m.range_for(1) == Range(1, 1) and stats[Range(1, 1)]["calls"] == 1 and stats[Range(1, 1)]["compiled"]


def test_sizes_that_replay_cuda_graphs_take_the_profiles_cuda_graph_list():
    def sizes(*overrides):
        return load_config(["hardware=h200", *overrides]).compile_sizes

    # the h200 profile: a 1-token graph without CUDA graphs, none for a 1-token CUDA graph
    assert sizes() == [1] and sizes("dispatch.cudagraph_sizes=[1,2,4]") == []
    assert sizes("dispatch.cudagraph_sizes=[2,4]") == [1]
    assert sizes("hardware.compile_sizes_with_cudagraphs=null", "dispatch.cudagraph_sizes=[1]") == [1]
    assert sizes("hardware.compile_sizes_with_cudagraphs=[4]", "dispatch.cudagraph_sizes=[1,4]",
                 "dispatch.compile_sizes=[1]") == [1, 4]  # the user's own sizes stay
    assert load_config(["hardware=cpu"]).hardware.compile_sizes_with_cudagraphs is None


def test_max_autotune_takes_torch_compile_mode_options_where_it_applies():
    from rangedispatch.graph_cache import CompilePolicy

    single, ranged = Range(4, 4), Range(1, 8)
    default = CompilePolicy([], "single_sizes", max_autotune_gemm=False)
    assert default.inductor_options(ranged) == {}
    assert default.inductor_options(single) == {"max_autotune": False, "coordinate_descent_tuning": True}
    always = CompilePolicy([], "always", max_autotune_gemm=True)
    assert always.inductor_options(ranged) == {"max_autotune": True, "coordinate_descent_tuning": True}
    assert CompilePolicy([], "never", max_autotune_gemm=True).inductor_options(single) == {}


def test_warmup_compiles_every_range():
    model, m = make("dispatch.compile_sizes=[16]", "compile.max_autotune=never")
    with pytest.raises(NotTracedError, match="warmup\\(\\) needs example inputs"):
        m.warmup()
    m.warmup(torch.randn(4, 16), torch.randn(4, 16))
    assert all(s["compiled"] for s in m.stats().values())
    y, args = run(m, 16)
    torch.testing.assert_close(y, model(*args))


def test_out_of_range_modes():
    _, m = make()
    run(m, 4)
    with pytest.raises(OutOfRangeError, match="65 tokens is outside the compiled ranges \\[1, 64\\]"):
        run(m, 65)
    model, m = make("dispatch.out_of_range=eager")
    run(m, 4)
    y, args = run(m, 100)
    torch.testing.assert_close(y, model(*args))
    model, m = make("dispatch.out_of_range=compile", "dispatch.max_extra_sizes=1", "compile.max_autotune=never")
    run(m, 4)
    y, args = run(m, 100)
    torch.testing.assert_close(y, model(*args))
    assert m.stats()[Range(100, 100)]["extra"] and m.stats()[Range(100, 100)]["calls"] == 1
    with pytest.raises(OutOfRangeError, match="max_extra_sizes=1"):
        run(m, 101)


def test_concurrent_first_calls_compile_once():
    model, m = make()
    run(m, 4)
    errors = []

    def call():
        try:
            y, args = run(m, 20)
            torch.testing.assert_close(y, model(*args))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert sum(r == Range(9, 32) for g in m.graphs for r in g.records) == 1
    assert m.stats()[Range(9, 32)]["calls"] == 4


def test_graph_breaks_dispatch_every_subgraph():
    class Broken(torch.nn.Module):
        def forward(self, x):
            y = torch.relu(x) * 2
            torch._dynamo.graph_break()
            return y + 1

    model = Broken()
    m = RangeCompiledModule(model, load_config(BASE))
    for n in (4, 5, 20, 40):
        x = torch.randn(n, 3)
        torch.testing.assert_close(m(x), model(x))
    assert len(m.graphs) >= 2
    assert all(Range(9, 32) in g.records for g in m.graphs if g.is_symbolic)


def test_guarded_path_when_the_input_changes():
    model, m = make()
    run(m, 4)
    x = torch.randn(12, 16, dtype=torch.float64)
    model.double()
    torch.testing.assert_close(m(x, x.clone()), model(x, x.clone()))


def test_bad_token_arg():
    with pytest.raises(ConfigError, match="dispatch.token_arg='hidden' is not a parameter of Mlp.forward; allowed: x, residual"):
        make("dispatch.token_arg=hidden")
    _, m = make("dispatch.token_dim=3")
    with pytest.raises(ConfigError, match="dispatch.token_dim=3 does not fit the token input of shape \\(4, 16\\)"):
        run(m, 4)


WARM_START = """
import torch
from torch._dynamo.utils import counters
from rangedispatch import RangeCompiledModule, load_config
import helpers
torch.manual_seed(0)
m = RangeCompiledModule(helpers.Mlp(), load_config(["hardware=cpu", "dispatch.split_points=[8]", "dispatch.max_num_tokens=64"]),
                        passes=[helpers.CensusPass(min_start=9), helpers.AddmmCount()])
for n in (4, 5, 20):
    m(torch.randn(n, 16), torch.randn(n, 16))
matches = [[m.stats()[r]["matches"].get(p) for p in ("census", "addmm_count")] for r in m.ranges]
print("MISSES", counters["inductor"]["fxgraph_cache_miss"], "HITS", counters["inductor"]["fxgraph_cache_hit"], matches)
"""


def test_warm_start_compiles_nothing_new(tmp_path):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]))
    outs = [subprocess.run([sys.executable, "-c", WARM_START], env=env, capture_output=True, text=True, check=True)
            .stdout.split() for _ in range(2)]
    assert int(outs[0][1]) > 0
    assert outs[1][1] == "0" and int(outs[1][3]) > 0
    # the pass did not run in the second process: counts read off the generated code survive the
    # cache hit (output_ops), what a pass returned does not (-1: unknown)
    assert outs[0][4:] == ["[[None,", "1],", "[1,", "1]]"], outs[0]
    assert outs[1][4:] == ["[[None,", "1],", "[-1,", "1]]"], outs[1]


def test_cudagraph_sizes_need_cuda_inputs_from_the_first_call():
    _, m = make("dispatch.cudagraph_sizes=[16]")
    for _ in range(2):  # a call of a size no graph serves too: nothing is traced on CPU
        with pytest.raises(ConfigError, match="dispatch.cudagraph_sizes=\\[16\\] needs CUDA inputs; the token input is on cpu"):
            run(m, 40)
    assert not m.graphs


def test_guard_free_path_runs_each_ranges_artifact_and_leaves_module_globals_alone():
    import helpers

    before = set(vars(helpers))
    model, m = make("dispatch.skip_dynamo_guards=true")
    for n in (4, 5, 5, 20, 20):
        y, args = run(m, n)
        torch.testing.assert_close(y, model(*args))
    assert m._guard_free.signature is not None
    assert set(m._guard_free.bound) == {Range(1, 8), Range(9, 32)}  # bytecode bound to each range's artifact
    assert set(vars(helpers)) == before  # Dynamo's names live in the wrapper's private entry globals
    model.train(False)  # module.training changed: the guarded path takes over, still correct
    y, args = run(m, 6)
    torch.testing.assert_close(y, model(*args))


def test_only_token_dims_are_dynamic_across_wrappers_of_one_class():
    # Dynamo makes a dim dynamic when it changes between traces of the same code: a second wrapper of
    # Mlp with another hidden size would get a symbolic hidden size (fusion needs it static)
    shapes = []
    for hidden in (16, 32):
        torch.manual_seed(0)
        model = Mlp(hidden)
        m = RangeCompiledModule(model, load_config(BASE))
        x, r = torch.randn(12, hidden), torch.randn(12, hidden)
        torch.testing.assert_close(m(x, r), model(x, r))
        fakes = [n.meta["example_value"] for n in m.graphs[0].gm.graph.nodes
                 if n.op == "placeholder" and isinstance(n.meta.get("example_value"), torch.Tensor)]
        shapes.append([tuple(type(s).__name__ for s in f.shape) for f in fakes if f.dim() == 2 and f.shape[-1] == hidden
                       and isinstance(f.shape[0], torch.SymInt)])
    assert shapes[0] == shapes[1] and shapes[1] and all(s == ("SymInt", "int") for s in shapes[1])


class _SplitPerInput(GraphPass):
    """Asks for a split point at 4 tokens per tensor input: a later graph (new keyword) asks for more."""

    name = "split_per_input"

    def split_points(self, gm, ctx):
        return [4 * sum(isinstance(n.meta.get("example_value"), torch.Tensor) for n in gm.graph.nodes
                        if n.op == "placeholder")]

    def applies(self, r):
        return False


class _OptionalBias(torch.nn.Module):
    def forward(self, x, bias=None):
        return x * 2 if bias is None else x * 2 + bias


def test_a_graph_traced_after_the_ranges_are_final_cannot_move_them_and_says_so(caplog):
    cfg = load_config(["hardware=cpu", "dispatch.split_points=[]", "dispatch.max_num_tokens=64"])
    m = RangeCompiledModule(_OptionalBias(), cfg, passes=[_SplitPerInput()])
    x = torch.randn(5, 4)
    m(x)
    assert m.ranges == [Range(1, 4), Range(5, 64)]
    bias = torch.randn(5, 4)
    with caplog.at_level("WARNING", logger="rangedispatch"):
        torch.testing.assert_close(m(x, bias=bias), x * 2 + bias)
    assert m.ranges == [Range(1, 4), Range(5, 64)]
    assert [r.getMessage() for r in caplog.records if "after the ranges became final" in r.getMessage()] == [
        "a graph traced after the ranges became final asks for split points [8]; ranges stay as they are "
        "(passes still only apply where they pay)"]


class SliceAndPad(torch.nn.Module):
    """Tokens [n, 16] and a second input whose length k slices and pads them: Inductor bounds k
    while compiling a range (a shape guard Dynamo never sees)."""

    def forward(self, x, y):
        k = y.shape[0]
        return (x[:, :k] * 2).sum(-1) + torch.nn.functional.pad(x, (0, k)).mean(-1)


def test_a_call_that_breaks_a_shape_guard_added_by_its_range_compile_gets_eager_results(caplog):
    """A range's artifact relies on every shape guard its compile added; Dynamo checks only the
    trace's, so each call of such a range is checked, and one that breaks a guard runs the traced
    graph (said once)."""
    model = SliceAndPad()
    m = RangeCompiledModule(model, load_config(["hardware=cpu", "dispatch.max_num_tokens=64", "dispatch.split_points=[8]"]))
    with caplog.at_level(logging.INFO, logger="rangedispatch"):
        for n, k in [(4, 3), (5, 6), (20, 7), (4, 16), (20, 30)]:
            x, y = torch.randn(n, 16), torch.randn(k)
            torch.testing.assert_close(m(x, y), model(x, y))
        added = [(str(r), str(g)) for graph in m.graphs for r, guards in graph.unchecked.items() for g in guards]
        breakable = [(r, g) for r, g in added if r == "[9,64]" and g.startswith("s") and "<=" in g]
        if not breakable:
            pytest.skip(f"this torch's Inductor bounds no padding width here (added: {added})")
        assert "added shape guards Dynamo does not check" in caplog.text
        bound = int(breakable[0][1].split("<=")[1])
        for _ in range(2):
            x, y = torch.randn(20, 16), torch.randn(bound + 100)
            torch.testing.assert_close(m(x, y), model(x, y))
    assert caplog.text.count("a shape guard its compile added: such calls run the traced graph") == 1


def test_the_errors_a_call_raises_are_importable_from_the_package():
    import rangedispatch
    from rangedispatch import errors

    for name in ("RangeDispatchError", "ConfigError", "OutOfRangeError", "NotTracedError", "GradientsUnsupportedError"):
        assert getattr(rangedispatch, name) is getattr(errors, name) and name in rangedispatch.__all__
