"""Hugging Face models under tensor parallelism on 2 gloo ranks, written by hand and with DTensor
(``parallelize_module``): the same ranges, the same fusion threshold, the same matches and eager
numerics on both ranks, with the first call at 1 token. One spawn runs the selected cases; the ranks
return named records (below)."""

from dataclasses import dataclass

import pytest
import torch

from rangedispatch.cli.launch import spawn_ranks

pytest.importorskip("transformers")

HIDDEN = 64
THRESHOLD = 65536 // (HIDDEN * 4)  # the cpu profile's 64 KiB over fp32 rows of 64
SEQS = (1, 5, 40, THRESHOLD + 44, 1)
CASES = [(family, style) for family in ("llama", "qwen2", "gemma2") for style in ("handwritten", "dtensor")]
CASES += [("llama", "dtensor_output")]  # use_local_output=False: the row-parallel outputs stay DTensors
# run by default: every style on Llama, and Qwen2's biases; the rest with -m slow (Gemma's norm
# form is matched under TP in test_fusion_distributed.py)
DEFAULT = {("llama", "handwritten"), ("llama", "dtensor"), ("llama", "dtensor_output"), ("qwen2", "handwritten")}
SITES = 4  # 2 layers x (attention output, MLP output): all-reduce -> (+ residual) -> RMSNorm


@dataclass(frozen=True, order=True)
class GraphMatches:
    """The matches of every pass in one graph's compile for one range."""

    range: str
    matches: int


@dataclass
class TPCase:
    """A Hugging Face model under one TP style, wrapped on one rank."""

    ranges: list[str]
    errors: list[float]  # per call: the largest absolute difference from eager
    per_graph: list[GraphMatches]  # sorted


def _matrix(rank, world, cases, overrides=(), seqs=SEQS):
    import hf_models
    from rangedispatch import RangeCompiledModule, load_config

    torch.set_num_threads(1)
    results = {}
    for family, style in cases:
        model = hf_models.tensor_parallel(hf_models.build(family, torch.float32, hidden=HIDDEN), style)
        m = RangeCompiledModule(model, load_config(["hardware=cpu", "dispatch.max_num_tokens=1024", *overrides]))
        errors = []
        with torch.no_grad():
            for seq in seqs:
                kwargs = hf_models.inputs(1, seq, mask=False)
                got, want = m(**kwargs).last_hidden_state, model(**kwargs).last_hidden_state
                if type(got) is not torch.Tensor:  # DTensor outputs
                    got, want = got.full_tensor(), want.full_tensor()
                errors.append((got - want).abs().max().item())
        per_graph = sorted(GraphMatches(str(r), sum(rec.matches.values())) for g in m.graphs
                           for r, rec in g.records.items())
        results[(family, style)] = TPCase([str(r) for r in m.ranges], errors, per_graph)
    return results


@pytest.fixture(scope="module")
def matrix(request):
    """One spawn for the cases this session selected."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    cases = [item.callspec.params["case"] for item in request.session.items
             if item.originalname == "test_tensor_parallel_hf_model_fuses_like_the_handwritten_form"]
    return spawn_ranks(_matrix, 2, cases, backend="gloo")


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c in DEFAULT else pytest.mark.slow) for c in CASES],
                         ids=lambda c: "-".join(c))
def test_tensor_parallel_hf_model_fuses_like_the_handwritten_form(matrix, case):
    for rank_results in matrix:
        res = rank_results[case]
        assert res.ranges == ["[1,8]", "[9,32]", f"[33,{THRESHOLD}]", f"[{THRESHOLD + 1},1024]"]
        assert max(res.errors) < 1e-4, res.errors
        # every graph compiled for a fused range fused every site; none above the threshold
        assert res.per_graph == sorted([GraphMatches("[1,8]", SITES), GraphMatches("[1,8]", SITES),
                                        GraphMatches(f"[33,{THRESHOLD}]", SITES),
                                        GraphMatches(f"[{THRESHOLD + 1},1024]", 0)])


SP_CASES = [("llama", "handwritten"), ("llama", "dtensor"), ("qwen2", "handwritten")]  # Qwen2: q/k/v with biases


def test_sequence_parallel_tier_with_async_tp_on_hf_llama_matches_eager():
    """Above the fused sizes, every site becomes reduce-scatter -> norm on a block of tokens ->
    all-gather (odd token counts included), under hand-written and DTensor TP; async TP then joins
    each reduce-scatter to the projection before it (o_proj, down_proj) and each gather to the
    projections after it (gate/up; the second layer's q/k/v, their biases added after), through the
    process group here."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    sp = ["+hardware.thresholds.default.sp_min_bytes=65536", "+hardware.thresholds.default.async_tp_min_bytes=65536"]
    for rank_results in spawn_ranks(_matrix, 2, SP_CASES, sp, (1, 5, THRESHOLD + 45, 700), backend="gloo"):
        for case in SP_CASES:
            res = rank_results[case]
            assert res.ranges == ["[1,8]", "[9,32]", f"[33,{THRESHOLD}]", f"[{THRESHOLD + 1},1024]"], case
            assert max(res.errors) < 1e-4, (case, res.errors)
            # SITES sequence-parallel sites; async TP: SITES matmul + reduce-scatter, 3 gathers + matmuls
            assert GraphMatches(f"[{THRESHOLD + 1},1024]", SITES + SITES + 3) in res.per_graph, (case, res.per_graph)
