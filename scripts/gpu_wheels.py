"""Install the carried wheels (scripts/gpu-wheels.txt, downloaded into .gpu-wheels/) into a folder
that goes on PYTHONPATH, without network, venv or write access to the image's site-packages.

    python3 scripts/gpu_wheels.py WHEEL_DIR TARGET_DIR

Of each distribution's wheels the one for this Python and machine is taken (msgspec is carried
for several), and installed only when this interpreter lacks the distribution or has an older version
(the image's newer packages win; pytest-asyncio may need a newer pytest than the image's, so
pytest and its own dependencies are carried too). Installation is ``pip install --no-index
--no-deps --target`` with the image's pip configuration ignored; if pip is missing or refuses,
the wheel is unpacked directly (a wheel is a zip of its files as they lie in site-packages).
Standard library only: it runs before anything else is known to be importable. Prints one line
per wheel; exits non-zero if a wheel could not be installed.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


def wheel_name_version(path: Path) -> tuple[str, str]:
    """("msgspec", "0.23.0") from msgspec-0.23.0-cp312-cp312-manylinux...whl."""
    name, version = path.name.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def release(version: str) -> tuple[int, ...]:
    """The numeric release part of a version ("9.2.0rc1" -> (9, 2, 0)); enough to order ours."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def compatible(path: Path) -> bool:
    """Whether this interpreter and machine can import the wheel (its python, abi and platform tags)."""
    pytags, abi, platforms = path.name[: -len(".whl")].split("-")[-3:]
    here = (sys.version_info.major, sys.version_info.minor)
    py_ok = False
    for tag in pytags.split("."):
        digits = tag[2:]
        if tag.startswith("py"):
            py_ok |= digits in (str(here[0]), f"{here[0]}{here[1]}")
        elif tag.startswith("cp") and digits.isdigit():
            version = (int(digits[0]), int(digits[1:] or 0))
            py_ok |= version == here or (abi == "abi3" and version <= here)
    machine = platform.machine()
    platform_ok = platforms == "any" or (
        sys.platform.startswith("linux") and any(p.endswith(f"_{machine}") for p in platforms.split("."))
    )
    return py_ok and platform_ok


def pick(wheels: list[Path]) -> tuple[list[Path], list[str]]:
    """One compatible wheel per distribution; the names of distributions without one."""
    by_name: dict[str, list[Path]] = {}
    for wheel in wheels:
        by_name.setdefault(wheel_name_version(wheel)[0], []).append(wheel)
    chosen, missing = [], []
    for name, candidates in sorted(by_name.items()):
        usable = [w for w in candidates if compatible(w)]
        if usable:
            chosen.append(usable[0])
        else:
            missing.append(f"{name} ({', '.join(w.name for w in candidates)})")
    return chosen, missing


def needed(wheels: list[Path]) -> list[tuple[Path, str]]:
    """(wheel, reason) for each wheel this interpreter lacks or has older."""
    out = []
    for wheel in wheels:
        name, version = wheel_name_version(wheel)
        have = installed_version(name)
        if have is None:
            out.append((wheel, f"missing here, installing {version}"))
        elif release(have) < release(version):
            out.append((wheel, f"{have} here is older, installing {version}"))
        else:
            print(f"  {name}: {have} here (carried {version}): kept", flush=True)
    return out


def pip_install(wheels: list[Path], target: Path) -> bool:
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_REQUIRE_VIRTUALENV": "0",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--upgrade",
           "--no-warn-script-location", "--target", str(target), *map(str, wheels)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"  pip could not run ({exc}); unpacking instead", flush=True)
        return False
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        print(f"  pip failed (exit {done.returncode}: {' | '.join(tail)}); unpacking instead", flush=True)
        return False
    return True


def unpack(wheel: Path, target: Path) -> None:
    """Extract a wheel into ``target``; a ``*.data/purelib`` or ``platlib`` folder goes to the top."""
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.infolist():
            parts = member.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts, headers, data: not needed to import
                parts = parts[2:]
            dest = target.joinpath(*parts)
            if member.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    wheel_dir, target = Path(argv[0]), Path(argv[1])
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        print(f"no wheels in {wheel_dir}: fill it with the download command in docs/gpu.md", flush=True)
        return 1
    print(f"{len(wheels)} carried wheels in {wheel_dir}, Python {sys.version.split()[0]} on {platform.machine()}:",
          flush=True)
    usable, missing = pick(wheels)
    for name in missing:
        print(f"  {name}: NO WHEEL FOR THIS PYTHON/PLATFORM", flush=True)
    todo = needed(usable)
    for wheel, reason in todo:
        print(f"  {wheel_name_version(wheel)[0]}: {reason}", flush=True)
    target.mkdir(parents=True, exist_ok=True)
    if todo and (os.environ.get("CLORA_WHEELS_NO_PIP") == "1" or not pip_install([w for w, _ in todo], target)):
        for wheel, _ in todo:
            unpack(wheel, target)
    print(f"installed {len(todo)} into {target}", flush=True)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
