"""The CLIs as a user meets them: one-line errors with exit code 2, help, the resolved config."""

import logging
import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(tool, *args, **env):
    return subprocess.run([sys.executable, "-m", f"rangedispatch.cli.{tool}", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env}, cwd=ROOT)


def one_line_exit_2(out, *wanted):
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    for text in wanted:
        assert text in out.stderr, out.stderr


def test_bad_values_and_typos_print_one_line_and_exit_2():
    bad = cli("demo", "dispatch.split_points=[0]")
    one_line_exit_2(bad, "rangedispatch-demo: dispatch.split_points=[0] is not allowed")
    typo = cli("demo", "dispatch.split_point=[8]")
    one_line_exit_2(typo, "unknown key 'dispatch.split_point'", "split_points")
    assert "+dispatch" not in typo.stderr
    one_line_exit_2(cli("tune", "fusion.enabled=maybe"), "fusion.enabled")
    one_line_exit_2(cli("bench", "bench.level=[op]"), "unknown key 'bench.level'; allowed keys under bench: levels, world_size")
    one_line_exit_2(cli("bench", "bench.levels=[gpu]"), "bench.levels='gpu' is not allowed; expected one of op, model, hf")


def test_overrides_that_do_not_parse_and_a_bad_log_level_exit_2():
    one_line_exit_2(cli("demo", "dispatch.split_points=[8"), "the override 'dispatch.split_points=[8' does not parse")
    one_line_exit_2(cli("bench", "fusion.enabled"), "the override 'fusion.enabled' does not parse: missing EQUAL")
    one_line_exit_2(cli("demo", "hardware=tpu9"), "hardware='tpu9' is not a known hardware profile; available: auto (detect this machine's), b200, cpu")
    for tool in ("demo", "bench", "tune"):  # refused before any rank starts
        one_line_exit_2(cli(tool, RANGEDISPATCH_LOGS="loud"),
                        f"rangedispatch-{tool}: RANGEDISPATCH_LOGS='loud' is not a log level; allowed: debug, info, warning")


def test_help_and_the_resolved_config():
    help_text = cli("demo", "--help").stdout
    assert help_text.startswith("rangedispatch-demo:") and "Examples:" in help_text
    assert "docs/configuration.md" in help_text and ".py" not in help_text
    job = cli("demo", "--cfg", "job", "dispatch.split_points=[16]").stdout
    assert yaml.safe_load(job)["hardware"]["name"] == "cpu" and yaml.safe_load(job)["dispatch"]["split_points"] == [16]


def test_bench_config_shows_what_the_smoke_run_does():
    long, short = cli("bench", "--cfg", "job", "bench.smoke=true"), cli("bench", "-c", "job", "bench.smoke=true")
    assert long.returncode == 0 and long.stdout == short.stdout
    cfg = yaml.safe_load(long.stdout)  # the YAML alone: what hardware=auto picked goes to the log, not here
    assert cfg["hardware"]["name"] == "cpu" and cfg["bench"]["op_hidden"] == [256] and cfg["bench"]["smoke"] is True


def test_bench_without_gpus_says_what_it_needs():
    one_line_exit_2(cli("bench", "bench.world_size=2"), "needs 2 CUDA GPUs", "bench.smoke=true")


def test_bench_smoke_run_on_cpu(tmp_path):
    out = cli("bench", "bench.smoke=true", "bench.levels=[op]", f"bench.out_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bench.smoke: a CPU run" in out.stdout and "### op level, hidden 256" in out.stdout
    assert out.stdout.count("hardware=auto picked 'cpu'") + out.stderr.count("hardware=auto picked 'cpu'") == 1
    table = (tmp_path / "table.md").read_text()
    assert "| 64 |" in table and "fused_reference" in table and "fused_oneshot" not in table
    assert (tmp_path / "results.csv").read_text().count("\n") == 1 + 3 * 3  # header + 3 sizes x 3 CPU variants
    redraw = cli("bench_plot", tmp_path / "results.csv", tmp_path / "run.json", tmp_path / "again.png")
    assert redraw.returncode == 0 and (tmp_path / "again.png").stat().st_size > 0, redraw.stderr
    one_line_exit_2(cli("bench_plot", tmp_path / "nothing.csv"), f"{tmp_path / 'nothing.csv'}: No such file or directory")


def test_bench_generate_level_smoke_run_on_one_cpu_rank(tmp_path):
    out = cli("bench", "bench.smoke=true", "bench.levels=[generate]", "bench.world_size=1",
              "bench.generate_variants=[rangedispatch]", f"bench.out_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "### generate, hidden 256, 2 layers, batch 1, prompt 16, 6 new tokens, 1 rank(s)" in out.stdout
    rows = (tmp_path / "generate.csv").read_text().splitlines()
    assert rows[0].startswith("level,card_world,hidden") and [r.split(",")[7] for r in rows[1:]] == ["eager",
                                                                                                   "rangedispatch"]
    assert rows[2].split(",")[14] == "6"  # every generated token equals eager's
    assert (tmp_path / "generate.png").stat().st_size > 0
    one_line_exit_2(cli("bench", "bench.levels=[op,generate]", "bench.world_size=1"),
                    "bench.world_size=1 is not allowed; expected 2 or more for the op, model and hf levels")


def test_log_lines_print_above_the_progress_bar(capsys):
    from rangedispatch.cli._common import progress

    log = logging.getLogger("rangedispatch")
    handler = logging.StreamHandler(sys.stderr)
    log.addHandler(handler)
    try:
        step = progress(2, 0, "timings")
        step()
        log.warning("compiled a range")
        step()
    finally:
        log.removeHandler(handler)
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert "compiled a range" in lines  # a line of its own, not the end of the bar's
