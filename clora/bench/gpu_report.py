"""The GPU check's report: one JSON and one Markdown file from whatever its phases left.

``python -m clora.bench.gpu_report OUT`` reads ``OUT/phases.tsv`` (written by scripts/gpu_check.sh: one
line per phase with its exit code, seconds and time limit), ``OUT/env.json``, ``OUT/tests.json``
and ``OUT/tests.xml`` (clora.bench.gpu_check), and every ``OUT/bench-*.json`` (clora.bench.gpu), and
writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``. Anything missing (a phase that timed out
or never ran) is reported as missing; the report itself never fails on partial results.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

__all__ = ["build_report", "format_bench", "format_markdown", "main"]

TIMED_OUT = (124, 137)  # timeout(1): TERM, or KILL after the grace period


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _phases(out: Path) -> list[dict[str, Any]]:
    rows = []
    path = out / "phases.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, rc, seconds, limit = (line.split("\t") + ["", "", "", ""])[:4]
        code = int(rc) if rc.lstrip("-").isdigit() else None
        status = ("skipped" if code is None else "ok" if code == 0 else
                  "timed out" if code in TIMED_OUT else f"failed (exit {code})")
        rows.append({"phase": name, "status": status, "exit_code": code,
                     "seconds": float(seconds) if seconds else None, "limit_s": float(limit) if limit else None})
    return rows


def _tests(out: Path) -> dict[str, Any] | None:
    summary = _read_json(out / "tests.json")
    xml = out / "tests.xml"
    if summary is None and not xml.exists():
        return None
    result: dict[str, Any] = {"collected": len((summary or {}).get("collected", [])),
                              "exit_code": (summary or {}).get("exit_code")}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    problems = []
    try:
        cases = ET.parse(xml).getroot().iter("testcase") if xml.exists() else iter(())
        for case in cases:
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "failed" if child.tag == "failure" else "errors"
                    problems.append({"test": name, "outcome": child.tag,
                                     "message": (child.get("message") or "").strip()[:500]})
                elif child.tag == "skipped":
                    outcome = "skipped"
            counts[outcome] += 1
    except ET.ParseError as exc:
        result["xml_error"] = str(exc)
    return result | counts | {"problems": problems}


def build_report(out: Path) -> dict[str, Any]:
    """Everything the phases left in ``out``, with the imports checked against the GPU image."""
    from clora.bench.gpu_check import allowed_distributions

    benches = {}
    for path in sorted(out.glob("bench-*.json")):
        data = _read_json(path)
        if data is not None:
            benches[data.get("shape", path.stem)] = data
    env, tests_json = _read_json(out / "env.json"), _read_json(out / "tests.json")
    loaded: set[str] = set()
    refused: set[str] = set()
    for part in (env, tests_json, *benches.values()):
        loaded.update((part or {}).get("imports", []))
        refused.update((part or {}).get("refused", []))
    try:
        outside: list[str] | None = sorted(loaded - allowed_distributions())
    except Exception:  # noqa: BLE001 - the report must not fail on a missing `packaging`
        outside = None
    return {
        "phases": _phases(out),
        "env": env,
        "tests": _tests(out),
        "bench": benches,
        "imports": {"loaded": sorted(loaded), "outside_image": outside, "refused": sorted(refused)},
    }


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_bench(data: dict[str, Any]) -> str:
    """Markdown for one shape's benchmark (what bench_gpu wrote, complete or not)."""
    work, env, model = data.get("workload", {}), data.get("env", {}), data.get("model", {})
    lines = [f"## Benchmark: {data.get('shape')} ({data.get('status')}, {_fmt(data.get('wall_s'), '.0f')} s)", ""]
    if model:
        params = model.get("params", 0)
        size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
        on_device = f", {model['device_gb']:.1f} GB on the device" if model.get("device_gb") is not None else ""
        lines.append(f"{size} parameters, random {model.get('dtype')} weights, built in "
                     f"{_fmt(model.get('init_s'), '.1f')} s on {env.get('device')}{on_device}; "
                     f"tenants set up in {_fmt(model.get('tenants_setup_s'), '.1f')} s.")
    if work:
        lines.append(f"Per tenant-step: {work.get('sequences')} sequences x ({work.get('prompt_len')} shared prompt + "
                     f"{work.get('completion_len')} trained) tokens, micro-batch {work.get('micro_batch_size')} rows, "
                     f"LoRA ranks cycle 8/16/4/8 on all linear layers, bf16 autocast, "
                     f"{work.get('steps')} measured rounds after {work.get('warmup')} warmup.")
    if data.get("fused"):
        lines += ["", "| K | mode | rows | round s | s / tenant-step | tokens/s | swapped / this | swap s | peak GB |",
                  "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in data["fused"]:
            lines.append(f"| {r['tenants']} | {r['mode']} | {r['row_mode']} | {r['round_s']:.3f} | "
                         f"{r['tenant_step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['ratio']:.2f} | "
                         f"{r['swap_s']:.3f} | {_fmt(r.get('peak_gb'), '.1f')} |")
    if data.get("swap"):
        first = data["swap"][0]
        lines += ["", f"One tenant's store swapped in and written back ({first['tensors']} tensors, "
                      f"{first['mb']:.3g} MB; median of {first['repeats']}):", "",
                  "| host memory | swap-in ms | GB/s | write-back ms | GB/s | one flat copy ms | GB/s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in data["swap"]:
            lines.append(f"| {r['memory']} | {r['swap_in_ms']:.1f} | {r['swap_in_gbps']:.1f} | "
                         f"{r['write_back_ms']:.1f} | {r['write_back_gbps']:.1f} | {r['one_tensor_ms']:.1f} | "
                         f"{r['one_tensor_gbps']:.1f} |")
    memory = data.get("memory") or {}
    if memory or model.get("store_mb_per_tenant"):
        fused, swapped = (_fmt(memory.get(f"{m}_peak_gb_per_added_tenant"), ".2f") for m in ("fused", "swapped"))
        lines += ["", f"Device memory peak per added tenant: fused {fused} GB, swapped {swapped} GB; "
                      f"host store per tenant {_fmt(model.get('store_mb_per_tenant'), '.3g')} MB."]
    for error in data.get("errors", []):
        lines += ["", "```", error.strip(), "```"]
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    env = report.get("env") or {}
    if env.get("gpu"):
        where = (f"{env['gpu']} ({env['gpu_memory_gb']:.0f} GB, capability {env['capability']}), "
                 f"torch {env['torch']} (CUDA {env['cuda_build']})")
    else:
        where = f"no GPU (dry run on cpu), torch {env.get('torch')}"
    lines = ["# clora GPU check", "", f"{where}, transformers {env.get('transformers')}, Python {env.get('python')}, "
             f"{env.get('cpu_count')} CPUs; commit {env.get('commit') or 'unknown'}.", "", "| phase | status | seconds | limit s |", "|---|---|---:|---:|"]
    for p in report["phases"]:
        lines.append(f"| {p['phase']} | {p['status']} | {_fmt(p['seconds'], '.0f')} | {_fmt(p['limit_s'], '.0f')} |")
    tests = report.get("tests")
    lines += ["", "## Trainer tests (`pytest -m cuda`)", ""]
    if tests is None:
        lines.append("No results: the tests phase did not run or left nothing.")
    else:
        lines.append(f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped ({tests['collected']} collected, pytest exit {tests['exit_code']}).")
        for p in tests["problems"]:
            lines.append(f"- {p['outcome']}: `{p['test']}`: {p['message'].splitlines()[0] if p['message'] else ''}")
    for data in report["bench"].values():
        lines += ["", format_bench(data)]
    imports = report["imports"]
    outside = "not checked" if imports["outside_image"] is None else ", ".join(imports["outside_image"]) or "none"
    lines += ["", f"Imports outside the GPU image and the carried wheels: {outside}; "
              f"absent as on the image (optional imports): {', '.join(imports['refused']) or 'none'}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m clora.bench.gpu_report OUT_DIR")
        return 2
    out = Path(args[0])
    report = build_report(out)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    markdown = format_markdown(report)
    (out / "gpu_check.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
