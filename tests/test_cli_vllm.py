"""End to end through the command line on the tiny model (real vLLM-CPU): docs/getting-started.md's
commands, as written, from `clora run` to `clora sample`.

They run in a folder whose examples/experiments.toml is the repository's file made tiny (model "tiny",
fewer and shorter steps, same experiment names), so every path and name on the page is the real one.
Both runtimes (run, sample) borrow the session's engine (conftest ``borrow_tiny_engine``); marked ``vllm``.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import msgspec
import pytest

from clora.cli.main import EXIT_OK, main
from clora.config import EngineConfig, dump_toml, load_toml

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1500), pytest.mark.usefixtures("keep_structlog_config")]

ROOT = Path(__file__).resolve().parents[1]


def _tiny_examples(folder: Path) -> list[str]:
    """examples/experiments.toml with the tiny model and 2 short steps per experiment; its tenant names."""
    config = load_toml(ROOT / "examples" / "experiments.toml")
    experiments = tuple(
        msgspec.structs.replace(e, steps=2, prompts_per_step=2, group_size=2, max_tokens=16,
                                env=msgspec.structs.replace(e.env, held_out_size=4, max_turns=2))
        for e in config.experiments
    )
    tiny = msgspec.structs.replace(
        config, model=msgspec.structs.replace(config.model, source="tiny"), experiments=experiments,
        engine=EngineConfig(max_loras=3, max_lora_rank=16, max_num_seqs=32, kv_cache_gib=1.0),  # the session engine's
    )
    (folder / "examples").mkdir()
    (folder / "examples" / "experiments.toml").write_bytes(dump_toml(tiny))
    return [e.name for e in experiments]


async def test_the_getting_started_commands_run_as_written(tmp_path, monkeypatch, capsys, doc_commands,
                                                          borrow_tiny_engine):
    names = _tiny_examples(tmp_path)
    monkeypatch.chdir(tmp_path)
    page = [c[1:] for c in doc_commands("docs/getting-started.md") if c[0] == "clora"]
    commands = [c for c in page if c[0] in ("run", "events", "export", "sample")
                and "runs/demo" not in c and "out/lr0.001" not in c and "--check" not in c and "--resume" not in c]
    assert [c[0] for c in commands] == ["run", "events", "export", "sample"]
    run, events, export, sample = commands

    assert await asyncio.to_thread(main, run) == EXIT_OK, capsys.readouterr()
    assert f"{len(names)} experiments ({', '.join(names)})" in capsys.readouterr().out

    assert main(events) == EXIT_OK
    assert main([*events[:2], "--json"]) == EXIT_OK
    rows = {r["tenant"]: r for r in json.loads(capsys.readouterr().out.splitlines()[-1])}
    assert set(rows) == set(names)
    for row in rows.values():
        assert row["status"] == "finished" and row["steps"] == 2 and row["failures"] == 0
        assert row["accuracy_start"] is not None and row["time_rollout_s"] > 0
        assert row["versions_published"] >= 1 + row["trained"]
    for picture in ("timeline.png", "curves.png"):
        assert (tmp_path / "runs" / "experiments" / picture).stat().st_size > 20_000

    assert main(export) == EXIT_OK
    version = int(re.search(r"version (\d+), rank", capsys.readouterr().out).group(1))
    assert version == rows[export[2]]["last_version"]

    assert await asyncio.to_thread(main, sample) == EXIT_OK
    out = capsys.readouterr().out
    assert len(borrow_tiny_engine) == 2  # run, sample
    assert sample[2][:20] in out and f"adapter version {version}" in out, out
