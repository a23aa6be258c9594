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
