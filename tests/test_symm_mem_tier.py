"""The three all-reduce tiers on 2 real gloo ranks: fused (small), symmetric memory (middle), process
group (large). On CPU the symm-mem tier runs its reference kernel (the process group's all-reduce in
the tier's op), so these tests cover the ranges, the graph rewrite and numerics; tests/gpu covers
the symmetric-memory kernels themselves."""

import logging

import pytest
import torch

from rangedispatch.cli.launch import spawn_ranks

HIDDEN = 64  # bf16: 128 bytes per token
TIERS = ["hardware=cpu", "dispatch.max_num_tokens=4096", "dispatch.split_points=[8]",
         "+hardware.thresholds.default.symm_mem_max_bytes=262144"]  # fused to 512 tokens, symm-mem to 2048


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
            checks.append((n, str(m.range_for(n)), err < 1e-2))
        census_counts = {str(k): (v.get("fused_allreduce_rmsnorm.default", 0), v.get("symm_mem_all_reduce.default", 0),
                                  v.get("all_reduce.default", 0)) for k, v in census.seen.items()}
        passes = {str(k): v["passes"] for k, v in m.stats().items()}
        out[name] = dict(ranges=[str(r) for r in m.ranges], checks=checks, census=census_counts, passes=passes)
    # the tier passes read one plan: asking the symm-mem pass for split points first changes nothing
    m = RangeCompiledModule(TPMLPBlock(hidden=HIDDEN, intermediate=128, layers=2, norm="llama", dtype=torch.bfloat16),
                            load_config(TIERS))
    m.passes.reverse()
    with torch.no_grad():
        for n in (300, 300, 1500, 3000):  # the first call traces
            m(torch.randn(n, HIDDEN, dtype=torch.bfloat16))
    out["symm_mem_pass_first"] = dict(ranges=[str(r) for r in m.ranges],
                                      matches={str(k): v["matches"] for k, v in m.stats().items() if v["compiled"]})
    return out


@pytest.fixture(scope="module")
def tiers():
    return spawn_ranks(_tiers, 2, backend="gloo")[0]


def test_three_tiers_each_range_in_one(tiers):
    res = tiers["three_tiers"]
    assert res["ranges"] == ["[1,8]", "[9,512]", "[513,2048]", "[2049,4096]"]
    assert all(ok for _, _, ok in res["checks"]), res["checks"]  # relative L2 error < 1e-2 (bf16)
    # (fused ops, symm-mem all-reduces, plain all-reduces) in each compiled graph: 2 layers
    assert res["census"]["[9,512]"] == (2, 0, 0)
    assert res["census"]["[513,2048]"] == (0, 2, 0)
    assert res["census"]["[2049,4096]"] == (0, 0, 2)
    assert res["passes"]["[513,2048]"] == ["symm_mem_allreduce", "census"]


def test_the_tiers_do_not_depend_on_the_order_of_their_passes(tiers):
    res = tiers["symm_mem_pass_first"]
    assert res["ranges"] == tiers["three_tiers"]["ranges"]
    assert res["matches"] == {"[9,512]": {"allreduce_rmsnorm": 2}, "[513,2048]": {"symm_mem_allreduce": 2},
                              "[2049,4096]": {}}


def test_symm_mem_tier_starts_at_its_min_bytes_without_fusion(tiers):
    res = tiers["symm_mem_from_min"]
    assert res["ranges"] == ["[1,1023]", "[1024,2048]", "[2049,4096]"]
    assert all(ok for _, _, ok in res["checks"]), res["checks"]
    assert res["census"]["[1,1023]"] == (0, 0, 2)
    assert res["census"]["[1024,2048]"] == (0, 2, 0)


def test_symm_mem_off_leaves_the_middle_to_the_process_group(tiers):
    res = tiers["symm_mem_off"]
    assert res["ranges"] == ["[1,8]", "[9,512]", "[513,4096]"]
    assert res["census"]["[513,4096]"] == (0, 0, 2)


def _fallback(rank, world, caplog_level):
    from rangedispatch.fusion.symm_mem_op import symm_mem_all_reduce

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("rangedispatch").addHandler(handler)
    group_name = torch.distributed.group.WORLD.group_name
    x = torch.full((4, 8), float(rank + 1))
    outs = [symm_mem_all_reduce(x, group_name, "symm_mem", 0, 4) for _ in range(2)]
    return [o.tolist() for o in outs], [r.getMessage() for r in records if r.levelno >= caplog_level]


def test_symm_mem_op_on_cpu_falls_back_to_the_process_group_with_one_warning():
    outs, warnings = spawn_ranks(_fallback, 2, logging.WARNING, backend="gloo")[0]
    assert outs == [[[3.0] * 8] * 4] * 2
    assert warnings == ["symm_mem all-reduce falls back to the process group: symm_mem needs CUDA tensors; "
                        "this all-reduce is on cpu"]


def test_symm_mem_min_above_max_is_refused():
    from rangedispatch import load_config
    from rangedispatch.errors import ConfigError

    with pytest.raises(ConfigError, match=r"hardware\.thresholds\.default\.symm_mem_min_bytes.*at most "
                                          r"symm_mem_max_bytes \(1024\)"):
        load_config(["hardware=cpu", "+hardware.thresholds.default.symm_mem_min_bytes=4096",
                     "+hardware.thresholds.default.symm_mem_max_bytes=1024"])
