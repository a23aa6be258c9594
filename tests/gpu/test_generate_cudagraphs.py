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


def test_a_fresh_wrapper_in_a_bare_decode_loop_traces_and_compiles_before_the_capture(caplog):
    """A decode loop of one's own (no generate): the first decode call after the prefill makes
    Dynamo trace anew (the static cache was initialized by the prefill); that call is the warm-up,
    run on the buffers the graph is then captured with, so the capture compiles and tunes nothing
    (a compile inside a capture fails in CUDA)."""
    from transformers import StaticCache

    from rangedispatch import RangeCompiledModule, load_config

    model = causal_lm()
    ids = torch.randint(3, 128, (1, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def decode_loop():
        cache = StaticCache(config=model.config, max_cache_len=32)
        tokens = []
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(12, device="cuda"))
            for i in range(6):
                tok = ids[:, :1] if i < 2 else out.logits[:, -1:].argmax(-1)  # a strided view, then fresh tensors
                out = model(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([12 + i], device="cuda"))
                tokens.append(out.logits[:, -1:].argmax(-1).item())
        return tokens

    want = decode_loop()
    model.model = RangeCompiledModule(model.model, load_config([*CFG[:-1], "dispatch.cudagraph_sizes=[1]"]))
    with caplog.at_level(logging.INFO, logger="rangedispatch"):
        assert decode_loop() == want
    lines = [r.getMessage() for r in caplog.records]
    captured = next(i for i, line in enumerate(lines) if line.startswith("captured CUDA graph for 1 tokens"))
    assert not any(line.startswith(("traced graph", "compiled")) for line in lines[captured:])
