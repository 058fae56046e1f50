"""Docs point at code that exists: every repository path (and ``file.py::test_name``) that the README
or a page under docs/ names is there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH = re.compile(r"(?<![\w/.-])((?:clora|actors|tests|examples|scripts|tools|docs)/[\w/.-]*[\w])(?:::(\w+))?")


def _references(page: Path) -> list[tuple[str, str | None]]:
    return [(m.group(1), m.group(2)) for m in PATH.finditer(page.read_text())]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_path_a_page_names_exists(page):
    missing = []
    for path, test_name in _references(page):
        target = ROOT / path
        if not target.exists():
            missing.append(path)
        elif test_name is not None and not re.search(rf"def {test_name}\(", target.read_text()):
            missing.append(f"{path}::{test_name}")
    assert missing == [], f"{page.name} names what does not exist"


def test_the_path_pattern_finds_paths_and_test_names():
    text = "see `clora/rl/step.py`, tests/test_x.py::test_y and docs/img/plot.png."
    assert [(m.group(1), m.group(2)) for m in PATH.finditer(text)] == [
        ("clora/rl/step.py", None), ("tests/test_x.py", "test_y"), ("docs/img/plot.png", None),
    ]
