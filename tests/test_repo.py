"""The repository explains itself: nothing in code, docs or README points outside it or to a tracker."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("dgq", "export", "runtime", "app", "common", "scripts", "tests", "docs")
OUTSIDE = re.compile(r"\b(METHOD|DESIGN|STYLE|DATA)\.md|\.\./shared|(?i:\bissues? #?\d+\b)")


def _files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    for top in SOURCES:
        files += [p for p in (ROOT / top).rglob("*") if p.suffix in (".py", ".md", ".sh", ".toml")]
    return [p for p in files if p.is_file() and p != Path(__file__)]


def test_nothing_points_outside_the_repository_or_to_a_tracker():
    found = [
        f"{p.relative_to(ROOT)}:{i}: {m.group(0)}"
        for p in _files()
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        for m in [OUTSIDE.search(line)]
        if m
    ]
    assert len(_files()) > 50
    assert not found, "\n".join(found)


def test_the_pattern_catches_what_it_is_for():
    for text in ("see METHOD.md 3", "the spec in ../shared/", "as in issue 4", "(issues 7)"):
        assert OUTSIDE.search(text), text
    assert not OUTSIDE.search("the tissue of 4 layers") and not OUTSIDE.search("docs/method.md")
