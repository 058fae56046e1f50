"""docs/getting-started.md says only what is true: every command in its ``bash`` blocks is a valid
``clora`` (or ``make``) command, the ones that start no engine run here as written, and its error
examples are the exact lines ``clora run`` prints. The commands that start an engine run as written
in tests/test_cli_vllm.py (run, events, export, sample) and tests/test_demo_vllm.py (the demo and the
commands it prints); ``--resume`` in tests/test_resume_cli.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from clora.cli.main import EXIT_OK, EXIT_USAGE, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "getting-started.md"


DOC = "docs/getting-started.md"


def clora_commands(doc_commands) -> list[list[str]]:
    return [c[1:] for c in doc_commands(DOC) if c[0] == "clora"]


pytestmark = pytest.mark.usefixtures("keep_structlog_config")


def test_the_page_walks_from_the_demo_to_export_and_sample(doc_commands):
    names = [c[0] if c[0] != "clora" else c[1] for c in doc_commands(DOC)]
    for earlier, later in (("make", "run"), ("run", "events"), ("events", "export"), ("export", "sample")):
        assert names.index(earlier) < len(names) - 1 - names[::-1].index(later), (earlier, later)
    assert [c for c in doc_commands(DOC) if c[0] not in ("make", "source", "clora")] == []


def test_every_clora_command_on_the_page_is_valid(doc_commands):
    parser = build_parser()
    for args in clora_commands(doc_commands):
        if args == ["--help"] or args[-1:] == ["--help"] and args[0] == "bench":
            continue  # --help exits; run below
        parsed = parser.parse_args(args)  # a usage error exits (SystemExit) and fails the test
        assert parsed.handler is not None


def test_every_make_target_on_the_page_exists_and_the_demo_is_the_example_script(doc_commands):
    makefile = (ROOT / "Makefile").read_text()
    for command in doc_commands(DOC):
        if command[0] == "make":
            assert re.search(rf"^{command[1]}:", makefile, re.M), command
    assert re.search(r"^demo:.*\n\t.*python examples/demo\.py", makefile, re.M)
    assert "= python examples/demo.py" in PAGE.read_text()


def test_commands_that_start_no_engine_run_as_written(doc_commands, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    engine_free = [a for a in clora_commands(doc_commands) if "--help" in a or "--check" in a]
    assert len(engine_free) >= 3  # clora --help, run --check, bench --help
    for args in engine_free:
        assert main(args) == EXIT_OK, args
        out = capsys.readouterr().out
        assert "usage: clora" in out or "is valid" in out, args


# The bad file behind each error line the page shows (as my.toml in the current folder).
ERROR_EXAMPLES = {
    "engine.max_loras: expected int": "[engine]\nmax_loras = 'four'\n[[experiments]]\nname = 'a'\n",
    "experiments[0].steps: must be >= 1": "[[experiments]]\nname = 'a'\nsteps = 0\n",
    "target module 'qkv_proj'": "[model]\nsource = 'tiny'\n[[experiments]]\nname = 'a'\n"
                                "lora = { target_modules = ['q_proj', 'qkv_proj'] }\n",
}


def test_the_error_lines_on_the_page_are_what_clora_run_prints(tmp_path, monkeypatch, capsys):
    shown = re.search(r"exit code 2:\n\n```\n(.*?)```", PAGE.read_text(), re.S).group(1).splitlines()
    assert len(shown) == len(ERROR_EXAMPLES)
    monkeypatch.chdir(tmp_path)
    for line in shown:
        (bad,) = [toml for key, toml in ERROR_EXAMPLES.items() if key in line]
        Path("my.toml").write_text(bad)
        assert main(["run", "my.toml"]) == EXIT_USAGE
        assert capsys.readouterr().err.strip() == line
