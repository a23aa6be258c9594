"""HF generate with the wrapper's CUDA graphs, on one CUDA GPU: decode steps replay a captured graph
with the static cache updated in place, ``[batch, 1]`` decode and ``[batch, seq]`` prefill dispatch
without choosing a token dim, a new cache (the next generate) is captured again, and a dynamic
cache runs without graphs, saying so. Tokens equal eager's every time. Skipped without a GPU."""

import logging

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
transformers = pytest.importorskip("transformers")

CFG = ["hardware=cpu", "fusion.enabled=false", "dispatch.max_num_tokens=256", "compile.max_autotune=never"]


def causal_lm():
    from rangedispatch.bench.hf_models import build

    return build("llama", 64, 128, layers=2, dtype=torch.bfloat16, device="cuda", lm_head_scale=20.0)


def generate(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                              do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("batch", [1, 3])
def test_static_cache_decode_replays_captured_graphs_with_eager_tokens(batch, caplog):
    from rangedispatch import RangeCompiledModule, load_config

    model = causal_lm()
    ids = torch.randint(3, 128, (batch, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(batch))
    want = generate(model, ids, cache_implementation="static", disable_compile=True)
    wrapper = RangeCompiledModule(model.model, load_config([*CFG, f"dispatch.cudagraph_sizes=[{batch}]"]))
    model.model = wrapper
    with caplog.at_level(logging.INFO, logger="rangedispatch"):
        for _ in range(3):  # each generate makes a new static cache: captured again
            assert torch.equal(generate(model, ids, cache_implementation="static", disable_compile=True), want)
    assert wrapper.stats()[wrapper.range_for(batch)]["cudagraphs"] == [batch]
    assert caplog.text.count("captured CUDA graph for %d tokens" % batch) == 3  # once per generate (new cache)
    assert "not used" not in caplog.text


def test_dynamic_cache_runs_without_graphs_and_says_so(caplog):
    from rangedispatch import RangeCompiledModule, load_config

    model = causal_lm()
    ids = torch.randint(3, 128, (1, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    want = generate(model, ids)
    model.model = RangeCompiledModule(model.model, load_config([*CFG, "dispatch.cudagraph_sizes=[1]"]))
    with caplog.at_level(logging.WARNING, logger="rangedispatch"):
        assert torch.equal(generate(model, ids), want)
    assert caplog.text.count("CUDA graph for 1 tokens not used") == 1
    assert "does not declare is_compileable=True" in caplog.text
