"""The sequence-parallel tier on 2 real gloo ranks: each all-reduce -> (+ residual) -> RMSNorm site of
the largest range becomes reduce-scatter -> add and norm on this rank's block of tokens ->
all-gather, the residual stream stays split between sites, token counts the world size does not
divide are padded, and the results match eager."""

import pytest
import torch

from rangedispatch.cli.launch import spawn_ranks

HIDDEN = 64  # bf16: 128 bytes per token; the cpu profile fuses up to 64 KiB = 512 tokens
SP = ["hardware=cpu", "dispatch.max_num_tokens=4096", "dispatch.split_points=[8]",
      "+hardware.thresholds.default.sp_min_bytes=65536"]
# symm-mem to 2048 tokens; sequence parallelism measured for this hidden size from 2560 tokens (320 KiB)
WITH_SYMM_MEM = [*SP, "+hardware.thresholds.default.symm_mem_max_bytes=262144",
                 "+hardware.thresholds.default.sp_min_bytes_by_hidden={64: 327680}"]
TOKENS = (4, 300, 513, 1001, 2049, 3001)


def _run(rank, world):
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from helpers import CensusPass
    from rangedispatch import RangeCompiledModule, load_config
    from rangedispatch.bench.models import TPMLPBlock

    torch.set_num_threads(1)
    torch._inductor.config.fx_graph_cache = False  # the census pass must see every graph
    out = {}
    for name, overrides in {"sp": SP, "with_symm_mem": WITH_SYMM_MEM}.items():
        torch.manual_seed(0)
        model = TPMLPBlock(hidden=HIDDEN, intermediate=128, layers=3, norm="llama", dtype=torch.bfloat16)
        census = CensusPass()
        m = RangeCompiledModule(model, load_config(overrides), passes=[census])
        errors = {}
        for n in TOKENS:
            x = torch.randn(n, HIDDEN, dtype=torch.bfloat16)
            with torch.no_grad():
                y, h = m(x.clone())
                ye, he = model(x.clone())
            errors[n] = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in ((y, ye), (h, he)))
        ops = ("sp_reduce_scatter.default", "sp_shard.default", "sp_all_gather.default", "all_reduce.default")
        census_counts = {str(r): tuple(seen.get(op, 0) for op in ops) for r, seen in census.seen.items()}
        out[name] = dict(ranges=[str(r) for r in m.ranges], errors=errors, census=census_counts,
                         matches={str(r): {k: v for k, v in s["matches"].items() if k != "census"}
                                  for r, s in m.stats().items() if s["compiled"]})
    return out


@pytest.fixture(scope="module")
def results():
    return spawn_ranks(_run, 2, backend="gloo")


def test_the_largest_range_is_sequence_parallel_and_matches_eager(results):
    for rank in results:
        res = rank["sp"]
        assert res["ranges"] == ["[1,8]", "[9,512]", "[513,4096]"]
        assert all(err < 1e-2 for err in res["errors"].values()), res["errors"]  # bf16, odd counts included
        assert res["matches"]["[513,4096]"] == {"sequence_parallel": 3}
        # 3 layers: a reduce-scatter each, one block cut from the first residual (the others stay
        # split), an all-gather of each norm output and one of the last sum (a graph output)
        assert res["census"]["[513,4096]"] == (3, 1, 4, 0)
        assert res["census"]["[9,512]"] == (0, 0, 0, 0)  # fused there


def test_sequence_parallelism_starts_above_the_symmetric_memory_tier_where_its_hidden_size_says(results):
    res = results[0]["with_symm_mem"]
    assert res["ranges"] == ["[1,8]", "[9,512]", "[513,2048]", "[2049,2559]", "[2560,4096]"]
    assert all(err < 1e-2 for err in res["errors"].values()), res["errors"]
    assert res["matches"]["[513,2048]"] == {"symm_mem_allreduce": 3}
    assert res["matches"]["[2049,2559]"] == {}  # NCCL: above symm-mem, below this hidden size's start
    assert res["matches"]["[2560,4096]"] == {"sequence_parallel": 3}
