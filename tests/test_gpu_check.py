"""The GPU check (scripts/gpu_check.sh): its CPU dry run end to end, the wheel installer, the
image-only import guard, the report from partial results, and the test subset's file list."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from clora.bench.gpu_check import TEST_FILES, carried_distributions

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(1600)  # ~1 min on a quiet 2-core machine; the script's own dry-run budget is 1410 s
def test_the_dry_run_writes_every_phase_and_the_expected_rows(tmp_path):
    """The script as the GPU run uses it, on CPU with the tiny shape; the test subset is only
    collected here (this suite runs those tests itself), the benchmark runs whole."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "CLORA_COMMIT": "0123abc"}
    done = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--tests", "collect", str(out)],
                          env=env, capture_output=True, text=True, timeout=1550)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    status = {p["phase"]: p["status"] for p in report["phases"]}
    assert {status["env"], status["tests"], status["bench-tiny"]} == {"ok"}, status
    assert status["wheels"] in ("ok", "skipped")
    collected = json.loads((out / "tests.json").read_text())["collected"]
    assert len(collected) == report["tests"]["collected"] >= 15
    assert all("[cpu" in node for node in collected)  # CLORA_TEST_DEVICES=cpu: no cuda variants
    assert {node.split("::")[0] for node in collected} == set(TEST_FILES)
    bench = report["bench"]["tiny"]
    assert bench["status"] == "done" and bench["errors"] == []
    modes = (("swapped", "-"), ("fused", "grouped"), ("fused", "gathered"))
    assert [(r["tenants"], r["mode"], r["row_mode"]) for r in bench["fused"]] == [
        (k, mode, rows) for k in (1, 2) for mode, rows in modes
    ]
    for r in bench["fused"]:
        assert r["round_s"] > 0 and 0 <= r["swap_s"] < r["round_s"] and r["peak_gb"] is None
        assert r["sequences"] == 2 and r["seq_len"] == 16
    assert [r["memory"] for r in bench["swap"]] == ["pageable"]  # no CUDA: nothing pinned
    assert bench["swap"][0]["mb"] == pytest.approx(bench["model"]["store_mb_per_tenant"])
    assert report["imports"]["outside_image"] == []  # nothing the GPU image lacks was needed
    markdown = (out / "gpu_check.md").read_text()
    assert "| bench-tiny | ok |" in markdown and "| 2 | fused | grouped |" in markdown
    assert "| pageable |" in markdown and f"({len(collected)} collected" in markdown
    assert "commit 0123abc (from CLORA_COMMIT)" in done.stdout and "; commit 0123abc (from CLORA_COMMIT)." in markdown


def test_the_reported_commit_is_the_files_or_unknown(tmp_path):
    """scripts/tree_commit.sh: HEAD only when the files are HEAD's; a .git older than the files (as
    the device tool's copy had: e4bc2ff's files reported as 9867702) gives unknown, never HEAD."""
    script = ROOT / "scripts" / "tree_commit.sh"
    env = {k: v for k, v in os.environ.items() if k != "CLORA_COMMIT"}

    def commit(**extra: str) -> str:
        return subprocess.run(["bash", str(script), str(tmp_path)], env={**env, **extra}, capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()

    assert commit() == "unknown (git finds no repository here)"
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    (tmp_path / "a.py").write_text("old\n")
    for args in (["init", "-q"], ["add", "a.py"], ["commit", "-q", "-m", "old"]):
        subprocess.run(git + args, check=True, capture_output=True, timeout=30)
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert commit() == head
    (tmp_path / "a.py").write_text("new\n")  # newer files under the old .git
    assert commit() == f"unknown (the files differ from git HEAD {head} in 1 paths)"
    (tmp_path / "a.py").write_text("old\n")
    (tmp_path / "b.py").write_text("added\n")  # an untracked file: not HEAD's tree either
    assert commit().startswith("unknown (the files differ")
    assert commit(CLORA_COMMIT="e4bc2ff") == "e4bc2ff (from CLORA_COMMIT)"


def _parametrizes_device(func: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """``@pytest.mark.parametrize(("device", ...), ...)``: its own ``device``, not the fixture."""
    return any(isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "parametrize" and d.args
               and "device" in ast.unparse(d.args[0]) for d in func.decorator_list)


def test_every_test_that_takes_the_device_fixture_is_in_the_gpu_subset():
    files = set()
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "device":
                if any(arg.arg == "device" for arg in node.args.args) and not _parametrizes_device(node):
                    files.add(f"tests/{path.name}")
    assert files == set(TEST_FILES)


def _wheel(folder: Path, name: str, version: str, module: str) -> Path:
    """A minimal valid pure-Python wheel holding ``module`` (with ``VERSION``)."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{f},,\n" for f in files) + f"{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for f, text in {**files, f"{dist}.dist-info/RECORD": record}.items():
            zf.writestr(f, text)
    return path


@pytest.mark.parametrize("pip", [True, False])
def test_the_wheel_installer_adds_what_is_missing_or_older_and_keeps_what_is_newer(tmp_path, pip):
    import pytest as installed_pytest

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "clora-test-missing", "1.0", "clora_test_missing")  # not installed here
    _wheel(wheels, "pytest", "1.0", "pytest_old_marker")  # older than ours: kept
    _wheel(wheels, "pluggy", "999.0", "pluggy_new_marker")  # newer than ours: installed
    target = tmp_path / "site"
    env = {**os.environ, "CLORA_WHEELS_NO_PIP": "0" if pip else "1"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_wheels.py"), str(wheels), str(target)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"pytest: {installed_pytest.__version__} here (carried 1.0): kept" in done.stdout
    assert (target / "clora_test_missing" / "__init__.py").exists()
    assert (target / "pluggy_new_marker" / "__init__.py").exists()
    assert not (target / "pytest_old_marker").exists()
    check = subprocess.run([sys.executable, "-c", "import clora_test_missing as m; print(m.VERSION)"],
                           env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == "1.0", check.stderr


def test_the_image_guard_hides_what_the_gpu_image_lacks():
    """With CLORA_IMAGE_ONLY=1 a distribution the image lacks is absent for probes, imports and
    metadata, so an optional import falls back and a required one fails, as on the GPU machine."""
    code = """
import importlib.metadata, importlib.util, sys
from clora.bench.gpu_check import guard_imports_if_asked, refused_imports
guard_imports_if_asked()
assert importlib.util.find_spec("gguf") is None
try:
    import gguf
except ModuleNotFoundError:
    pass
else:
    sys.exit("gguf imported")
try:
    importlib.metadata.version("gguf")
except importlib.metadata.PackageNotFoundError:
    pass
else:
    sys.exit("gguf metadata visible")
import msgspec, structlog  # carried
assert importlib.metadata.version("msgspec")
print(refused_imports())
"""
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed here: nothing to hide")
    env = {**os.environ, "CLORA_IMAGE_ONLY": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "'gguf'" in done.stdout


def test_the_carried_wheels_are_the_ones_the_image_lacks():
    assert carried_distributions()[:4] == ["msgspec", "structlog", "tomli-w", "pytest-asyncio"]
    text = (ROOT / "scripts" / "gpu-wheels.txt").read_text()
    assert all("==" in line for line in text.splitlines() if line and not line.startswith("#"))


def test_the_report_keeps_partial_results(tmp_path):
    """A timed-out benchmark and failing tests still give a report that says so."""
    from clora.bench.gpu import memory_summary
    from clora.bench.gpu_report import build_report, format_markdown

    (tmp_path / "phases.tsv").write_text("wheels\t0\t2\t60\ntests\t1\t30\t150\nbench-qwen3-4b\t124\t190\t190\n")
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_fused" name="test_a[cuda]"/>'
        '<testcase classname="tests.test_fused" name="test_b[cuda]"><failure message="assert 1e-4 &lt; 5e-5"/>'
        '</testcase><testcase classname="t" name="c"><skipped/></testcase></testsuite></testsuites>'
    )
    rows = [{"tenants": k, "mode": "fused", "row_mode": "grouped", "round_s": 1.0, "tenant_step_s": 1.0 / k,
             "tokens_per_s": 1.0, "ratio": 1.0, "swap_s": 0.1, "peak_gb": 10.0 + 0.5 * k} for k in (1, 2, 4)]
    (tmp_path / "bench-qwen3-4b.json").write_text(json.dumps({
        "shape": "qwen3-4b", "status": "started", "swap": [], "fused": rows, "memory": memory_summary(rows),
        "errors": ["K=8 skipped"], "imports": ["torch"],
    }))
    report = build_report(tmp_path)
    assert [p["status"] for p in report["phases"]] == ["ok", "failed (exit 1)", "timed out"]
    assert (report["tests"]["passed"], report["tests"]["failed"], report["tests"]["skipped"]) == (1, 1, 1)
    assert report["tests"]["problems"][0]["test"] == "tests.test_fused::test_b[cuda]"
    assert report["bench"]["qwen3-4b"]["memory"]["fused_peak_gb_per_added_tenant"] == pytest.approx(0.5)
    markdown = format_markdown(report)
    assert "| bench-qwen3-4b | timed out | 190 | 190 |" in markdown
    assert "failure: `tests.test_fused::test_b[cuda]`: assert 1e-4 < 5e-5" in markdown
    assert "| 4 | fused | grouped |" in markdown and "K=8 skipped" in markdown
