"""docs/architecture.md stays true: every module it names exists, and every module is in it."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("at_core", "at_rollout", "at_reward")
OUTSIDE = ("../" + "shared", "/work/" + "shared")  # the workplace's notes: users who clone the repo lack them


def test_architecture_names_every_module_and_only_real_ones():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"\b((?:%s)/[\w/]*\w\.py)\b" % "|".join(PACKAGES), text))
    missing_files = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing_files, f"docs/architecture.md names modules that do not exist: {missing_files}"
    modules = sorted(str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                     if p.name != "__init__.py")
    # A row may name a module by its path or, after the first path of a row, by its file name alone.
    names = set(re.findall(r"`([\w/]+\.py)`", text))
    absent = [m for m in modules if m not in named and Path(m).name not in names
              and not any(m.startswith(d) for d in re.findall(r"`((?:%s)/[\w/]+/)`" % "|".join(PACKAGES), text))]
    assert not absent, f"modules missing from docs/architecture.md: {absent}"


def test_no_project_file_points_outside_the_repository():
    bad = []
    for p in ROOT.rglob("*"):
        if p.is_file() and p.suffix in {".py", ".md", ".yaml", ".yml", ".cfg", ".toml", ".txt", ".sh"} \
                and not any(part.startswith(".") or part in {"runs", "build"} for part in p.relative_to(ROOT).parts):
            text = p.read_text(errors="ignore")
            if any(outside in text for outside in OUTSIDE):
                bad.append(str(p.relative_to(ROOT)))
    assert not bad, f"files pointing at a directory outside the repository: {bad}"
