"""The skinny GEMM of the decode ranges on one CUDA GPU (Triton): the op against cuBLAS, and the pass
in a wrapped model. Skipped elsewhere, with the reason."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("split_k", [1, 4])
@pytest.mark.parametrize("ns", [(1000,), (1000, 200, 1), (512, 64, 64, 300)], ids=["1 weight", "3", "4"])
@pytest.mark.parametrize("block_m", [16, 64])
def test_skinny_mm_equals_cublas_for_any_row_count(dtype, bias, split_k, ns, block_m):
    from rangedispatch.gemm.skinny_gemm_op import TileConfig, skinny_mm

    torch.manual_seed(0)
    k = 1064  # not a multiple of the tiles, nor are most N
    ws = [torch.randn(n, k, dtype=dtype, device="cuda") / k ** 0.5 for n in ns]
    bs = [torch.randn(n, dtype=dtype, device="cuda") for n in ns] if bias else []
    cfg = TileConfig(block_m, 64, 128, split_k, 4, 3)
    for m in (1, 5, block_m, block_m + 1, 2 * block_m + 3):  # more rows than one block holds, up to 3 blocks
        a = torch.randn(m, k, dtype=dtype, device="cuda")
        outs = skinny_mm(a, [w.t() for w in ws], bs, list(cfg))
        for i, (w, out) in enumerate(zip(ws, outs)):
            ref = torch.addmm(bs[i], a, w.t()) if bias else a @ w.t()
            assert out.dtype == dtype and out.shape == (m, ns[i])
            assert rel_err(out, ref) < 1e-2, (m, i, rel_err(out, ref))


class _MLP(torch.nn.Module):
    """gate/up read one input (one launch), down reads another."""

    def __init__(self, hidden=512, inter=1536):
        super().__init__()
        self.gate = torch.nn.Linear(hidden, inter, bias=False)
        self.up = torch.nn.Linear(hidden, inter, bias=False)
        self.down = torch.nn.Linear(inter, hidden, bias=True)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def test_the_pass_replaces_the_matmuls_of_the_decode_range_only(caplog):
    import logging

    from rangedispatch import RangeCompiledModule, load_config

    torch.manual_seed(0)
    model = _MLP().to("cuda", torch.bfloat16)
    cfg = load_config(["hardware=h200", "hardware.skinny_gemm_max_tokens=128", "compile.skinny_gemm=always",
                       "dispatch.max_num_tokens=256", "dispatch.split_points=[]", "hardware.compile_sizes=[]"])
    m = RangeCompiledModule(model, cfg)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="rangedispatch"):
        for n in (3, 16, 100, 200):  # 100: two 64-row blocks per column tile
            x = torch.randn(n, 512, dtype=torch.bfloat16, device="cuda")
            assert rel_err(m(x), model(x)) < 1e-2, n
    stats = m.stats()
    assert str(m.range_for(3)) == "[1,16]" and m.range_for(16) == m.range_for(3)
    assert str(m.range_for(100)) == "[65,128]"
    for n in (3, 100):
        assert stats[m.range_for(n)]["matches"] == {"skinny_gemm": 2}  # launches: gate+up, down
    assert stats[m.range_for(200)]["matches"].get("skinny_gemm", 0) == 0
    for rows, r in ((16, "[1,16]"), (64, "[65,128]")):
        assert f"skinny GEMM 1536+1536x512 bfloat16 for {r} tokens: {rows}x" in caplog.text  # gate/up: one launch
        assert f"skinny GEMM 512x1536 bfloat16 +bias for {r} tokens: {rows}x" in caplog.text


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3"])
def test_hf_models_in_the_decode_ranges_equal_eager(family):
    """Llama and Gemma2 (q/k/v, gate/up: groups), Qwen2 (biased q/k/v: addmm groups), Phi3 (fused
    qkv and gate_up projections: one weight per input), bf16, first call at 1 token."""
    pytest.importorskip("transformers")
    from rangedispatch import RangeCompiledModule, load_config
    from rangedispatch.bench.hf_models import build

    model = build(family, 256, 512, dtype=torch.bfloat16, device="cuda")
    cfg = load_config(["hardware=h200", "hardware.skinny_gemm_max_tokens=32", "compile.skinny_gemm=always",
                       "dispatch.max_num_tokens=64", "dispatch.split_points=[]"])
    m = RangeCompiledModule(model, cfg)
    with torch.no_grad():
        for seq in (1, 5, 20):
            ids = torch.randint(1, 128, (1, seq), device="cuda")
            got = m(input_ids=ids, use_cache=False).last_hidden_state
            assert rel_err(got, model(input_ids=ids, use_cache=False).last_hidden_state) < 3e-2, seq
    launches = {str(r): s["matches"].get("skinny_gemm", 0) for r, s in m.stats().items() if s["calls"]}
    # per layer: q/k/v (one group, or Phi3's qkv_proj), o, gate/up (one group, or gate_up_proj), down
    assert launches["[1,16]"] == launches["[17,32]"] == 2 * 4, launches
