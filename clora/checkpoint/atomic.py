"""Atomic writing: a file or a folder is either absent, or the previous one, or complete.

- ``write_atomically(path, write)``: ``write(tmp)`` fills a temp file beside ``path`` (a hidden
  ``.<name>.<random>.tmp``), which is then renamed over ``path``. ``durable=True`` also fsyncs the
  file before the rename and the folder after it (a crash of the machine keeps the new file too).
  ``write_bytes_atomically`` is the same for a bytes value.
- ``build_dir_atomically(target, build)``: ``build(tmp)`` fills a sibling folder
  ``.<name>.partial-<pid>-<random>``, which is then renamed to ``target``. A killed build leaves only
  that partial folder; the next build of the same target removes it once its process is gone.
- ``remove_orphans(parent, prefix)``: folders named ``<prefix><pid>-...`` whose process is gone.

Temp files and folders are created with the modes of ordinary ones (0666 / 0777 less the umask), not
``tempfile``'s private 0600 / 0700, so what is written reads like any file the user creates.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "TMP_SUFFIX",
    "PARTIAL_MARK",
    "pid_alive",
    "remove_orphans",
    "fsync_path",
    "write_atomically",
    "write_bytes_atomically",
    "build_dir_atomically",
]

TMP_SUFFIX = ".tmp"  # temp files: ".<name>.<random>.tmp"
PARTIAL_MARK = ".partial-"  # temp folders: ".<name>.partial-<pid>-<random>"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal still counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_path(path: Path) -> None:
    """Flush a file's content, or (for a folder) the renames and creations inside it, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fresh(parent: Path, prefix: str, suffix: str, create: Callable[[Path], None]) -> Path:
    """``create`` a path ``<parent>/<prefix><random><suffix>`` that did not exist yet."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            create(path)
        except FileExistsError:
            continue
        return path


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))  # the umask applies


def write_atomically(path: str | Path, write: Callable[[Path], object], *, durable: bool = False) -> None:
    """Let ``write(tmp)`` write the file's content to ``tmp``, then rename it over ``path``.

    On any error the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = _fresh(path.parent, f".{path.name}.", TMP_SUFFIX, _new_file)
    try:
        mode = tmp.stat().st_mode & 0o777  # 0666 less the umask, as the kernel applied it
        write(tmp)
        if tmp.stat().st_mode & 0o777 != mode:  # the writer made a file of its own (safetensors: 0600)
            tmp.chmod(mode)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


def write_bytes_atomically(path: str | Path, data: bytes, *, durable: bool = False) -> None:
    """``data`` as the new content of ``path`` (see ``write_atomically``)."""
    write_atomically(path, lambda tmp: tmp.write_bytes(data), durable=durable)


def build_dir_atomically(target: str | Path, build: Callable[[Path], object], *, replace: bool = False) -> Path:
    """Run ``build(tmp)`` in a fresh sibling folder and rename it to ``target``; return ``target``.

    ``replace=False``: when another builder renamed its folder into place first, that one is kept
    and ours discarded. ``replace=True``: an existing ``target`` is removed first (readers that
    look between the removal and the rename find no folder, never a partial one).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}{PARTIAL_MARK}"
    remove_orphans(target.parent, prefix)
    tmp = _fresh(target.parent, f"{prefix}{os.getpid()}-", "", lambda p: p.mkdir(0o777))
    try:
        build(tmp)
        if replace and target.exists():
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            if replace or not target.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def remove_orphans(parent: Path, prefix: str) -> None:
    """Remove the folders ``<parent>/<prefix><pid>-*`` whose owner process ``pid`` is gone."""
    for orphan in parent.glob(f"{glob.escape(prefix)}*-*"):
        pid_text = orphan.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and not pid_alive(int(pid_text)):
            shutil.rmtree(orphan, ignore_errors=True)
