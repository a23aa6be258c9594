"""The sequence-parallel tier on 2 real gloo ranks: each all-reduce -> (+ residual) -> RMSNorm site of
the largest range becomes reduce-scatter -> add and norm on this rank's block of tokens ->
all-gather, the residual stream stays split between sites, token counts the world size does not
divide are padded, and the results match eager. The ranks return named records (below)."""

import logging
from dataclasses import dataclass

import pytest
import torch

from rangedispatch.cli.launch import spawn_ranks

HIDDEN = 64  # bf16: 128 bytes per token; the cpu profile fuses up to 64 KiB = 512 tokens
SP = ["hardware=cpu", "dispatch.max_num_tokens=4096", "dispatch.split_points=[8]",
      "+hardware.thresholds.default.sp_min_bytes=65536"]
# symm-mem to 2048 tokens; sequence parallelism measured for this hidden size from 2560 tokens (320 KiB)
WITH_SYMM_MEM = [*SP, "+hardware.thresholds.default.symm_mem_max_bytes=262144",
                 "+hardware.thresholds.default.sp_min_bytes_by_hidden={64: 327680}"]
# async TP on top from 1563 tokens (200000 B / 128 B per token), measured for this hidden size (the
# start for other hidden sizes is never used)
ASYNC_TP = [*SP, "+hardware.thresholds.default.async_tp_min_bytes=999999999",
            "+hardware.thresholds.default.async_tp_min_bytes_by_hidden={64: 200000}"]
TOKENS = (4, 300, 513, 1001, 2049, 3001)
# the tier from the first byte, no fusion: blocks of 1 row are left to NCCL
FROM_ONE_TOKEN = ["hardware=cpu", "dispatch.max_num_tokens=64", "dispatch.split_points=[8]",
                  "hardware.thresholds.default.fused_max_bytes=0", "+hardware.thresholds.default.sp_min_bytes=1"]


@dataclass
class Ops:
    """Ops in one range's compiled post-grad graph (after the tier passes)."""

    reduce_scatter: int
    shard: int
    all_gather: int
    all_reduce: int
    matmul_reduce_scatter: int
    all_gather_matmul: int
    mm: int


_OP_NAMES = {"reduce_scatter": "sp_reduce_scatter.default", "shard": "sp_shard.default",
             "all_gather": "sp_all_gather.default", "all_reduce": "all_reduce.default",
             "matmul_reduce_scatter": "sp_matmul_reduce_scatter.default",
             "all_gather_matmul": "sp_all_gather_matmul.default", "mm": "mm.default"}


@dataclass
class TierRun:
    """A TP block wrapped with one config on one rank, called at several token counts."""

    ranges: list[str]
    errors: dict[int, float]  # tokens -> the largest relative L2 error of the outputs against eager's
    census: dict[str, Ops]  # per compiled range
    matches: dict[str, dict[str, int]]  # per compiled range, per tier pass
    said: list[str]  # the log lines on ranges and where tiers start


def _run(rank, world):
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from helpers import CensusPass
    from rangedispatch import RangeCompiledModule, load_config
    from rangedispatch.bench.models import TPMLPBlock

    torch.set_num_threads(1)
    torch._inductor.config.fx_graph_cache = False  # the census pass must see every graph
    said: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("rangedispatch").addHandler(handler)
    logging.getLogger("rangedispatch").setLevel(logging.INFO)
    out = {}
    configs = {"sp": (SP, TOKENS), "with_symm_mem": (WITH_SYMM_MEM, TOKENS), "async_tp": (ASYNC_TP, TOKENS),
               "from_one_token": (FROM_ONE_TOKEN, (1, 2, 3, 5, 64))}
    for name, (overrides, tokens) in configs.items():
        torch.manual_seed(0)
        model = TPMLPBlock(hidden=HIDDEN, intermediate=128, layers=3, norm="llama", dtype=torch.bfloat16)
        census = CensusPass()
        m = RangeCompiledModule(model, load_config(overrides), passes=[census])
        errors = {}
        for n in tokens:
            x = torch.randn(n, HIDDEN, dtype=torch.bfloat16)
            with torch.no_grad():
                y, h = m(x.clone())
                ye, he = model(x.clone())
            errors[n] = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in ((y, ye), (h, he)))
        census_counts = {str(r): Ops(**{field: seen.get(op, 0) for field, op in _OP_NAMES.items()})
                         for r, seen in census.seen.items()}
        out[name] = TierRun(ranges=[str(r) for r in m.ranges], errors=errors, census=census_counts,
                            matches={str(r): {k: v for k, v in s["matches"].items() if k != "census"}
                                     for r, s in m.stats().items() if s["compiled"]},
                            said=[line for line in said if line.startswith(("ranges:", "async TP", "symm_mem tier"))])
        said.clear()
    return out


@pytest.fixture(scope="module")
def results():
    return spawn_ranks(_run, 2, backend="gloo")


def test_the_largest_range_is_sequence_parallel_and_matches_eager(results):
    for rank in results:
        res = rank["sp"]
        assert res.ranges == ["[1,8]", "[9,512]", "[513,4096]"]
        assert all(err < 1e-2 for err in res.errors.values()), res.errors  # bf16, odd counts included
        assert res.matches["[513,4096]"] == {"sequence_parallel": 3}
        # 3 layers: a reduce-scatter each, one block cut from the first residual (the others stay
        # split), an all-gather of each norm output and one of the last sum (a graph output)
        assert res.census["[513,4096]"] == Ops(reduce_scatter=3, shard=1, all_gather=4, all_reduce=0,
                                               matmul_reduce_scatter=0, all_gather_matmul=0, mm=6)
        # fused there
        assert res.census["[9,512]"] == Ops(reduce_scatter=0, shard=0, all_gather=0, all_reduce=0,
                                            matmul_reduce_scatter=0, all_gather_matmul=0, mm=6)


def test_sequence_parallelism_starts_above_the_symmetric_memory_tier_where_its_hidden_size_says(results):
    res = results[0]["with_symm_mem"]
    assert res.ranges == ["[1,8]", "[9,512]", "[513,2048]", "[2049,2559]", "[2560,4096]"]
    assert all(err < 1e-2 for err in res.errors.values()), res.errors
    assert res.matches["[513,2048]"] == {"symm_mem_allreduce": 3}
    assert res.matches["[2049,2559]"] == {}  # NCCL: above symm-mem, below this hidden size's start
    assert res.matches["[2560,4096]"] == {"sequence_parallel": 3}


def test_async_tp_joins_the_collectives_to_their_matmuls_from_its_own_start(results):
    for rank in results:
        res = rank["async_tp"]
        assert res.ranges == ["[1,8]", "[9,512]", "[513,1562]", "[1563,4096]"]
        assert all(err < 1e-2 for err in res.errors.values()), res.errors
        assert res.matches["[513,1562]"] == {"sequence_parallel": 3}
        assert res.census["[513,1562]"] == Ops(reduce_scatter=3, shard=1, all_gather=4, all_reduce=0,
                                               matmul_reduce_scatter=0, all_gather_matmul=0, mm=6)
        # each reduce-scatter takes the row-parallel matmul before it; the gathers before the second and
        # third layers take their column-parallel matmul. Left: the first layer's matmul (it reads the
        # whole input, nothing gathered) and the gathers of the outputs (nothing multiplies them)
        assert res.matches["[1563,4096]"] == {"sequence_parallel": 3, "async_tp": 5}
        assert res.census["[1563,4096]"] == Ops(reduce_scatter=0, shard=1, all_gather=2, all_reduce=0,
                                                matmul_reduce_scatter=3, all_gather_matmul=2, mm=1)


def test_ranges_whose_blocks_could_hold_one_row_stay_with_nccl(results):
    res = results[0]["from_one_token"]
    assert res.ranges == ["[1,2]", "[3,8]", "[9,64]"]  # Inductor compiles a symbolic block as >= 2 rows
    assert all(err < 1e-2 for err in res.errors.values()), res.errors
    assert res.matches["[1,2]"] == {}
    assert res.matches["[3,8]"] == {"sequence_parallel": 3}


def test_the_log_says_where_each_tier_starts_and_which_passes_each_range_runs(results):
    said = results[0]["async_tp"].said
    assert ("ranges: [1,8] [9,512] [513,1562] [1563,4096] (split points added by passes: [512, 1562]); passes: "
            "[1,8] allreduce_rmsnorm+census, [9,512] allreduce_rmsnorm+census, [513,1562] sequence_parallel+census, "
            "[1563,4096] sequence_parallel+async_tp+census") in said
    assert any(line.startswith("async TP from 1563 tokens for group") for line in said)
    said = results[0]["with_symm_mem"].said  # its sizes from 1 token, but the fused tier has those up to 512
    assert any(line.startswith("symm_mem tier for 513..2048 tokens of group") for line in said), said
