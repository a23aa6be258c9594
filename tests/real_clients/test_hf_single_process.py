"""Hugging Face models as people call them, in one process: ids [1, seq], the first call at 1 token,
``attention_mask`` present on some calls and not on others, fp32 and bf16. Every call must equal
eager, count batch x seq tokens, and stay within a few graphs (one per Dynamo code path)."""

import pytest
import torch

from hf_models import FAMILIES, build, inputs
from rangedispatch import RangeCompiledModule, load_config

pytest.importorskip("transformers")

SEQS = (1, 5, 33, 300)
CI = {("llama", "float32"), ("qwen2", "float32"), ("gemma2", "float32"), ("phi3", "float32"), ("llama", "bfloat16")}
CASES = [pytest.param(f, d, marks=() if (f, d) in CI else pytest.mark.slow)
         for f in FAMILIES for d in ("float32", "bfloat16")]


def assert_matches_eager(got, want):
    """fp32: element by element. bf16: Inductor's kernels keep fp32 intermediates where eager rounds
    to bf16 after every op, so single elements near zero differ by several bf16 steps; the relative
    L2 error is compared, with the margin plain torch.compile needs too (Gemma2 bf16: torch.compile
    vs eager 0.8-1.5%, rangedispatch vs eager 0.8-1.4%, same seeds and calls)."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    else:
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert err < 3e-2, err


@pytest.mark.parametrize("family,dtype_name", CASES)
def test_hf_model_any_first_call_with_and_without_mask(family, dtype_name):
    dtype = getattr(torch, dtype_name)
    model = build(family, dtype)
    m = RangeCompiledModule(model, load_config(["hardware=cpu", "dispatch.max_num_tokens=512",
                                                "dispatch.split_points=[8]"]))
    with torch.no_grad():
        for seq in SEQS:
            for mask in (False, True):
                kwargs = inputs(1, seq, mask)
                got = m(**kwargs).last_hidden_state
                assert_matches_eager(got, model(**kwargs).last_hidden_state)
        kwargs = inputs(3, 11, True)  # batch 3: 33 tokens
        assert_matches_eager(m(**kwargs).last_hidden_state, model(**kwargs).last_hidden_state)
    calls = {str(r): s["calls"] for r, s in m.stats().items()}
    assert calls == {"[1,8]": 4, "[9,512]": 5}
    # graphs: (batch 1, seq 1) and (batch 1, any seq), each with and without a mask, and any batch
    assert len(m.graphs) <= 6 and sum(g.is_symbolic for g in m.graphs) >= 3


def test_bench_attention_sdpa_is_causal_equals_sdpa_without_a_mask_tensor():
    """The benchmark's ``sdpa_is_causal`` attention: same output as HF's SDPA for input_ids alone,
    SDPA called with is_causal=True and no mask under torch.compile, and refused where it would differ."""
    from rangedispatch.bench import hf_models

    causal, plain = (hf_models.build("llama", 32, 64, attention=a) for a in ("sdpa_is_causal", "hf_default"))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    kwargs = inputs(1, 9, mask=False)
    with torch.no_grad():
        got = torch.compile(causal, backend=backend, dynamic=True)(**kwargs).last_hidden_state
        torch.testing.assert_close(got, plain(**kwargs).last_hidden_state)
        sdpa = [n for n in graphs[0].graph.nodes if n.target is torch._C._nn.scaled_dot_product_attention]
        assert len(sdpa) == 2 and all(n.kwargs["is_causal"] and n.kwargs["attn_mask"] is None for n in sdpa)
        with pytest.raises(ValueError, match="attention=sdpa_is_causal: only for calls with input_ids alone"):
            causal(**inputs(1, 9, mask=True))
    with pytest.raises(ValueError, match="attention=sdpa_is_causal: gemma2 has sliding-window layers"):
        hf_models.build("gemma2", 32, 64, attention="sdpa_is_causal")
