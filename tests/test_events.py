"""The run folder's JSON-lines sink sees every event without configuring structlog globally."""

import structlog

from clora import events


def test_sink_writes_one_json_line_per_event_and_passes_the_dict_on(tmp_path):
    sink = events.JsonlSink(tmp_path / "run" / "events.jsonl")
    seen = []
    log = structlog.wrap_logger(None, processors=[sink, lambda _l, _m, d: seen.append(d) or ""]).bind(tenant="a")
    log.info(events.TENANT_STEP, step=1, **{"reward/mean": 0.5}, error=ValueError("bad"))
    log.warning(events.TENANT_FAILED, path=tmp_path)
    sink.close()
    rows = list(events.read_events(tmp_path / "run"))
    assert [r["event"] for r in rows] == [events.TENANT_STEP, events.TENANT_FAILED]
    assert rows[0]["tenant"] == "a" and rows[0]["reward/mean"] == 0.5 and rows[0]["level"] == "info"
    assert rows[0]["error"] == "ValueError: bad"
    assert rows[1]["path"] == str(tmp_path)
    assert seen[0]["step"] == 1  # the rest of the chain still got the event


def test_sink_ignores_events_after_close(tmp_path):
    sink = events.JsonlSink(tmp_path / "events.jsonl")
    sink.close()
    sink(None, "info", {"event": "late"})  # must not raise
    assert list(events.read_events(tmp_path)) == []


def test_run_logger_keeps_the_callers_processors(tmp_path):
    sink = events.JsonlSink(tmp_path / "events.jsonl")
    log = events.run_logger(sink)
    assert structlog.get_config()["processors"][-1] is not sink
    log.info("x.y", a=1)
    sink.close()
    assert next(events.read_events(tmp_path))["a"] == 1


def test_run_logger_sends_debug_to_the_sink_but_only_console_level_to_the_rest(tmp_path, capsys):
    sink = events.JsonlSink(tmp_path / "events.jsonl")
    log = events.run_logger(sink, console_level="warning")
    log.debug("quiet.debug")
    log.info("quiet.info")
    log.warning("loud.warning")
    sink.close()
    assert [e["event"] for e in events.read_events(tmp_path)] == ["quiet.debug", "quiet.info", "loud.warning"]
    out = capsys.readouterr().out
    assert "loud.warning" in out and "quiet" not in out
