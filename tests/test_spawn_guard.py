"""A script that starts the runtime outside ``if __name__ == "__main__":`` gets one clear error naming the
line to guard, before any engine process is spawned; a guarded script, a function and fork pass."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from clora.sampler.spawn_guard import MissingMainGuardError, check_main_guard, guarded_lines

ROOT = Path(__file__).resolve().parents[1]


def test_guarded_lines_are_the_body_of_the_main_test():
    source = textwrap.dedent('''\
        import asyncio
        x = 1
        if __name__ == "__main__":
            asyncio.run(
                main()
            )
        if "__main__" == __name__:
            y = 2
        if __name__ == "other":
            z = 3
    ''')
    assert guarded_lines(source) == {4, 5, 6, 8}


def _run(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "user_script.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120, cwd=ROOT)


UNGUARDED = '''
    import asyncio
    from clora.sampler.spawn_guard import check_main_guard

    async def main():
        check_main_guard("{method}")
        print("started")

    asyncio.run(main())
'''


def test_an_unguarded_script_is_refused_with_the_line_to_guard(tmp_path):
    done = _run(UNGUARDED.format(method="spawn"), tmp_path)
    assert done.returncode != 0
    assert "MissingMainGuardError" in done.stderr and "user_script.py, line 9" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr and "started" not in done.stdout


def test_fork_needs_no_guard_and_a_guarded_script_passes(tmp_path):
    assert _run(UNGUARDED.format(method="fork"), tmp_path).stdout.strip() == "started"
    guarded = UNGUARDED.format(method="spawn").replace(
        "    asyncio.run(main())", '    if __name__ == "__main__":\n        asyncio.run(main())'
    )
    done = _run(guarded, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "started"


def test_a_call_outside_the_main_script_passes():
    check_main_guard("spawn")  # pytest's own main module calls pytest under its guard


def test_the_runtime_refuses_an_unguarded_script_before_starting_an_engine(tmp_path):
    done = _run(f'''
        import asyncio, clora
        from clora.config import ModelConfig, RuntimeConfig

        async def main():
            async with clora.Runtime(RuntimeConfig(run_dir={str(tmp_path / "run")!r}, model=ModelConfig(source="tiny"))):
                print("RUNTIME-UP")

        asyncio.run(main())
    ''', tmp_path)
    assert done.returncode != 0 and "RUNTIME-UP" not in done.stdout
    assert "MissingMainGuardError" in done.stderr and 'if __name__ == "__main__":' in done.stderr
    assert "Engine core initialization failed" not in done.stderr
