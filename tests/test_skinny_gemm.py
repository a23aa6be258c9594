"""The skinny-GEMM pass of the decode ranges, on CPU: its config keys, the range it asks for, which
matmuls it takes (on fake CUDA values), and that it leaves everything else alone and says why. The
kernel itself is tested against cuBLAS in tests/gpu/test_skinny_gemm_kernel.py."""

import logging
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from rangedispatch import RangeCompiledModule, load_config
from rangedispatch.errors import ConfigError
from rangedispatch.gemm.skinny_gemm_op import block_m_for, unsupported
from rangedispatch.gemm.skinny_gemm_pass import _operands

def mlp():
    return torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.SiLU(), torch.nn.Linear(48, 16, bias=False))


BASE = ["hardware=cpu", "fusion.enabled=false", "dispatch.max_num_tokens=64", "dispatch.split_points=[]",
        "compile.max_autotune=never"]


def test_bad_values_name_the_key_and_what_is_allowed():
    with pytest.raises(ConfigError, match=r"compile.skinny_gemm='fast' is not allowed; expected one of never, tuned, "
                                          r"always"):
        load_config([*BASE, "compile.skinny_gemm=fast"])
    with pytest.raises(ConfigError, match=r"hardware.skinny_gemm_max_tokens=-1 is not allowed"):
        load_config([*BASE, "+hardware.skinny_gemm_max_tokens=-1"])


def test_the_decode_range_gets_the_pass_and_cpu_matmuls_are_left_alone(caplog):
    torch.manual_seed(0)
    model = mlp()
    m = RangeCompiledModule(model, load_config([*BASE, "+hardware.skinny_gemm_max_tokens=16"]))
    with caplog.at_level(logging.INFO, logger="rangedispatch"), torch.no_grad():
        for n in (40, 3, 5, 16, 17):  # traced at 40: the [1,16] graph still sees rows of at most 16
            x = torch.randn(n, 16)
            torch.testing.assert_close(m(x), model(x))
    assert [str(r) for r in m.ranges] == ["[1,16]", "[17,64]"]
    assert "passes: [1,16] skinny_gemm" in caplog.text and "more than the" not in caplog.text
    assert caplog.text.count("skinny GEMM: matmuls left as they are: not CUDA (cpu)") == 1
    stats = m.stats()
    assert stats[m.range_for(5)]["matches"] == {"skinny_gemm": 0}
    assert stats[m.range_for(40)]["passes"] == []


def test_each_tile_height_up_to_the_limit_gets_a_range_of_its_own(caplog):
    torch.manual_seed(0)
    model = mlp()
    m = RangeCompiledModule(model, load_config([*BASE, "+hardware.skinny_gemm_max_tokens=40"]))
    with caplog.at_level(logging.INFO, logger="rangedispatch"), torch.no_grad():
        for n in (3, 20, 36, 50):
            x = torch.randn(n, 16)
            torch.testing.assert_close(m(x), model(x))
    assert [str(r) for r in m.ranges] == ["[1,16]", "[17,32]", "[33,40]", "[41,64]"]
    assert "passes: [1,16] skinny_gemm, [17,32] skinny_gemm, [33,40] skinny_gemm" in caplog.text


class _FourRowsPerToken(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(x.repeat(4, 1))


def test_matmuls_whose_rows_are_not_the_token_count_are_left_alone(caplog):
    model = _FourRowsPerToken()
    m = RangeCompiledModule(model, load_config([*BASE, "+hardware.skinny_gemm_max_tokens=16"]))
    with caplog.at_level(logging.INFO, logger="rangedispatch"), torch.no_grad():
        for n in (3, 5):
            x = torch.randn(n, 16)
            torch.testing.assert_close(m(x), model(x))
    assert re.search(r"skinny GEMM: matmuls left as they are: 4\*s\d+ rows, more than the 16 tokens at the "
                     r"range's end \(not the token count\)", caplog.text), caplog.text[-2000:]


@pytest.mark.parametrize("overrides", [["compile.skinny_gemm=never", "+hardware.skinny_gemm_max_tokens=16"], []],
                         ids=["mode never", "no limit in the profile"])
def test_off_means_no_pass_and_no_split_point(overrides):
    m = RangeCompiledModule(mlp(), load_config([*BASE, *overrides]))
    with torch.no_grad():
        m(torch.randn(5, 16))
    assert [str(r) for r in m.ranges] == ["[1,64]"]
    assert m.stats()[m.range_for(5)]["passes"] == []


def test_it_takes_the_matmuls_of_linear_layers_on_cuda_in_bf16_or_fp16():
    with FakeTensorMode():
        x = torch.empty(5, 64, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(32, 64, dtype=torch.bfloat16, device="cuda")
        b = torch.empty(32, dtype=torch.bfloat16, device="cuda")
        gm = make_fx(lambda x, w, b: torch.nn.functional.linear(x, w, b) + torch.nn.functional.linear(x, w))(x, w, b)
        found = [ops for n in gm.graph.nodes if n.op == "call_function" and (ops := _operands(n)) is not None]
        assert [(a.name, b_.target, bias.name if bias is not None else None) for a, b_, bias in found] == [
            ("x_1", torch.ops.aten.t.default, "b_1"), ("x_1", torch.ops.aten.t.default, None)]
        assert unsupported(x, w.t(), b) is None and unsupported(x.half(), w.t().half(), None) is None
        assert unsupported(x.float(), w.t().float(), None) == \
            "torch.float32 x torch.float32 (the kernel takes bf16 or fp16 on both sides)"
        assert unsupported(x, torch.empty(64, 32, dtype=torch.bfloat16, device="cuda"), None).startswith(
            "b has strides (32, 1)")
        huge = torch.empty(2 ** 25, 64, dtype=torch.bfloat16, device="cuda")  # 2^31 elements
        assert unsupported(x, huge.t(), None) == "a weight of 33554432 x 64 elements (the kernel's offsets are 32-bit)"
    assert unsupported(torch.empty(5, 64), torch.empty(32, 64).t(), None) == "not CUDA (cpu)"


def test_matmuls_that_read_one_input_form_one_group():
    from torch._inductor.pattern_matcher import stable_topological_sort

    from rangedispatch.gemm.skinny_gemm_op import SKINNY_MM_OP, TileConfig
    from rangedispatch.gemm.skinny_gemm_pass import SkinnyGemm, _replace
    from rangedispatch.passes import PassContext
    from rangedispatch.ranges import Range

    def qkv_and_out(x, wq, wk, wv, wo):
        q, k, v = (torch.nn.functional.linear(x, w) for w in (wq, wk, wv))  # each reshapes x itself
        return torch.nn.functional.linear(q * k * v, wo)

    with FakeTensorMode():
        bf16 = dict(dtype=torch.bfloat16, device="cuda")
        args = [torch.empty(1, 5, 64, **bf16), *(torch.empty(32, 64, **bf16) for _ in range(3)),
                torch.empty(64, 32, **bf16)]
        gm = make_fx(qkv_and_out)(*args)
    groups = SkinnyGemm(16)._groups(gm.graph, PassContext(range=Range(1, 16)))
    views = [{m.a.name for m in group} for group in groups]
    assert [len(group) for group in groups] == [3, 1] and len(views[0]) == 3, views
    assert [m.b.args[0].name for m in groups[0]] == ["wq_1", "wk_1", "wv_1"]
    # one op for the group, after the last weight it reads (traced after q's matmul)
    _replace(gm.graph, groups[0], TileConfig(16, 64, 128, 1, 4, 3))
    stable_topological_sort(gm.graph)
    gm.graph.lint()
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(SKINNY_MM_OP) == 1 and targets.count(torch.ops.aten.mm.default) == 1


def test_a_matmul_whose_weight_the_graph_computes_stays_alone():
    from rangedispatch.gemm.skinny_gemm_pass import SkinnyGemm
    from rangedispatch.passes import PassContext
    from rangedispatch.ranges import Range

    def scores(x, w):
        y = torch.nn.functional.linear(x, w)
        return x @ y.t()  # reads x too, but its "weight" is the first matmul's output

    with FakeTensorMode():
        bf16 = dict(dtype=torch.bfloat16, device="cuda")
        gm = make_fx(scores)(torch.empty(5, 64, **bf16), torch.empty(64, 64, **bf16))
    groups = SkinnyGemm(16)._groups(gm.graph, PassContext(range=Range(1, 16)))
    assert [len(group) for group in groups] == [1, 1]


def test_one_row_block_covers_the_range_up_to_64_rows():
    assert [block_m_for(n) for n in (1, 16, 17, 32, 33, 64, 65, 128)] == [16, 16, 32, 32, 64, 64, 64, 64]


def test_the_bench_also_times_range_dispatch_without_it():
    from rangedispatch.bench.suites import range_dispatch_variants

    on = load_config([*BASE, "+hardware.skinny_gemm_max_tokens=16"])
    variants = range_dispatch_variants(mlp(), on, 64, ())
    assert list(variants) == ["range_dispatch", "range_dispatch_cublas"]
    assert variants["range_dispatch_cublas"].config.compile.skinny_gemm == "never"
    assert list(range_dispatch_variants(mlp(), load_config(BASE), 64, ())) == ["range_dispatch"]
