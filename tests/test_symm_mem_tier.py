"""The three all-reduce tiers on 2 real gloo ranks: fused (small), symmetric memory (middle), process
group (large). On CPU the symm-mem tier runs its reference kernel (the process group's all-reduce in
the tier's op), so these tests cover the ranges, the graph rewrite and numerics; tests/gpu covers
the symmetric-memory kernels themselves. The ranks return named records (below)."""

import logging
from dataclasses import dataclass, field

import pytest
import torch

from rangedispatch.cli.launch import spawn_ranks

HIDDEN = 64  # bf16: 128 bytes per token
TIERS = ["hardware=cpu", "dispatch.max_num_tokens=4096", "dispatch.split_points=[8]",
         "+hardware.thresholds.default.symm_mem_max_bytes=262144"]  # fused to 512 tokens, symm-mem to 2048


@dataclass
class Check:
    """One call of ``tokens`` tokens: its range, and whether its outputs are within a relative L2
    error of 1e-2 of eager's (bf16)."""

    tokens: int
    range: str
    matches_eager: bool


@dataclass
class Ops:
    """All-reduces in one range's compiled post-grad graph, by tier."""

    fused: int
    symm_mem: int
    all_reduce: int


@dataclass
class TierRun:
    """A TP block wrapped with one config on one rank."""

    ranges: list[str]
    checks: list[Check] = field(default_factory=list)
    census: dict[str, Ops] = field(default_factory=dict)  # per compiled range, where a census pass ran
    passes: dict[str, list[str]] = field(default_factory=dict)  # per range
    matches: dict[str, dict[str, int]] = field(default_factory=dict)  # per compiled range, per pass


def _tiers(rank, world):
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from helpers import CensusPass
    from rangedispatch import RangeCompiledModule, load_config
    from rangedispatch.bench.models import TPMLPBlock

    torch.set_num_threads(1)
    torch._inductor.config.fx_graph_cache = False  # the census pass must see every graph
    out = {}
    for name, overrides in {
        "three_tiers": TIERS,
        "symm_mem_from_min": ["hardware=cpu", "dispatch.max_num_tokens=4096", "dispatch.split_points=[]",
                              "hardware.thresholds.default.fused_max_bytes=0",
                              "+hardware.thresholds.default.symm_mem_min_bytes=131072",
                              "+hardware.thresholds.default.symm_mem_max_bytes=262144"],
        "symm_mem_off": [*TIERS, "fusion.symm_mem=false"],
    }.items():
        torch.manual_seed(0)
        model = TPMLPBlock(hidden=HIDDEN, intermediate=128, layers=2, norm="llama", dtype=torch.bfloat16)
        census = CensusPass()
        m = RangeCompiledModule(model, load_config(overrides), passes=[census])
        checks = []
        for n in (4, 300, 513, 1500, 2048, 2049, 3000):
            x = torch.randn(n, HIDDEN, dtype=torch.bfloat16)
            with torch.no_grad():
                y, r = m(x.clone())
                ye, re = model(x.clone())
            err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in ((y, ye), (r, re)))
            checks.append(Check(n, str(m.range_for(n)), err < 1e-2))
        census_counts = {str(k): Ops(fused=v.get("fused_allreduce_rmsnorm.default", 0),
                                     symm_mem=v.get("symm_mem_all_reduce.default", 0),
                                     all_reduce=v.get("all_reduce.default", 0)) for k, v in census.seen.items()}
        passes = {str(k): v["passes"] for k, v in m.stats().items()}
        out[name] = TierRun([str(r) for r in m.ranges], checks, census_counts, passes)
    # the tier passes read one plan: asking the symm-mem pass for split points first changes nothing
    m = RangeCompiledModule(TPMLPBlock(hidden=HIDDEN, intermediate=128, layers=2, norm="llama", dtype=torch.bfloat16),
                            load_config(TIERS))
    m.passes.reverse()
    with torch.no_grad():
        for n in (300, 300, 1500, 3000):  # the first call traces
            m(torch.randn(n, HIDDEN, dtype=torch.bfloat16))
    out["symm_mem_pass_first"] = TierRun([str(r) for r in m.ranges],
                                         matches={str(k): v["matches"] for k, v in m.stats().items() if v["compiled"]})
    return out


@pytest.fixture(scope="module")
def tiers():
    return spawn_ranks(_tiers, 2, backend="gloo")[0]


def test_three_tiers_each_range_in_one(tiers):
    res = tiers["three_tiers"]
    assert res.ranges == ["[1,8]", "[9,512]", "[513,2048]", "[2049,4096]"]
    assert all(check.matches_eager for check in res.checks), res.checks
    # each compiled graph: 2 layers, each all-reduce in the range's tier
    assert res.census["[9,512]"] == Ops(fused=2, symm_mem=0, all_reduce=0)
    assert res.census["[513,2048]"] == Ops(fused=0, symm_mem=2, all_reduce=0)
    assert res.census["[2049,4096]"] == Ops(fused=0, symm_mem=0, all_reduce=2)
    assert res.passes["[513,2048]"] == ["symm_mem_allreduce", "census"]


def test_the_tiers_do_not_depend_on_the_order_of_their_passes(tiers):
    res = tiers["symm_mem_pass_first"]
    assert res.ranges == tiers["three_tiers"].ranges
    assert res.matches == {"[9,512]": {"allreduce_rmsnorm": 2}, "[513,2048]": {"symm_mem_allreduce": 2},
                              "[2049,4096]": {}}


def test_symm_mem_tier_starts_at_its_min_bytes_without_fusion(tiers):
    res = tiers["symm_mem_from_min"]
    assert res.ranges == ["[1,1023]", "[1024,2048]", "[2049,4096]"]
    assert all(check.matches_eager for check in res.checks), res.checks
    assert res.census["[1,1023]"] == Ops(fused=0, symm_mem=0, all_reduce=2)
    assert res.census["[1024,2048]"] == Ops(fused=0, symm_mem=2, all_reduce=0)


def test_symm_mem_off_leaves_the_middle_to_the_process_group(tiers):
    res = tiers["symm_mem_off"]
    assert res.ranges == ["[1,8]", "[9,512]", "[513,4096]"]
    assert res.census["[513,4096]"] == Ops(fused=0, symm_mem=0, all_reduce=2)


@dataclass
class Fallback:
    """Two calls of the symm-mem op on CPU: their outputs and the warnings they logged."""

    outputs: list[list]
    warnings: list[str]


def _fallback(rank, world, caplog_level):
    from rangedispatch.fusion.symm_mem_op import symm_mem_all_reduce

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("rangedispatch").addHandler(handler)
    group_name = torch.distributed.group.WORLD.group_name
    x = torch.full((4, 8), float(rank + 1))
    outs = [symm_mem_all_reduce(x, group_name, "symm_mem", 0, 4) for _ in range(2)]
    return Fallback([o.tolist() for o in outs], [r.getMessage() for r in records if r.levelno >= caplog_level])


def test_symm_mem_op_on_cpu_falls_back_to_the_process_group_with_one_warning():
    res = spawn_ranks(_fallback, 2, logging.WARNING, backend="gloo")[0]
    assert res.outputs == [[[3.0] * 8] * 4] * 2
    assert res.warnings == ["symm_mem all-reduce falls back to the process group: symm_mem needs CUDA tensors; "
                            "this all-reduce is on cpu"]


def test_symm_mem_min_above_max_is_refused():
    from rangedispatch import load_config
    from rangedispatch.errors import ConfigError

    with pytest.raises(ConfigError, match=r"hardware\.thresholds\.default\.symm_mem_min_bytes.*at most "
                                          r"symm_mem_max_bytes \(1024\)"):
        load_config(["hardware=cpu", "+hardware.thresholds.default.symm_mem_min_bytes=4096",
                     "+hardware.thresholds.default.symm_mem_max_bytes=1024"])
