"""The docs cannot drift from the code: docs/configuration.md is what rangedispatch.config.reference
renders, every configuration field has its comment, and every path the README and the docs name
exists."""

import dataclasses
import re
from pathlib import Path

import pytest

from rangedispatch.config import reference, schema

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").glob("*.md"))),
         "benchmarks/README.md", "benchmarks/experiments/README.md", "benchmarks/results/README.md"]
TOP = ("benchmarks", "conf", "docs", "rangedispatch", "tests", ".ci")
# a path from the repository root, e.g. rangedispatch/config/schema.py (not ~/.config/rangedispatch)
ROOT_PATH = re.compile(r"(?<![\w./~$-])((?:%s)/[\w./-]*|LICENSE\b|pyproject\.toml)" % "|".join(map(re.escape, TOP)))
RELATIVE_PATH = re.compile(r"(?<![\w./])(\.\./[\w./-]+)")
LINK = re.compile(r"\]\(([^)#\s]+)")
MODULE = re.compile(r"-m (rangedispatch[\w.]*)")
FRESH_MACHINE = [
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e '.[test]' "
    "&& python -m rangedispatch.cli.demo",
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e '.[test]' "
    "&& python -m pytest -q",
]


def test_configuration_md_is_generated():
    committed = (ROOT / "docs/configuration.md").read_text()
    assert committed == reference.render(), (
        "docs/configuration.md differs from the config dataclasses: "
        "python -m rangedispatch.config.reference > docs/configuration.md")


@pytest.mark.parametrize("cls", [schema.DispatchConfig, schema.CompileConfig, schema.FusionConfig,
                                 schema.HardwareConfig, schema.TierThresholds])
def test_reference_lists_every_field_with_its_comment(cls):
    section = next(s for s in reference.sections() if s.cls == cls.__name__)
    assert [k.name for g in section.groups for k in g.keys] == [f.name for f in dataclasses.fields(cls)]
    undocumented = [[k.name for k in g.keys] for g in section.groups if not g.text]
    assert not undocumented, f"fields of {cls.__name__} without a comment above them: {undocumented}"


def _exists(path: Path) -> bool:
    """``NAME``-like parts (all capitals) stand for any name."""
    parts = ["*" if re.fullmatch(r"[A-Z_]{2,}(\.\w+)?", p) and p not in ("LICENSE",) else p for p in path.parts]
    if "*" not in parts:
        return path.exists()
    return any(Path(parts[0]).glob(str(Path(*parts[1:]))) if parts[0] == "/" else ROOT.glob(str(Path(*parts))))


def _named_paths(page: str) -> list[tuple[str, Path]]:
    text = (ROOT / page).read_text()
    here = (ROOT / page).parent
    found = [(m, ROOT / m.rstrip(".,")) for m in ROOT_PATH.findall(text)]
    found += [(m, here / m.rstrip(".,")) for m in RELATIVE_PATH.findall(text)]
    found += [(m, here / m) for m in LINK.findall(text) if "://" not in m]
    found += [(m, ROOT / m.replace(".", "/")) for m in MODULE.findall(text)]
    return found


@pytest.mark.parametrize("page", PAGES)
def test_every_named_path_exists(page):
    named = _named_paths(page)
    missing = [name for name, path in named
               if not (_exists(path) or path.with_suffix(".py").exists() and path.suffix != ".py")]
    assert not missing, f"{page} names paths that do not exist: {missing}"


def test_readme_keeps_the_fresh_machine_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## On a fresh machine", 1)[1].split("\n## ", 1)[0]
    for command in FRESH_MACHINE:
        assert f"    {command}\n" in section
