"""The README's "Use it from Python" snippet runs as a user would paste it: saved to a file, run with
``python file.py`` from an empty folder, on the default (real SmolLM2) model: two tenants x 8 steps plus a
scripted tenant, about 20 minutes on a 2-core AVX2 CPU (8 of its 16 tenant steps took 9 min, fp32), so it
is marked slow (``make test-all`` runs it, ``make test`` does not)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.smollm2, pytest.mark.slow, pytest.mark.timeout(2700)]

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_python_snippet_runs_as_pasted(doc_snippets, tmp_path):
    (code,) = doc_snippets("README.md")
    script = tmp_path / "mine.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run([sys.executable, script.name], cwd=tmp_path, capture_output=True, text=True, timeout=2600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-4000:]}"
    printed = ast.literal_eval(proc.stdout.strip().splitlines()[-1])  # {name: (accuracy_start, accuracy_end)}
    assert set(printed) == {"lr0.0005", "lr0.002"}
    assert all(0.0 <= a <= 1.0 for pair in printed.values() for a in pair)
    run_dir = tmp_path / "runs" / "mine"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    steps = {e["tenant"]: e["step"] for e in events if e["event"] == "tenant.step"}
    assert steps == {"lr0.0005": 8, "lr0.002": 8}
    assert (run_dir / "tenants" / "scripted" / "adapter" / "adapter_config.json").is_file()
