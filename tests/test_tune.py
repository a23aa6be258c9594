"""The tune rule on the recorded H100/H200 sweeps, on them with added noise, and on made-up noisy,
non-monotone sweeps; the summary and the profile written from one sweep; the CLI's input checks."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from rangedispatch.tune.crossover import MARGIN, RULE, thresholds

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def _rows(series):
    """series: {(hidden, fp8): [(tokens, nccl, oneshot, twoshot or None)]} at bf16."""
    rows = []
    for (hidden, fp8), points in series.items():
        for tokens, *tiers in points:
            for tier, us in zip(("nccl", "oneshot", "twoshot"), tiers):
                if us is not None:
                    rows.append(dict(hidden=hidden, fp8=fp8, tokens=tokens, bytes=tokens * hidden * 2, tier=tier, us=us))
    return rows


def _recorded(name="tune_h100x2"):
    with open(ROOT / "benchmarks/results" / name / "sweep.csv") as f:
        return [dict(repeat=int(r["repeat"]), hidden=int(r["hidden"]), fp8=r["fp8"] == "True", tokens=int(r["tokens"]),
                     bytes=int(r["bytes"]), tier=r["tier"], us=float(r["us"])) for r in csv.DictReader(f)]


def test_recorded_sweeps_give_their_thresholds_by_the_rule():
    from rangedispatch.config import load_config

    h200 = thresholds(_recorded("tune_h200x2"))
    assert h200.by_hidden == {2048: 8 * MiB, 4096: 32 * MiB, 8192: 64 * MiB}
    committed = load_config(["hardware=h200"]).hardware.thresholds_for(2)
    assert committed.fused_max_bytes_by_hidden == {str(h): b for h, b in h200.by_hidden.items()}
    # the H100 sweep's repeats lay up to 46% apart: fused was ahead at 32 MiB (hidden 4096) and 64 MiB
    # (8192) by less than that spread, so those sizes stay with NCCL
    h100 = thresholds(_recorded())
    assert h100.by_hidden == {2048: 8 * MiB, 4096: 16 * MiB, 8192: 32 * MiB}
    assert h100.fused_max_bytes == 8 * MiB and h100.oneshot_max_bytes == 32 * MiB  # two-shot never won


def test_recorded_sweep_with_added_noise_moves_at_most_one_step():
    import random

    rng = random.Random(0)
    for _ in range(20):
        noisy = [dict(r, us=r["us"] * rng.uniform(0.96, 1.04)) for r in _recorded()]
        t = thresholds(noisy)
        for hidden, limit in {2048: 8 * MiB, 4096: 16 * MiB, 8192: 32 * MiB}.items():
            assert limit // 2 <= t.by_hidden[hidden] <= limit * 2, (hidden, t.by_hidden)


def _fused_sweep(ratios, *jitters, hidden=1024):
    """fused/nccl = ``ratios`` at 1, 2, 4, ... tokens, one repeat per jitter: in each, NCCL runs that
    much faster and fused that much slower than their true times (negative: the other way)."""
    return [dict(repeat=repeat, hidden=hidden, fp8=False, tokens=1 << i, bytes=(1 << i) * hidden * 2, tier=tier, us=us)
            for repeat, jitter in enumerate(jitters) for i, ratio in enumerate(ratios)
            for tier, us in (("nccl", 100 * (1 - jitter)), ("reference", 100 * ratio * (1 + jitter)))]


def test_a_gap_inside_the_spread_between_repeats_moves_no_threshold():
    ratios = [0.6, 0.7, 0.8, 0.9, 0.95, 1.1, 1.2]  # fused 5% ahead at 16 tokens, behind from 32
    assert thresholds(_fused_sweep(ratios, 0.0)).fused_max_bytes == 16 * 2048  # 5% > the margin: taken
    # repeats 4% apart: at 16 tokens fused is still ahead on average, but not past the spread
    spread = thresholds(_fused_sweep(ratios, 0.02, -0.02))
    assert spread.fused_max_bytes == 8 * 2048
    assert 0 < spread.series[0].comparisons["fused"].gains[4] < MARGIN


def test_two_runs_with_different_noise_write_one_profile():
    ratios = [0.6, 0.7, 0.8, 0.9, 1.0, 1.1]
    one, other = thresholds(_fused_sweep(ratios, 0.02, -0.01)), thresholds(_fused_sweep(ratios, -0.02, 0.015))
    assert one.by_hidden == other.by_hidden == {1024: 8 * 2048}


def test_one_repeat_is_decided_by_the_fixed_margin_and_the_neighbours():
    assert thresholds(_fused_sweep([0.6, 0.6, 1 - MARGIN / 2], 0.0)).fused_max_bytes == 2 * 2048  # NCCL stays
    assert thresholds(_fused_sweep([0.6, 0.6, 1 - 2 * MARGIN], 0.0)).fused_max_bytes == 4 * 2048
    c = thresholds(_fused_sweep([0.6, 1 - MARGIN / 2, 0.6, 0.6, 1.2], 0.0)).series[0].comparisons["fused"]
    assert c.took == [True, True, True, True, False]  # the one close call between two wins is outvoted
    c = thresholds(_fused_sweep([0.6, 0.6, 1.2, 0.6, 1.2, 1.2], 0.0)).series[0].comparisons["fused"]
    assert c.took == [True, True, True, False, False, False]  # so are an odd loss, and an odd win after it


def test_most_restrictive_series_wins_and_first_loss_means_never():
    small = [(1, 10, 5, None), (1024, 40, 30, 35), (16384, 400, 420, 450)]
    large = [(1, 10, 5, None), (1024, 40, 30, 35), (4096, 150, 120, 140)]
    t = thresholds(_rows({(2048, False): small, (8192, False): large}))
    assert t.fused_max_bytes == 1024 * 2048 * 2  # 2048's series stops at 4 MiB; 8192's reaches 64 MiB
    assert t.by_hidden == {2048: 1024 * 2048 * 2, 8192: 4096 * 8192 * 2}
    assert t.oneshot_max_bytes == 4096 * 8192 * 2  # two-shot never won: one-shot wherever fusion runs
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
    points = [(512, 200, 210, 198), (1024, 400, 420, 395), (2048, 800, 820, 760), (4096, 1600, 1640, 1500)]
    t = thresholds(op + _block_rows(points))
    assert t.series[0].sp_from == t.sp_min_bytes == 2048 * 2048 * 2  # the tier pays in its async form
    assert t.series[0].async_tp_from == t.async_tp_min_bytes == 512 * 2048 * 2  # async beats plain SP throughout
    t = thresholds(op + _block_rows([(n, nccl, sp, sp * 1.01) for n, nccl, sp, _ in points]))
    assert t.series[0].async_tp_from == 0 and t.async_tp_min_bytes == 0 and t.sp_min_bytes == 0
    close = [(n, nccl, nccl * 1.01, nccl * (1 - MARGIN / 2 if n == 4096 else 1.01)) for n, nccl, _, _ in points]
    assert thresholds(op + _block_rows(close)).sp_min_bytes == 0  # ahead at the largest size, within the margin


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
    t = thresholds(_recorded("tune_h100x2_symm_mem"))
    assert t.by_hidden == {2048: 8 * MiB, 4096: 16 * MiB, 8192: 32 * MiB}
    assert (t.symm_mem_min_bytes, t.symm_mem_max_bytes, t.symm_mem_oneshot_max_bytes) == (2 * MiB, 16 * MiB, 0)
    bands = [(2 * MiB, 16 * MiB)] * 2 + [(None, 16 * MiB)] * 2 + [(None, 32 * MiB)] * 2  # lost above 16 / 32 MiB
    assert [s.symm_band for s in t.series] == bands
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
    from rangedispatch.config.schema import TierThresholds
    from rangedispatch.cli.launch import spawn_ranks
    from rangedispatch.tune import profile

    base = load_config(["hardware=cpu"]).hardware
    text = profile.render("mytuned", "reference", 2, TierThresholds(4096, 4096), base, ["test", "provenance"])
    profile.write(tmp_path, "mytuned", text)
    assert text.startswith("# Written by rangedispatch-tune. test\n# provenance\nname: mytuned")
    tuned = load_config(["hardware=mytuned"], config_dirs=[tmp_path]).hardware
    assert tuned.thresholds_for(2).fused_max_bytes == 4096
    assert tuned.thresholds_for(4).fused_max_bytes == base.thresholds_for(4).fused_max_bytes  # kept
    ranges = spawn_ranks(_ranges_with_profile, 2, str(tmp_path), backend="gloo")[0]
    assert ranges["cpu"] == ["[1,8]", "[9,32]", "[33,512]", "[513,1024]"]  # 64 KiB / 128 B per token
    assert ranges["mytuned"] == ["[1,8]", "[9,32]", "[33,1024]"]  # 4 KiB / 128 B = 32 tokens: on a split point


def test_tune_cli_on_cpu_measures_the_reference_tier(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rangedispatch.cli.tune", "tune.name=cpubox", "tune.hidden=[64]",
                          "tune.max_bytes=512", "tune.sp_max_bytes=512", "tune.repeats=1", "tune.replays=2",
                          "tune.fp8=[false]",
                          f"tune.out_dir={tmp_path}"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "CPU: measuring the reference tier" in out and "One repeat: no spread between repeats" in out
    assert "up to 512 B per rank" in out  # sizes as people read them, not 0.000488281 MiB
    from rangedispatch.config import load_config

    hw = load_config(["hardware=cpubox"], config_dirs=[tmp_path]).hardware
    assert hw.name == "cpubox" and hw.fused_backend == "reference"
    assert "| sequence parallelism vs NCCL (2-layer block) | async TP vs sequence parallelism |" in out
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
    entry = profile.measured_entry(measured)
    profile.write(tmp_path, "tiers", profile.render("tiers", "reference", 2, entry, base, ["test"]))
    hw = load_config(["hardware=tiers"], config_dirs=[tmp_path]).hardware
    assert hw.thresholds_for(4).sp_min_bytes == 8388608  # kept from the base profile, every key of it
    assert hw.thresholds_for(2).sp_min_bytes_for(64) == 32768 and hw.thresholds_for(2).sp_min_bytes_for(128) == 65536
    t = hw.thresholds_for(2)
    assert (t.fused_max_bytes_by_hidden, t.symm_mem_min_bytes, t.symm_mem_max_bytes, t.symm_mem_oneshot_max_bytes,
            t.async_tp_min_bytes) == ({"64": 4096}, 1024, 65536, 8192, 131072)
    assert t.async_tp_min_bytes_for(64) == 16384 and t.async_tp_min_bytes_for(128) == 131072


def test_a_stopped_sweep_is_analyzed_from_what_it_wrote(tmp_path):
    import shutil

    recorded = ROOT / "benchmarks/results/tune_h200x2"
    lines = (recorded / "sweep.csv").read_text().splitlines()
    stopped = [lines[0]] + [r for r in lines[1:] if r.startswith("0,")] + [r for r in lines[1:] if r.startswith("1,2048,")]
    (tmp_path / "sweep.csv").write_text("\n".join(stopped) + "\n")  # repeat 1 stopped after hidden 2048
    shutil.copy(recorded / "sweep_info.json", tmp_path)
    out = _tune("tune.name=partial", "hardware=h200", f"tune.from_csv={tmp_path / 'sweep.csv'}",
                f"tune.out_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Fused kernels up to: hidden 2048: 8 MiB, hidden 4096: 32 MiB, hidden 8192: 64 MiB" in out.stdout
    assert "The sweep stopped early: hidden [4096, 8192] has fewer repeats." in out.stdout


def _tune(*args):
    return subprocess.run([sys.executable, "-m", "rangedispatch.cli.tune", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def _cpu_sweep():
    """One repeat on CPU, hidden 1024 and 2048: the reference tier wins up to 4 KiB at 1024 and 8 KiB at
    2048; sequence parallelism wins from 32 KiB at 1024 and never at 2048; async TP never beats it."""
    rows = []
    for hidden, fused_to, sp_from in ((1024, 4096, 32768), (2048, 8192, None)):
        for n in (1, 2, 4, 8, 16):
            size = n * hidden * 2
            times = {"nccl": 100, "reference": 80 if size <= fused_to else 110, "block_nccl": 500,
                     "block_sp": 450 if sp_from and size >= sp_from else 520, "block_async_tp": 530}
            rows += [dict(repeat=0, hidden=hidden, fp8=False, tokens=n, bytes=size, tier=tier, us=us)
                     for tier, us in times.items()]
    return rows


def test_the_summary_says_what_the_profile_holds():
    from rangedispatch.cli.tune import summarize
    from rangedispatch.config import load_config
    from rangedispatch.tune.config import TuneConfig

    info = dict(card="cpu", torch="2", flashinfer="not installed", world_size=2, date="2026-12-01")
    text, yaml_text = summarize(dict(rows=_cpu_sweep(), info=info, cuda=False), load_config(["hardware=cpu"]),
                                TuneConfig(name="box"))
    assert RULE in text and "One repeat: no spread between repeats was measured" in text
    after = yaml_text.split('"2":  # measured\n')[1].splitlines()
    measured = "\n".join(after[:next(i for i, line in enumerate(after) if not line.startswith("    "))])
    assert f'```yaml\n"2":\n{measured}' in text  # the entry written, as written
    assert '    sp_min_bytes_by_hidden:\n      "1024": 32768\n      "2048": 0' in measured
    assert "sp_min_bytes: " not in measured  # 2048 never won: no tier for hidden sizes not measured
    assert "- Sequence parallelism from: hidden 1024: 32 KiB, hidden 2048: never; other hidden sizes: never." in text
    assert "| 1024 | False | up to 4 KiB (8 KiB: 10.0% slower) |" in text
    assert "- Fused kernels up to: hidden 1024: 4 KiB, hidden 2048: 8 KiB; other hidden sizes: 4 KiB." in text
    # the reference tier is one kernel: one-shot wherever fusion runs, and the summary says why
    assert "    oneshot_max_bytes: 8192" in measured and "one-shot throughout (two-shot not measured)" in text
    assert "- Async TP on top of it, from: hidden 1024: never, hidden 2048: never; other hidden sizes: never." in text


def test_from_csv_names_a_missing_or_empty_sweep_in_one_line(tmp_path):
    missing = _tune(f"tune.from_csv={tmp_path}/missing.csv", f"tune.out_dir={tmp_path}")
    assert missing.returncode == 2 and missing.stdout == "" and missing.stderr.count("\n") == 1
    assert f"tune.from_csv='{tmp_path}/missing.csv'" in missing.stderr and "no such file" in missing.stderr
    (tmp_path / "sweep.csv").write_text("repeat,hidden,fp8,tokens,bytes,tier,us\n")
    alone = _tune(f"tune.from_csv={tmp_path}/sweep.csv", f"tune.out_dir={tmp_path}")
    assert alone.returncode == 2 and alone.stderr.count("\n") == 1 and "sweep_info.json" in alone.stderr
    (tmp_path / "sweep_info.json").write_text(json.dumps(dict(card="cpu", torch="2", flashinfer="-", world_size=2,
                                                              date="2026-12-01", cuda=False)))
    empty = _tune(f"tune.from_csv={tmp_path}/sweep.csv", f"tune.out_dir={tmp_path}")
    assert empty.returncode == 2 and empty.stderr.count("\n") == 1 and "header only" in empty.stderr
    assert "Traceback" not in missing.stderr + alone.stderr + empty.stderr


def test_a_built_in_name_is_refused_before_the_sweep(tmp_path):
    for name in ("h100", "auto"):
        out = _tune(f"tune.name={name}", f"tune.out_dir={tmp_path}")
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and f"tune.name='{name}'" in out.stderr
        assert "cpu, gpu_generic, h100, h200" in out.stderr and "conf/hardware" not in out.stderr
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written
