"""The GPU check's phases that are not benchmarks: the environment, the trainer test subset, imports.

scripts/gpu_check.sh runs each phase as its own process under a timeout:

- ``python -m clora.bench.gpu_check env OUT [--expect-cuda]``: torch, CUDA and the device, one bf16
  matmul and one pinned copy on it, into ``OUT/env.json``;
- ``python -m clora.bench.gpu_check tests OUT [--collect-only]``: ``pytest -m cuda`` on ``TEST_FILES``
  (the device-parametrized trainer tests; which devices: ``CLORA_TEST_DEVICES``) with a fixed
  plugin set, JUnit XML in ``OUT/tests.xml`` and the selected node ids in ``OUT/tests.json``;
- ``python -m clora.bench.gpu_report OUT`` merges everything (see there).

The GPU image has only ``IMAGE_DISTRIBUTIONS`` (and what they depend on) plus the wheels listed in
``scripts/gpu-wheels.txt``. With ``CLORA_IMAGE_ONLY=1`` (the CPU dry run sets it) a process refuses
to import any other installed distribution, as it would fail there: an optional import falls back
as it would on the image, a required one fails the dry run here instead of the GPU run later.
Top-level imports here are stdlib only: this module runs before anything is known to be importable.
"""

from __future__ import annotations

import argparse
import functools
import importlib.abc
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

__all__ = [
    "IMAGE_DISTRIBUTIONS",
    "IMAGE_ONLY_ENV",
    "TEST_FILES",
    "WHEEL_LIST",
    "allowed_distributions",
    "carried_distributions",
    "guard_imports_if_asked",
    "loaded_distributions",
    "main",
    "refused_imports",
]

ROOT = Path(__file__).resolve().parents[2]
WHEEL_LIST = ROOT / "scripts" / "gpu-wheels.txt"
IMAGE_ONLY_ENV = "CLORA_IMAGE_ONLY"
IMAGE_DISTRIBUTIONS = (
    "torch", "transformers", "peft", "safetensors", "accelerate", "pytest", "pytest-timeout", "hypothesis",
    "numpy", "uvloop", "rich", "pip",
)
"""Python distributions on the GPU machine's image (docs/gpu.md); their dependencies come with them."""
TEST_FILES = (
    "tests/test_lora.py",
    "tests/test_trainer.py",
    "tests/test_fused.py",
    "tests/test_trainer_actor.py",
    "tests/test_fused_actor.py",
    "tests/test_prefix.py",
    "tests/test_staleness_trainer.py",
    "tests/test_hot_stores.py",
)
"""Every test file with a test that takes the ``device`` fixture (tests/conftest.py); checked by a test."""
_LOCAL = {"clora", "actors"}  # this repository, on PYTHONPATH there


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def _owners() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def loaded_distributions() -> list[str]:
    """Installed distributions (not stdlib, not this repository) with a module imported so far."""
    owners = _owners()
    found = set()
    for top in {name.partition(".")[0] for name in list(sys.modules)}:
        if top in sys.stdlib_module_names or top in _LOCAL:
            continue
        found.update(canonical(d) for d in owners.get(top, ()))
    return sorted(found)


def carried_distributions(path: Path = WHEEL_LIST) -> list[str]:
    """The distributions scripts/gpu-wheels.txt pins (``name==version`` lines)."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(canonical(re.split(r"[=<>!~ \[;]", line, maxsplit=1)[0]))
    return names


@functools.cache
def allowed_distributions() -> frozenset[str]:
    """The image's distributions and the carried ones, with everything they require (as the
    requirements of the versions installed here say; extras left out)."""
    from packaging.requirements import Requirement  # a dependency of transformers and pytest

    todo = [canonical(n) for n in (*IMAGE_DISTRIBUTIONS, *carried_distributions())]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return frozenset(seen)


class _ImageOnly(importlib.abc.MetaPathFinder):
    """Stands in for the sys.path finder: a top-level module of an installed distribution that the
    GPU image lacks is not found (``find_spec`` None, so probes like ``importlib.util.find_spec``
    see it absent and ``import`` raises ModuleNotFoundError), as on the image."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.refused: set[str] = set()
        self.owners, self.allowed = _owners(), allowed_distributions()  # before this finder is in place

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if "." not in name and name not in _LOCAL:
            dists = {canonical(d) for d in self.owners.get(name, ())}
            if dists and not dists & self.allowed:
                self.refused.add(name)
                return None
        return self.inner.find_spec(name, path, target)

    def find_distributions(self, *args: Any, **kwargs: Any) -> Any:
        """importlib.metadata sees only the distributions the image has, too."""
        return (d for d in self.inner.find_distributions(*args, **kwargs) if canonical(d.name) in self.allowed)

    def invalidate_caches(self) -> None:
        self.inner.invalidate_caches()


_GUARD: _ImageOnly | None = None


def guard_imports_if_asked() -> None:
    """With CLORA_IMAGE_ONLY=1: from now on, imports behave as on the GPU image (see the module doc)."""
    global _GUARD
    if os.environ.get(IMAGE_ONLY_ENV) != "1" or _GUARD is not None:
        return
    import importlib.machinery

    index = sys.meta_path.index(importlib.machinery.PathFinder)
    _GUARD = _ImageOnly(importlib.machinery.PathFinder)
    sys.meta_path[index] = _GUARD


def refused_imports() -> list[str]:
    return sorted(_GUARD.refused) if _GUARD is not None else []


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- phases


def env_phase(out: Path, expect_cuda: bool) -> int:
    """Facts about torch and the device; with ``expect_cuda``, fails unless CUDA works."""
    import torch
    import transformers

    data: dict[str, Any] = {
        "python": sys.version.split()[0], "torch": torch.__version__, "cuda_build": torch.version.cuda,
        "transformers": transformers.__version__, "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(), "distributions": {},
        "commit": os.environ.get("CLORA_CHECK_COMMIT"),  # scripts/tree_commit.sh, from gpu_check.sh
    }
    for name in (*IMAGE_DISTRIBUTIONS, *carried_distributions()):
        try:
            data["distributions"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            data["distributions"][name] = None
    ok = True
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(dev)
        start = time.perf_counter()
        a = torch.randn(1024, 1024, device=dev, dtype=torch.bfloat16)
        (a @ a).float().sum().item()
        host = torch.ones(1 << 20, pin_memory=True)
        moved = host.to(dev, non_blocking=True)
        torch.cuda.synchronize()
        data |= {"gpu": props.name, "gpu_memory_gb": props.total_memory / 1e9,
                 "capability": f"{props.major}.{props.minor}", "device_count": torch.cuda.device_count(),
                 "bf16_supported": torch.cuda.is_bf16_supported(),
                 "pinned_copy_ok": bool(moved.sum().item() == 1 << 20),
                 "first_kernels_s": time.perf_counter() - start}
        ok = data["pinned_copy_ok"]
    elif expect_cuda:
        ok = False
        data["error"] = "torch sees no CUDA device"
    data["imports"] = loaded_distributions()
    _write_json(out / "env.json", data)
    print(json.dumps(data, indent=1))
    return 0 if ok else 1


def tests_phase(out: Path, collect_only: bool, test_timeout: int | None, extra: list[str]) -> int:
    """``pytest -m cuda`` on TEST_FILES in this process (no plugin autoload: asyncio and timeout
    only), one line per test in the log; ``test_timeout`` fails a hung test (where pytest-timeout is)."""
    import pytest

    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    args = ["-m", "cuda", "-p", "pytest_asyncio.plugin", "-p", "no:cacheprovider", "-v", "-rfEs",
            "--durations=10", f"--junitxml={out / 'tests.xml'}"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        args += ["-p", "pytest_timeout"] + ([f"--timeout={test_timeout}"] if test_timeout else [])
    if collect_only:
        args.append("--collect-only")
    args += [*extra, *(str(ROOT / f) for f in TEST_FILES)]
    print("pytest " + " ".join(args), flush=True)
    collected = _Collected()
    code = int(pytest.main(args, plugins=[collected]))
    _write_json(out / "tests.json", {"exit_code": code, "collected": collected.ids,
                                     "imports": loaded_distributions(), "refused": refused_imports()})
    return code


class _Collected:
    """pytest plugin: the node ids selected to run (after ``-m`` deselection)."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def pytest_collection_finish(self, session: Any) -> None:
        self.ids = [item.nodeid for item in session.items]


def main(argv: list[str] | None = None) -> int:
    guard_imports_if_asked()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="phase", required=True)
    env = sub.add_parser("env", help="torch, CUDA and the device into OUT/env.json")
    env.add_argument("out", type=Path)
    env.add_argument("--expect-cuda", action="store_true", help="fail unless CUDA works")
    tests = sub.add_parser("tests", help="pytest -m cuda on the trainer test files")
    tests.add_argument("out", type=Path)
    tests.add_argument("--collect-only", action="store_true", help="list the subset, run nothing")
    tests.add_argument("--test-timeout", type=int, default=None, help="seconds per test (pytest-timeout)")
    tests.add_argument("pytest_args", nargs="*", help="more pytest options (after --)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phase == "env":
        return env_phase(args.out, args.expect_cuda)
    return tests_phase(args.out, args.collect_only, args.test_timeout, args.pytest_args)


if __name__ == "__main__":
    sys.exit(main())
