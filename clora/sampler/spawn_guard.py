"""Refuse, with one clear error, to start an engine from a script that spawn would run again.

vLLM starts its engine processes with multiprocessing's ``spawn`` here (clora preloads tcmalloc,
which only an exec'd process picks up). A spawned child imports the parent's main script again
(as ``__mp_main__``); a script that starts the runtime at top level, outside
``if __name__ == "__main__":``, would start it again in the child, and multiprocessing fails with a
bootstrapping error that vLLM reports as "Engine core initialization failed". Before any process
is spawned, ``check_main_guard`` looks for the main script's top-level frame on the current call
stack and, when the line it is running sits outside such a guard, raises ``MissingMainGuardError``
naming the line to move under it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from types import FrameType

from clora.errors import ConfigError

__all__ = ["MissingMainGuardError", "check_main_guard", "guarded_lines"]


class MissingMainGuardError(ConfigError):
    """The main script starts the runtime at import time, which a spawned engine process would repeat."""


def _main_frame(frame: FrameType | None) -> FrameType | None:
    """The frame running the main script's top-level code, if it is on this call stack."""
    main = sys.modules.get("__main__")
    while frame is not None:
        if frame.f_code.co_name == "<module>" and main is not None and frame.f_globals is vars(main):
            return frame
        frame = frame.f_back
    return None


def _is_main_test(node: ast.expr) -> bool:
    """``__name__ == "__main__"`` (either side)."""
    if not (isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq)):
        return False
    sides = [node.left, node.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    constants = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(constants) == 1


def guarded_lines(source: str) -> set[int]:
    """Line numbers of ``source`` inside the body of a top-level ``if __name__ == "__main__":``."""
    lines: set[int] = set()
    for stmt in ast.parse(source).body:
        if isinstance(stmt, ast.If) and _is_main_test(stmt.test):
            for inner in stmt.body:
                lines.update(range(inner.lineno, (inner.end_lineno or inner.lineno) + 1))
    return lines


def check_main_guard(start_method: str, frame: FrameType | None = None) -> None:
    """Raise MissingMainGuardError when ``start_method`` is spawn (or forkserver) and the main script is
    starting the engine from top-level code outside ``if __name__ == "__main__":``."""
    if start_method not in ("spawn", "forkserver"):
        return
    main_frame = _main_frame(frame if frame is not None else sys._getframe(1))
    path = main_frame.f_code.co_filename if main_frame is not None else None
    if main_frame is None or path is None or not Path(path).is_file():
        return  # started from a function, a thread, a REPL or a notebook: nothing is re-run
    line = main_frame.f_lineno
    if line in guarded_lines(Path(path).read_text()):
        return
    raise MissingMainGuardError(
        f"{path}, line {line} starts the clora runtime at the top level of the script. vLLM starts its engine "
        f"in new processes that import this script again, which would start everything a second time. Put the "
        f'code that starts the runtime under `if __name__ == "__main__":`, for example:\n\n'
        f'    if __name__ == "__main__":\n        asyncio.run(main())'
    )
