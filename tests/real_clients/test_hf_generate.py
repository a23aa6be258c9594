"""Hugging Face ``generate`` through the wrapper, as people run it: ``model.model`` replaced by a
``RangeCompiledModule``, greedy decoding with the default dynamic cache (batch 1, and batch 2 with
left padding), with the static cache, with HF's own compile of the decode step around the wrapper,
and under HF's tensor parallelism (``tp_plan="auto"``). Every generate must give eager's tokens (the
LM head is scaled so that greedy choices are not near ties), and the number of graphs must settle:
more decode steps trace nothing new."""

import pytest
import torch

from rangedispatch import RangeCompiledModule, load_config

transformers = pytest.importorskip("transformers")

PROMPT, NEW_TOKENS = 12, 6
CONFIG = ["hardware=cpu", "dispatch.max_num_tokens=256", "compile.max_autotune=never"]
CI = ("llama", "qwen2")
FAMILIES = [pytest.param(f, marks=() if f in CI else pytest.mark.slow) for f in ("llama", "qwen2", "gemma2", "phi3")]


def causal_lm(family, hidden=32):
    from hf_models import build_causal_lm

    return build_causal_lm(family, hidden)


def prompt(batch, left_pad=0):
    ids = torch.randint(1, 128, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(ids)
    mask[0, :left_pad] = 0
    return ids, mask


def generate(model, ids, mask, new_tokens=NEW_TOKENS, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, **kwargs)


def graphs(wrapper):
    return len(wrapper.graphs)


@pytest.fixture(scope="module", params=FAMILIES)
def loop(request):
    """One model, its wrapper, and the eager and wrapped tokens of the loops people run, in order."""
    model = causal_lm(request.param)
    runs = {}
    cases = {"dynamic": (prompt(1), {}), "dynamic_batch2_left_padded": (prompt(2, left_pad=4), {}),
             "static": (prompt(1), {"cache_implementation": "static"})}
    eager = {name: generate(model, *inputs, **kw) for name, (inputs, kw) in cases.items()}
    wrapper = RangeCompiledModule(model.model, load_config(CONFIG))
    model.model = wrapper
    counts = {}
    for name, (inputs, kw) in cases.items():
        runs[name] = generate(model, *inputs, **kw)
        runs[name + "_again"] = generate(model, *inputs, **kw)
        counts[name] = graphs(wrapper)
    longer = generate(model, *cases["dynamic"][0], new_tokens=3 * NEW_TOKENS)
    counts["longer"] = graphs(wrapper)
    model.model = wrapper.module
    longer_eager = generate(model, *cases["dynamic"][0], new_tokens=3 * NEW_TOKENS)
    return dict(eager=eager, runs=runs, counts=counts, longer=(longer, longer_eager), wrapper=wrapper)


@pytest.mark.parametrize("case", ["dynamic", "dynamic_batch2_left_padded", "static"])
def test_generate_gives_eager_tokens_with_every_cache(loop, case):
    assert torch.equal(loop["runs"][case], loop["eager"][case])
    assert torch.equal(loop["runs"][case + "_again"], loop["eager"][case])


def test_graphs_settle_whatever_the_number_of_decode_steps(loop):
    longer, longer_eager = loop["longer"]
    assert torch.equal(longer, longer_eager)
    counts = loop["counts"]
    # three times the decode steps trace nothing new; each cache adds a bounded number of graphs
    # (prefill, a first decode step, the decode step with a symbolic KV length)
    assert counts["longer"] == counts["static"] <= 8
    assert counts["dynamic"] <= 4
    reasons = [g.reason for g in loop["wrapper"].graphs]
    assert reasons[0] == "first trace" and all(reasons[1:])
    calls = {str(r): s["calls"] for r, s in loop["wrapper"].stats().items()}
    decode_steps = 3 * 2 * (NEW_TOKENS - 1) + (3 * NEW_TOKENS - 1)  # three caches twice, then the longer one
    assert calls["[1,8]"] == decode_steps and calls["[9,32]"] == 3 * 2 + 1  # a prefill per generate


def test_hf_compiling_the_decode_step_around_the_wrapper_gives_eager_tokens(caplog, monkeypatch):
    """HF's own compile of the decode step (static cache) traces into the wrapper: that compile then
    takes the plain model, says so once, and the tokens are eager's."""
    import logging

    monkeypatch.setattr("rangedispatch.wrapper._said_outer_compile", False)
    model = causal_lm("llama")
    ids, mask = prompt(1)
    want = generate(model, ids, mask, cache_implementation="static")
    model.model = RangeCompiledModule(model.model, load_config(CONFIG))
    compile_config = transformers.CompileConfig(backend="eager", mode=None)
    compile_config._compile_all_devices = True  # HF compiles on CUDA only unless told (its testing switch)
    with caplog.at_level(logging.WARNING, logger="rangedispatch"):
        got = generate(model, ids, mask, cache_implementation="static", compile_config=compile_config)
    assert torch.equal(got, want)
    said = [r.getMessage() for r in caplog.records if "inside another torch.compile" in r.getMessage()]
    assert len(said) == 1 and "disable_compile=True" in said[0]


def _tp_plan_auto(rank, world, path):
    from rangedispatch import RangeCompiledModule, load_config

    torch.set_num_threads(1)
    try:  # transformers >= 5.18 takes the plan through DistributedConfig
        from transformers import DistributedConfig

        kwargs = {"distributed_config": DistributedConfig(tp_plan="auto")}
    except ImportError:
        kwargs = {"tp_plan": "auto"}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    ids, mask = prompt(1)
    want = generate(model, ids, mask)
    wrapper = RangeCompiledModule(model.model, load_config(["hardware=cpu", "dispatch.max_num_tokens=1024",
                                                            "compile.max_autotune=never"]))
    model.model = wrapper
    got = generate(model, ids, mask)
    again = generate(model, ids, mask)  # the prefill's range compiles on its first call after the trace
    matches = {str(r): s["matches"].get("allreduce_rmsnorm", 0) for r, s in wrapper.stats().items() if s["compiled"]}
    return dict(same=torch.equal(got, want) and torch.equal(again, want), ranges=[str(r) for r in wrapper.ranges], matches=matches,
                dtensor=type(model.model.module.layers[0].mlp.down_proj.weight).__name__)


def test_hf_tensor_parallel_tp_plan_auto_fuses_in_generate(tmp_path):
    pytest.importorskip("accelerate")
    from rangedispatch.cli.launch import spawn_ranks

    causal_lm("llama", hidden=64).save_pretrained(tmp_path)
    for res in spawn_ranks(_tp_plan_auto, 2, str(tmp_path), backend="gloo", timeout=900):
        assert res["same"] and res["dtensor"] == "DTensor"
        threshold = 65536 // (64 * 4)  # the cpu profile's 64 KiB over fp32 rows of 64, as for parallelize_module
        assert res["ranges"] == ["[1,8]", "[9,32]", f"[33,{threshold}]", f"[{threshold + 1},1024]"]
        assert res["matches"]["[1,8]"] > 0 and res["matches"]["[9,32]"] > 0  # decode steps and the prefill fused


def test_save_pretrained_through_the_wrapper_loads_into_the_plain_model(tmp_path):
    """``save_pretrained`` of a model whose decoder is wrapped writes the plain model's checkpoint."""
    model = causal_lm("llama")
    model.model = RangeCompiledModule(model.model, load_config(CONFIG))
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    want = {k: v for k, v in model.state_dict().items()}
    got = loaded.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
