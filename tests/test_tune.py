"""The tune logic on the recorded H100 x2 sweep (benchmarks/results/tune_h100x2/), on it with added
noise, and on made-up noisy, non-monotone sweeps."""

from pathlib import Path

from rangedispatch.tune.crossover import leading_run_end, smoothed, thresholds

ROOT = Path(__file__).resolve().parents[1]


def _rows(series):
    """series: {(hidden, fp8): [(tokens, nccl, oneshot, twoshot or None)]} at bf16."""
    rows = []
    for (hidden, fp8), points in series.items():
        for tokens, *tiers in points:
            for tier, us in zip(("nccl", "oneshot", "twoshot"), tiers):
                if us is not None:
                    rows.append(dict(hidden=hidden, fp8=fp8, tokens=tokens, bytes=tokens * hidden * 2, tier=tier, us=us))
    return rows


def _recorded_sweep(repeat=0):
    import csv

    with open(ROOT / "benchmarks/results/tune_h100x2/sweep.csv") as f:
        return [dict(hidden=int(r["hidden"]), fp8=r["fp8"] == "True", tokens=int(r["tokens"]), bytes=int(r["bytes"]),
                     tier=r["tier"], us=float(r["us"])) for r in csv.DictReader(f) if int(r["repeat"]) == repeat]


MiB = 1 << 20


def test_recorded_h100_sweep_gives_the_committed_thresholds():
    for repeat in (0, 1):
        t = thresholds(_recorded_sweep(repeat))
        assert t.by_hidden == {2048: 8 * MiB, 4096: 32 * MiB, 8192: 64 * MiB}
        assert t.fused_max_bytes == 8 * MiB and t.oneshot_max_bytes == 64 * MiB
    from rangedispatch.config import load_config

    h100 = load_config(["hardware=h100"]).hardware.thresholds_for(2)
    assert h100.fused_max_bytes == 8 * MiB
    assert h100.fused_max_bytes_by_hidden == {"2048": 8 * MiB, "4096": 32 * MiB, "8192": 64 * MiB}


def test_recorded_sweep_with_added_noise_moves_at_most_one_step():
    import random

    rng = random.Random(0)
    for _ in range(20):
        noisy = [dict(r, us=r["us"] * rng.uniform(0.96, 1.04)) for r in _recorded_sweep()]
        t = thresholds(noisy)
        for hidden, limit in {2048: 8 * MiB, 4096: 32 * MiB, 8192: 64 * MiB}.items():
            assert limit // 2 <= t.by_hidden[hidden] <= limit * 2, (hidden, t.by_hidden)


def test_crossover_with_a_noisy_point_and_a_late_loss():
    # fused/nccl: 0.5, 0.55, 1.02 (one noisy loss), 0.6, 0.65, 0.9, then loses for good (1.05, 1.06)
    points = [(1, 10, 5, None), (8, 10, 5.5, 9), (32, 10, 10.2, 12), (128, 10, 6, 8), (512, 20, 14, 13),
              (2048, 40, 38, 36), (4096, 80, 84, 86), (8192, 160, 176, 170)]
    t = thresholds(_rows({(2048, False): points}))
    assert t.fused_max_bytes == 2048 * 2048 * 2
    # one-shot / two-shot where both ran: 0.61, 0.85, 0.75, then two-shot wins for good (1.08, 1.06)
    assert t.oneshot_max_bytes == 128 * 2048 * 2


def test_most_restrictive_series_wins_and_first_loss_means_never():
    small = [(1, 10, 5, None), (1024, 40, 30, 35), (16384, 400, 420, 450)]
    large = [(1, 10, 5, None), (1024, 40, 30, 35), (4096, 150, 120, 140)]
    t = thresholds(_rows({(2048, False): small, (8192, False): large}))
    assert t.fused_max_bytes == 1024 * 2048 * 2  # 2048's series stops at 4 MiB; 8192's reaches 64 MiB
    assert t.by_hidden == {2048: 1024 * 2048 * 2, 8192: 4096 * 8192 * 2}
    assert t.oneshot_max_bytes == 4096 * 8192 * 2  # one-shot never lost to two-shot: not capped by 2048's fused limit
    assert [s.capped_by_sweep for s in t.series] == [False, True]
    never = thresholds(_rows({(4096, True): [(1, 10, 12, None), (64, 10, 11, 15), (1024, 20, 30, 25)]}))
    assert never.fused_max_bytes == 0 and never.oneshot_max_bytes == 0


def _sp_rows(series):
    """series: {hidden: [(tokens, block without, block with sequence parallelism)]}."""
    return [dict(hidden=hidden, fp8=False, tokens=tokens, bytes=tokens * hidden * 2, tier=tier, us=us)
            for hidden, points in series.items() for tokens, nccl, sp in points
            for tier, us in (("block_nccl", nccl), ("block_sp", sp))]


def test_sequence_parallel_pays_from_the_trailing_run_of_wins():
    op = _rows({(2048, False): [(1, 10, 5, None), (64, 20, 10, 12)], (4096, False): [(1, 10, 5, None)]})
    # hidden 2048: loses, a noisy win at 512 tokens, loses, then wins from 4096 tokens (16 MiB) to the end
    wins_late = [(256, 100, 110), (512, 200, 190), (1024, 400, 430), (2048, 800, 820), (4096, 1600, 1500),
                 (8192, 3200, 3000), (16384, 6400, 6000)]
    wins_early = [(512, 200, 190), (1024, 400, 380), (2048, 800, 760), (4096, 1600, 1550)]  # from 4 MiB
    t = thresholds(op + _sp_rows({2048: wins_late, 4096: wins_early}))
    assert [s.sp_from for s in t.series] == [4096 * 2048 * 2, 512 * 4096 * 2]
    assert t.sp_min_bytes == 16 * MiB  # the latest start over the series, for hidden sizes not measured
    assert t.sp_by_hidden == {2048: 16 * MiB, 4096: 4 * MiB}
    loses_last = wins_early[:-1] + [(4096, 1600, 1700)]
    t = thresholds(op + _sp_rows({2048: wins_late, 4096: loses_last}))
    assert t.series[1].sp_from == 0 and t.sp_min_bytes == 0  # one series never pays at its largest size: no tier
    assert t.sp_by_hidden == {2048: 16 * MiB, 4096: 0}  # but the other hidden size keeps its start
    assert thresholds(op).sp_min_bytes == 0 and thresholds(op).series[0].sp_from is None  # not measured


def _block_rows(points, hidden=2048):
    """points: [(tokens, block without, with sequence parallelism, with async TP on top)]."""
    return [dict(hidden=hidden, fp8=False, tokens=n, bytes=n * hidden * 2, tier=tier, us=us)
            for n, nccl, sp, async_tp in points
            for tier, us in (("block_nccl", nccl), ("block_sp", sp), ("block_async_tp", async_tp))]


def test_async_tp_is_judged_against_sequence_parallelism_which_takes_its_better_form():
    op = _rows({(2048, False): [(1, 10, 5, None), (64, 20, 10, 12)]})
    # plain sequence parallelism always loses to NCCL; with async TP on top it wins from 2048 tokens
    points = [(512, 200, 210, 205), (1024, 400, 420, 405), (2048, 800, 820, 790), (4096, 1600, 1640, 1560)]
    t = thresholds(op + _block_rows(points))
    assert t.series[0].sp_from == t.sp_min_bytes == 2048 * 2048 * 2  # the tier pays in its async form
    assert t.series[0].async_tp_from == t.async_tp_min_bytes == 512 * 2048 * 2  # async beats plain SP throughout
    t = thresholds(op + _block_rows([(n, nccl, sp, sp * 1.01) for n, nccl, sp, _ in points]))
    assert t.series[0].async_tp_from == 0 and t.async_tp_min_bytes == 0 and t.sp_min_bytes == 0
    tie = [(n, nccl, nccl * 1.01, nccl * (0.999 if n == 4096 else 1.01)) for n, nccl, _, _ in points]
    assert thresholds(op + _block_rows(tie)).sp_min_bytes == 0  # 0.1% ahead at the largest size is no win


def test_async_tp_keeps_the_start_of_each_hidden_size():
    op = _rows({(2048, False): [(1, 10, 5, None), (64, 20, 10, 12)], (4096, False): [(1, 10, 5, None)]})
    # hidden 2048: plain SP loses, async TP wins from 1024 tokens (4 MiB); hidden 4096: async TP only
    # beats plain SP from 2048 tokens (16 MiB). One start for both would run plain SP at hidden 2048
    # from 4 to 16 MiB, where it loses to NCCL.
    early = [(512, 200, 210, 215), (1024, 400, 420, 380), (2048, 800, 820, 760), (4096, 1600, 1640, 1520)]
    late = [(512, 400, 380, 390), (1024, 800, 760, 770), (2048, 1600, 1520, 1450)]
    t = thresholds(op + _block_rows(early) + _block_rows(late, hidden=4096))
    assert t.sp_by_hidden == {2048: 4 * MiB, 4096: 4 * MiB}
    assert t.async_by_hidden == {2048: 4 * MiB, 4096: 16 * MiB}
    assert t.async_tp_min_bytes == 16 * MiB  # for hidden sizes not measured: the latest start


def _symm_rows(series):
    """series: {hidden: [(tokens, nccl, fused, symm)]} at bf16 without FP8 (one-shot tiers only)."""
    rows = []
    for hidden, points in series.items():
        for tokens, nccl, fused, symm in points:
            for tier, us in (("nccl", nccl), ("oneshot", fused), ("symm_twoshot", symm)):
                rows.append(dict(hidden=hidden, fp8=False, tokens=tokens, bytes=tokens * hidden * 2, tier=tier, us=us))
    return rows


def test_recorded_symm_mem_sweep_gives_the_committed_tier():
    import csv

    with open(ROOT / "benchmarks/results/tune_h100x2_symm_mem/sweep.csv") as f:
        rows = [dict(repeat=int(r["repeat"]), hidden=int(r["hidden"]), fp8=r["fp8"] == "True", tokens=int(r["tokens"]),
                     bytes=int(r["bytes"]), tier=r["tier"], us=float(r["us"])) for r in csv.DictReader(f)]
    t = thresholds([r for r in rows if r["repeat"] == 0])
    assert t.by_hidden == {2048: 8 * MiB, 4096: 32 * MiB, 8192: 64 * MiB}
    assert (t.symm_mem_min_bytes, t.symm_mem_max_bytes, t.symm_mem_oneshot_max_bytes) == (2 * MiB, 16 * MiB, 0)
    assert [s.symm_band for s in t.series] == [(2 * MiB, 16 * MiB)] * 2 + [(None, 32 * MiB)] * 2 + [None] * 2
    from rangedispatch.config import load_config

    h100 = load_config(["hardware=h100"]).hardware.thresholds_for(2)
    assert (h100.symm_mem_min_bytes, h100.symm_mem_max_bytes, h100.symm_mem_oneshot_max_bytes) == (2 * MiB, 16 * MiB, 0)


def test_symm_mem_band_is_judged_above_each_fused_limit():
    # hidden 1024: fused pays to 64 tokens; symm-mem wins from 16 to 512 tokens (a noisy point at 128)
    a = [(1, 10, 5, 12), (16, 12, 6, 11), (64, 20, 15, 18), (128, 30, 40, 31), (256, 50, 60, 40),
         (512, 90, 100, 85), (1024, 170, 190, 180)]
    # hidden 4096: fused pays to 256 tokens, symm-mem loses right above: caps the tier at 2 MiB
    b = [(1, 10, 5, 12), (64, 20, 10, 18), (256, 60, 50, 55), (512, 100, 110, 105)]
    # hidden 8192: fused pays over the whole sweep: says nothing about symm-mem
    c = [(1, 10, 5, 50), (64, 30, 20, 60)]
    t = thresholds(_symm_rows({1024: a, 4096: b, 8192: c}))
    assert [s.symm_band for s in t.series] == [(16 * 2048, 512 * 2048), (None, 256 * 8192), None]
    assert (t.symm_mem_min_bytes, t.symm_mem_max_bytes) == (16 * 2048, 512 * 2048)
    assert t.symm_mem_oneshot_max_bytes == 512 * 2048  # no symm one-shot measured: the band's end
    lost = thresholds(_symm_rows({1024: [(1, 10, 5, 12), (64, 20, 15, 18), (128, 30, 40, 35)]}))
    assert lost.symm_mem_max_bytes == 0  # lost right above the fused sizes: no tier


def test_smoothing_helpers():
    assert smoothed([1, 5, 1, 1]) == [1, 1, 1, 1] and smoothed([2, 1, 3]) == [2, 2, 3]
    assert leading_run_end([1, 2, 3], [1.5, 0.5, 0.5]) is None  # losing at the smallest size: never
    assert leading_run_end([1, 2, 3, 4], [0.5, 1.5, 0.5, 0.5]) == 4  # one noisy inner point: smoothed over
    assert leading_run_end([1, 2, 3], [0.5, 0.5, 1.5]) == 2  # losing at the largest size stops the run


def _ranges_with_profile(rank, world, config_dir):
    import torch

    from rangedispatch import RangeCompiledModule, load_config
    from rangedispatch.bench.models import TPMLPBlock

    model = TPMLPBlock(hidden=64, intermediate=128, dtype=torch.bfloat16)
    out = {}
    for profile in ("cpu", "mytuned"):
        m = RangeCompiledModule(model, load_config([f"hardware={profile}", "dispatch.max_num_tokens=1024"],
                                                   config_dirs=[config_dir]))
        m(torch.randn(4, 64, dtype=torch.bfloat16))
        out[profile] = [str(r) for r in m.ranges]
    return out


def test_tuned_profile_loads_and_moves_the_ranges(tmp_path):
    from rangedispatch.config import load_config
    from rangedispatch.cli.launch import spawn_ranks
    from rangedispatch.tune import crossover, profile

    base = load_config(["hardware=cpu"]).hardware
    text = profile.render("mytuned", "reference", 2, crossover.Thresholds(4096, 4096), base, ["test", "provenance"])
    profile.write(tmp_path, "mytuned", text)
    assert text.startswith("# Written by rangedispatch-tune. test\n# provenance\nname: mytuned")
    tuned = load_config(["hardware=mytuned"], config_dirs=[tmp_path]).hardware
    assert tuned.thresholds_for(2).fused_max_bytes == 4096
    assert tuned.thresholds_for(4).fused_max_bytes == base.thresholds_for(4).fused_max_bytes  # kept
    ranges = spawn_ranks(_ranges_with_profile, 2, str(tmp_path), backend="gloo")[0]
    assert ranges["cpu"] == ["[1,8]", "[9,32]", "[33,512]", "[513,1024]"]  # 64 KiB / 128 B per token
    assert ranges["mytuned"] == ["[1,8]", "[9,32]", "[33,1024]"]  # 4 KiB / 128 B = 32 tokens: on a split point


def test_tune_cli_on_cpu_measures_the_reference_tier(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "rangedispatch.cli.tune", "tune.name=cpubox", "tune.hidden=[64]",
                          "tune.max_bytes=512", "tune.sp_max_bytes=512", "tune.repeats=1", "tune.replays=2",
                          "tune.fp8=[false]",
                          f"tune.out_dir={tmp_path}"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "CPU: measuring the reference tier" in out and "Spread between repeats" in out
    assert "up to 512 B per rank" in out  # sizes as people read them, not 0.000488281 MiB
    from rangedispatch.config import load_config

    hw = load_config(["hardware=cpubox"], config_dirs=[tmp_path]).hardware
    assert hw.name == "cpubox" and hw.fused_backend == "reference"
    assert "Sequence-parallel tier (2-layer TP block, sequence parallelism vs NCCL) per repeat:" in out
    assert "Async TP on top (vs sequence parallelism) per repeat:" in out
    # written by the ranks as they measure: header + tokens 1, 2, 4 x (2 op-level tiers + the 2-layer block
    # without and with sequence parallelism, and with async TP on top)
    sweep = (tmp_path / "sweep.csv").read_text()
    assert sweep.count("\n") == 1 + 3 * 2 + 3 * 3 and sweep.count(",block_sp,") == sweep.count(",block_async_tp,") == 3


def test_profile_with_a_symm_mem_tier_round_trips(tmp_path):
    from rangedispatch.config import load_config
    from rangedispatch.tune import crossover, profile

    measured = crossover.Thresholds(4096, 4096, [], {64: 4096}, symm_mem_min_bytes=1024, symm_mem_max_bytes=65536,
                                    symm_mem_oneshot_max_bytes=8192)
    measured.sp_min_bytes, measured.sp_by_hidden, measured.async_tp_min_bytes = 65536, {64: 32768}, 131072
    measured.async_by_hidden = {64: 16384}
    base = load_config(["hardware=h100", "+hardware.thresholds.4.sp_min_bytes=8388608"]).hardware
    profile.write(tmp_path, "tiers", profile.render("tiers", "reference", 2, measured, base, ["test"]))
    hw = load_config(["hardware=tiers"], config_dirs=[tmp_path]).hardware
    assert hw.thresholds_for(4).sp_min_bytes == 8388608  # kept from the base profile, every key of it
    assert hw.thresholds_for(2).sp_min_bytes_for(64) == 32768 and hw.thresholds_for(2).sp_min_bytes_for(128) == 65536
    t = hw.thresholds_for(2)
    assert (t.fused_max_bytes_by_hidden, t.symm_mem_min_bytes, t.symm_mem_max_bytes, t.symm_mem_oneshot_max_bytes,
            t.async_tp_min_bytes) == ({"64": 4096}, 1024, 65536, 8192, 131072)
    assert t.async_tp_min_bytes_for(64) == 16384 and t.async_tp_min_bytes_for(128) == 131072


def test_a_stopped_sweep_is_analyzed_from_what_it_wrote(tmp_path):
    import shutil
    import subprocess
    import sys

    recorded = ROOT / "benchmarks/results/tune_h200x2"
    lines = (recorded / "sweep.csv").read_text().splitlines()
    stopped = [lines[0]] + [r for r in lines[1:] if r.startswith("0,")] + [r for r in lines[1:] if r.startswith("1,2048,")]
    (tmp_path / "sweep.csv").write_text("\n".join(stopped) + "\n")  # repeat 1 stopped after hidden 2048
    shutil.copy(recorded / "sweep_info.json", tmp_path)
    out = subprocess.run([sys.executable, "-m", "rangedispatch.cli.tune", "tune.name=partial", "hardware=h200",
                          f"tune.from_csv={tmp_path / 'sweep.csv'}", f"tune.out_dir={tmp_path}"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fused 8 MiB (per hidden size: 2048: 8 MiB, 4096: 32 MiB, 8192: 64 MiB)" in out.stdout
