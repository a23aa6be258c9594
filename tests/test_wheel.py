"""The wheel as a user gets it: built from the source, installed (not editable) into a fresh venv
that holds CPU torch and the wheel's declared dependencies only, and used from outside the
repository. A package or config file left out of the wheel, or a dependency used but not declared,
fails here and nowhere else: the other tests run in the checkout's environment."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the CPU build, as .ci/run installs it
PROFILES = sorted(p.stem for p in (ROOT / "conf" / "hardware").glob("*.yaml"))

CALL_WITH_EACH_PROFILE = """
import sys, torch
from rangedispatch import RangeCompiledModule, load_config

model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
x = torch.randn(3, 16)
for name in sys.argv[1:]:
    m = RangeCompiledModule(model, load_config([f"hardware={name}", "dispatch.max_num_tokens=64"]))
    with torch.no_grad():
        print(name, m.config.hardware.name, torch.allclose(m(x), model(x)))
"""


def run(*cmd, cwd):
    """Run a command outside the checkout, its own venv's packages only; its output on failure."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env={**env, "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel, built from a copy of the sources (a stale build/ in the checkout could add files)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for name in ("rangedispatch", "conf"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp, src, cwd=tmp)
    (path,) = tmp.glob("rangedispatch-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel):
    """A fresh venv with CPU torch, the wheel and what the wheel declares, nothing else."""
    venv = wheel.parent / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=wheel.parent)
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-compile", TORCH,
        wheel, cwd=wheel.parent)
    return venv


def test_every_source_and_config_file_ships(wheel):
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {os.path.relpath(os.path.join(folder, f), ROOT)
               for folder, _, files in os.walk(ROOT / "rangedispatch", followlinks=True)  # conf/ through its link
               for f in files if f.endswith((".py", ".yaml", "py.typed"))}
    assert "rangedispatch/gemm/skinny_gemm_pass.py" in sources and "rangedispatch/conf/hardware/cpu.yaml" in sources
    assert sorted(sources - names) == []
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_installed_wheel_runs_every_profile_and_the_demo(venv, tmp_path):
    out = run(venv / "bin" / "python", "-c", CALL_WITH_EACH_PROFILE, *PROFILES, cwd=tmp_path)
    assert "auto" in PROFILES and "h200" in PROFILES
    assert out.splitlines() == [f"{p} {'cpu' if p == 'auto' else p} True" for p in PROFILES]
    demo = run(venv / "bin" / "rangedispatch-demo", "dispatch.max_num_tokens=8", "dispatch.split_points=[]",
               cwd=tmp_path)  # one range: the first compile is most of the demo's time
    assert "max err vs eager" in demo and "[1,8]  allreduce_rmsnorm       2" in demo
