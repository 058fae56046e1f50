"""The python snippets of the docs run exactly as a user would paste them: saved to a file, run with python."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]
RUN_AS_PASTED = ("docs/testing.md", "docs/actors.md", "docs/trainer.md", "docs/continual.md", "docs/sampler-pool.md",
                "docs/scheduling.md")  # every python snippet: a whole program


@pytest.mark.parametrize("doc", RUN_AS_PASTED)
def test_every_python_snippet_runs_as_pasted(doc, doc_snippets, tmp_path):
    snippets = doc_snippets(doc)
    assert snippets, f"{doc} has no python snippet"
    for i, code in enumerate(snippets, start=1):
        path = tmp_path / f"snippet_{i}.py"
        path.write_text(code, encoding="utf-8")
        proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, f"{doc}, python snippet {i}, exit {proc.returncode}:\n{proc.stderr[-4000:]}"
