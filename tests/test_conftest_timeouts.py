"""The suite's guard against a timed-out async test: its task is cancelled (and its ``async with``
blocks run) before the next test, so a hung Runtime cannot keep an engine busy for the rest of the
session (one CI run lost 40 minutes that way)."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")


def test_a_timed_out_async_test_is_cancelled_before_the_next_one_runs(pytester):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = session\n"
        "asyncio_default_test_loop_scope = session\n"
    )
    pytester.makepyfile(
        """
        import asyncio, pytest
        cleaned_up = []

        @pytest.mark.timeout(1)
        async def test_hangs():
            try:
                await asyncio.sleep(60)
            finally:
                cleaned_up.append("hangs")

        async def test_next():
            assert cleaned_up == ["hangs"]
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*Failed: Timeout*", "FAILED *::test_hangs*"])
