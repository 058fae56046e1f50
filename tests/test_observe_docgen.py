"""The generated reference (events, messages, configuration) matches the code, and its rules hold."""

from __future__ import annotations

import textwrap

import msgspec
import pytest

from clora import config as config_module
from clora import events as runtime_events
from tools import docgen
from tools.ref_code import event_catalog, message_catalog, source_root
from tools.ref_config import config_catalog


def test_docs_are_up_to_date_with_the_code(capsys):
    code = docgen.main(["--check"])
    assert code == 0, capsys.readouterr().err  # fix: python -m tools.docgen


def test_every_runtime_event_constant_is_documented_with_its_docstring_and_fields():
    catalog = {e.name: e for e in event_catalog()}
    for constant in runtime_events.__all__:
        value = getattr(runtime_events, constant)
        if isinstance(value, str):
            assert value in catalog, constant
            assert catalog[value].constant == constant and catalog[value].doc
    step = catalog[runtime_events.TENANT_STEP]
    for field in ("tenant", "step", "adapter_version", "duration_s", "queue_depth", "reward/mean", "time/rollout",
                  "time/train", "time/sync", "train/*"):
        assert field in step.fields, field
    assert step.emitters == {"clora.tenant.actor"} and step.levels == {"info"}


def test_every_event_name_is_defined_once_in_the_events_modules():
    """clora/events.py (and the kernel's actors/events.py, which cannot import clora) define every
    event name; no other module defines one, and every name in the catalog is unique."""
    catalog = event_catalog()
    assert {e.module for e in catalog} <= {"clora.events", "actors.events"}
    names_seen = [e.name for e in catalog]
    assert len(names_seen) == len(set(names_seen))
    for constant in ("TRAINER_STEP", "TRAINER_FORWARD_BACKWARD", "TRAINER_STEP_REJECTED", "SAMPLE_DONE",
                     "ACTOR_FAILED", "ACTOR_MAILBOX_STATS"):
        assert constant in runtime_events.__all__, constant


def test_no_log_call_names_its_event_with_a_string_literal():
    """A log call's event is a constant from the events modules, never a re-typed string."""
    import ast

    from tools.ref_code import _is_log_call, iter_modules

    offenders = []
    for module, tree in iter_modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _is_log_call(node) and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    offenders.append(f"{module}:{node.lineno} {first.value!r}")
    assert offenders == []


def test_fields_the_timeline_needs_are_logged():
    catalog = {e.name: e for e in event_catalog()}
    assert {"tenant", "version", "duration_s"} <= set(catalog[runtime_events.TRAINER_STEP].fields)  # via _step(event, ...)
    assert {"tenant", "adapter_version", "duration_s"} <= set(catalog[runtime_events.ADAPTER_PUBLISHED].fields) | {"version"}
    assert {"tenant", "step", "accuracy", "duration_s"} <= set(catalog[runtime_events.TENANT_EVAL].fields)
    assert {"n", "duration_s"} <= set(catalog[runtime_events.SAMPLE_DONE].fields)


def test_event_extraction_rules_on_a_small_source_tree(tmp_path):
    (tmp_path / "actors").mkdir()
    (tmp_path / "clora").mkdir()
    (tmp_path / "clora" / "things.py").write_text(textwrap.dedent('''
        from typing import Final
        THING_DONE: Final = "thing.done"
        """A thing finished."""
        NOT_AN_EVENT = "thing.other"
        PLAIN = "no dots"
        """Not an event: no dot."""

        def work(log, values):
            log.info(THING_DONE, tenant="a", **{"reward/mean": 1.0}, **{f"train/{k}": v for k, v in values.items()})

        class Worker:
            def _emit(self, event, n):
                self.log.warning(event, n=n, **extra)

            def run(self):
                self._emit(THING_DONE, 3)
    '''))
    [doc] = event_catalog(tmp_path)
    assert (doc.name, doc.constant, doc.module, doc.doc) == ("thing.done", "THING_DONE", "clora.things",
                                                              "A thing finished.")
    assert list(doc.fields) == ["tenant", "reward/mean", "train/*", "n", "**extra"]
    assert doc.levels == {"info", "warning"}


def test_messages_know_their_handlers_and_replies():
    catalog = {m.name: m for m in message_catalog()}
    assert ("TrainerActor", "TrainStepResult", True) in catalog["TrainStep"].handlers
    assert ("SamplerActor", "SampleResult", True) in catalog["SampleRequest"].handlers
    assert ("SyncActor", "Published", True) in catalog["Publish"].handlers
    assert catalog["SampleResult"].handlers == []  # a reply, handled by nobody
    assert catalog["RunExperiment"].handlers == [("TenantActor", "ExperimentResult", False)]  # from clora/tenant/actor.py
    assert ("tenant", "str | None") in catalog["SampleRequest"].fields


def test_configuration_reference_covers_every_field_with_its_default_and_checks():
    sections = {s.struct: s for s in config_catalog()}
    for name in ("RuntimeConfig", "ModelConfig", "EngineConfig", "TrainerConfig", "ExperimentConfig",
                 "LoraConfig", "OptimConfig", "LossConfig", "EnvConfig"):
        struct = getattr(config_module, name)
        documented = [f.name for f in sections[name].fields]
        assert documented == [f.name for f in msgspec.structs.fields(struct)], name
    assert sections["ExperimentConfig"].header == "[[experiments]]"
    assert sections["LoraConfig"].header == "[experiments.lora]"
    engine = {f.name: f for f in sections["EngineConfig"].fields}
    assert engine["max_loras"].default == "8" and engine["max_loras"].checks == ["must be >= 1"]
    assert engine["max_cpu_loras"].default == "unset" and "max_loras" in engine["max_cpu_loras"].checks[0]
    optim = {f.name: f for f in sections["OptimConfig"].fields}
    assert optim["beta1"].checks == ["must be in [0, 1)"]  # found through the loop over (name, value) pairs
    exp = {f.name: f for f in sections["ExperimentConfig"].fields}
    assert exp["name"].default == "required" and exp["steps"].checks == ["must be >= 1"]
    model = {f.name: f for f in sections["ModelConfig"].fields}
    assert model["dtype"].type == '"float32" | "bfloat16" | "auto"'


def test_fill_regions_replaces_only_the_region_and_refuses_a_missing_one():
    text = "a\n<!-- generated:x -->\nold\n<!-- /generated:x -->\nb\n"
    assert docgen.fill_regions(text, {"x": "new"}) == "a\n<!-- generated:x -->\nnew\n<!-- /generated:x -->\nb\n"
    with pytest.raises(ValueError, match="generated:y"):
        docgen.fill_regions(text, {"y": "new"})


def test_check_mode_reports_stale_docs_without_writing(tmp_path, capsys):
    (tmp_path / "concepts.md").write_text("<!-- generated:messages -->\n<!-- /generated:messages -->\n"
                                          "<!-- generated:events -->\n<!-- /generated:events -->\n")
    assert docgen.main(["--check", "--docs", str(tmp_path)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert not (tmp_path / "configuration.md").exists()
    assert docgen.main(["--docs", str(tmp_path)]) == 0
    assert "| `max_loras` |" in (tmp_path / "configuration.md").read_text()
    assert docgen.main(["--check", "--docs", str(tmp_path)]) == 0
    assert source_root().joinpath("clora", "config.py").is_file()


def test_every_field_an_event_docstring_names_is_logged():
    """An event's docstring names its fields as ``field``; each must be a field some log call of that
    event passes (or its ``**`` expansion's prefix like ``train/*``), so the docs never promise a field
    that is never emitted."""
    import re

    problems = []
    for event in event_catalog():
        fields = set(event.fields)
        prefixes = {f[:-1] for f in fields if f.endswith("*")}
        for named in re.findall(r"``([^`]+)``", event.doc):
            if named.startswith("system.") or named in fields or any(named.startswith(p) for p in prefixes):
                continue
            problems.append(f"{event.name}: ``{named}`` is never logged (fields: {sorted(fields)})")
    assert problems == []
