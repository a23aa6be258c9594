"""The CLIs as a user meets them: one-line errors with exit code 2, help, the resolved config."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(tool, *args, **env):
    return subprocess.run([sys.executable, "-m", f"rangedispatch.cli.{tool}", *args], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env}, cwd=ROOT)


def test_bad_values_and_typos_print_one_line_and_exit_2():
    bad = cli("demo", "dispatch.split_points=[0]")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().count("\n") == 0 and "dispatch.split_points" in bad.stderr
    typo = cli("demo", "dispatch.split_point=[8]")
    assert typo.returncode == 2 and "unknown key 'dispatch.split_point'" in typo.stderr and "split_points" in typo.stderr
    assert "+dispatch" not in typo.stderr
    flag = cli("tune", "fusion.enabled=maybe")
    assert flag.returncode == 2 and flag.stderr.strip().count("\n") == 0 and "fusion.enabled" in flag.stderr


def test_help_and_the_resolved_config():
    help_text = cli("demo", "--help").stdout
    assert help_text.startswith("rangedispatch-demo:") and "Examples:" in help_text
    job = cli("demo", "--cfg", "job", "dispatch.split_points=[16]").stdout
    assert "name: cpu" in job and "name: auto" not in job and "- 16" in job


def test_bench_without_gpus_says_what_it_needs():
    out = cli("bench", "bench.world_size=2")
    assert out.returncode == 2 and "needs 2 CUDA GPUs" in out.stderr and out.stderr.strip().count("\n") == 0
    assert "bench.smoke=true" in out.stderr


def test_bench_smoke_run_on_cpu(tmp_path):
    out = cli("bench", "bench.smoke=true", "bench.levels=[op]", f"bench.out_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bench.smoke: a CPU run" in out.stdout and "### op level, hidden 256" in out.stdout
    table = (tmp_path / "table.md").read_text()
    assert "| 64 |" in table and "fused_reference" in table and "fused_oneshot" not in table
    assert (tmp_path / "results.csv").read_text().count("\n") == 1 + 3 * 3  # header + 3 sizes x 3 CPU variants
