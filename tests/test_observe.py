"""observe: per-tenant summaries, spans, pictures and adapter checks against a hand-made run."""

from __future__ import annotations

import json
import struct
from collections import Counter

import msgspec
import pytest

from clora.observe import all_spans, curves, last_run, summarize, timeline
from clora.observe.artifacts import ArtifactError, check_peft_dir, export_tenant_adapter
from clora.observe.spans import TRAINING, WAITING, in_flight_sequences
from clora.observe.tensorboard import write_tensorboard


@pytest.fixture
def run_events(hand_made_run):
    return last_run(hand_made_run.old + hand_made_run.run)


def test_last_run_starts_at_the_newest_runtime_start_minus_its_startup_time(hand_made_run):
    events = last_run(hand_made_run.old + hand_made_run.run)
    assert events[0]["event"] == "sampler.engine_started"  # at 995, inside the run that began at 990
    assert "old" not in {e.get("tenant") for e in events}
    assert len(events) == len(hand_made_run.run)


def test_summary_numbers_match_the_hand_made_run(run_events):
    rows = {r.tenant: r for r in summarize(run_events)}
    assert list(rows) == ["a", "b"]
    a, b = rows["a"], rows["b"]
    assert (a.status, a.steps, a.trained, a.skipped) == ("finished", 2, 1, 1)
    assert (a.reward_start, a.reward_end) == (0.25, 0.0)
    assert (a.accuracy_start, a.accuracy_end) == (0.25, 0.5)
    assert a.time_rollout_s == pytest.approx(4.0 + 4.0)  # step 1, and the skipped step 2 (1011 to 1015)
    assert a.time_waiting_s == pytest.approx(0.0)
    assert a.time_train_s == pytest.approx(3.0)
    assert a.time_sync_s == pytest.approx(1.0)
    assert a.time_eval_s == pytest.approx(3.0)
    assert (a.versions_published, a.last_version, a.failures) == (2, 1, 0)
    assert a.duration_s == pytest.approx(15.0)

    assert (b.status, b.steps, b.trained, b.skipped) == ("failed", 2, 2, 0)
    assert (b.reward_start, b.reward_end) == (0.5, 0.75)
    assert (b.accuracy_start, b.accuracy_end) == (0.5, 0.5)
    assert b.time_rollout_s == pytest.approx(7.0)
    assert b.time_waiting_s == pytest.approx(2.0)  # step 1 asked at 1008, the trainer was on a until 1010
    assert b.time_train_s == pytest.approx(5.0)
    assert b.time_sync_s == pytest.approx(2.0)
    assert (b.versions_published, b.last_version, b.failures) == (3, 2, 1)
    assert b.last_error == "EnvError: boom"
    assert b.duration_s == pytest.approx(19.0)  # no tenant.finished: first (1001) to last (1020) event


def test_without_a_trainer_event_the_whole_ask_counts_as_training(run_events):
    events = [e for e in run_events if not (e["event"] == "trainer.step" and e["tenant"] == "b")]
    b = {r.tenant: r for r in summarize(events)}["b"]
    assert (b.time_waiting_s, b.time_train_s) == (pytest.approx(0.0), pytest.approx(7.0))


def test_spans_split_each_step_into_rollout_waiting_training_publishing(run_events, hand_made_run):
    spans = all_spans(run_events)
    assert Counter(s.row for s in spans) == hand_made_run.expected_spans
    b_step1 = sorted((s for s in spans if s.row == "b" and 1003 <= s.start < 1014), key=lambda s: s.start)
    assert [(s.kind, s.start, s.end) for s in b_step1] == [
        ("rollout", 1003.0, 1008.0), (WAITING, 1008.0, 1010.0), (TRAINING, 1010.0, 1013.0),
        ("publishing", 1013.0, 1014.0),
    ]
    skipped = [s for s in spans if s.row == "a" and s.start == 1011.0]
    assert [(s.kind, s.end) for s in skipped] == [("rollout", 1015.0)]  # from step 1's end to the skip event
    for row in hand_made_run.expected_spans:  # a row's spans never overlap
        row_spans = sorted((s for s in spans if s.row == row), key=lambda s: s.start)
        assert all(x.end <= y.start + 1e-9 for x, y in zip(row_spans, row_spans[1:])), row


def test_in_flight_sequences_counts_overlapping_requests(run_events):
    times, counts = in_flight_sequences(run_events)
    assert list(zip(times, counts)) == [(1003.0, 4), (1007.0, 2), (1008.0, 0)]


def test_timeline_png_has_a_row_per_tenant_and_actor_and_every_span(run_events, tmp_path, hand_made_run):
    info = timeline(run_events, tmp_path / "timeline.png")
    assert info.rows == ["a", "b", "trainer", "sync"]
    assert info.marks == sum(hand_made_run.expected_spans.values())
    data = info.path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width, height = struct.unpack(">II", data[16:24])
    assert width > 1000 and height > 300


def test_curves_png_has_every_reward_and_accuracy_point(run_events, tmp_path):
    info = curves(run_events, tmp_path / "curves.png")
    assert info.rows == ["a", "b"]
    assert info.marks == 4 + 3  # reward: a 2 steps, b 2 steps; accuracy: a 2 evals, b 1
    data = info.path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_pictures_of_a_run_without_steps_fail_clearly(tmp_path):
    only_start = [{"ts": 1.0, "level": "info", "event": "runtime.started", "duration_s": 0.5}]
    with pytest.raises(ValueError, match="no spans"):
        timeline(only_start, tmp_path / "t.png")
    with pytest.raises(ValueError, match="no curves"):
        curves(only_start, tmp_path / "c.png")


def test_tensorboard_scalars_per_tenant_with_any_writer(run_events, tmp_path):
    calls = []

    class RecordingWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, global_step, walltime):
            calls.append((self.log_dir, tag, value, global_step))

        def close(self):
            calls.append((self.log_dir, "closed", None, None))

    written = write_tensorboard(run_events, tmp_path, writer_class=RecordingWriter)
    assert set(written) == {"a", "b"}
    assert (str(tmp_path / "b"), "reward/mean", 0.75, 2) in calls
    assert (str(tmp_path / "a"), "eval/accuracy", 0.5, 2) in calls
    assert (str(tmp_path / "a"), "time/rollout", 4.0, 1) in calls
    assert sum(1 for c in calls if c[1] == "closed") == 2


def _peft_dir(path, *, config=None, tensors=("base_model.model.layers.0.q_proj.lora_A.weight",)):
    path.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8.0, "target_modules": ["v_proj", "q_proj"],
           "base_model_name_or_path": "/m"} if config is None else config
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    header = json.dumps({n: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for n in tensors}).encode()
    (path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    return path


def test_check_peft_dir_reads_the_config_and_the_safetensors_header(tmp_path):
    info = check_peft_dir(_peft_dir(tmp_path / "ad"))
    assert (info.rank, info.alpha, info.target_modules, info.tensors) == (4, 8.0, ("q_proj", "v_proj"), 1)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda p: (p / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
        (lambda p: (p / "adapter_config.json").unlink(), "adapter_config.json is missing"),
        (lambda p: (p / "adapter_config.json").write_text("{"), "not valid JSON"),
        (lambda p: (p / "adapter_config.json").write_text('{"peft_type": "IA3"}'), "expected 'LORA'"),
        (lambda p: (p / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}'), "no 'lora_alpha'"),
        (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\1\2"), "not a safetensors file"),
    ],
)
def test_check_peft_dir_names_what_is_wrong(tmp_path, breakage, message):
    adapter = _peft_dir(tmp_path / "ad")
    breakage(adapter)
    with pytest.raises(ArtifactError, match=message):
        check_peft_dir(adapter)


def test_a_safetensors_file_without_lora_weights_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="no lora_A/lora_B"):
        check_peft_dir(_peft_dir(tmp_path / "ad", tensors=("model.embed_tokens.weight",)))


def test_export_copies_the_tenant_adapter_and_refuses_to_overwrite(tmp_path):
    _peft_dir(tmp_path / "run" / "tenants" / "a" / "adapter")
    info = export_tenant_adapter(tmp_path / "run", "a", tmp_path / "out")
    assert info.path == tmp_path / "out" and info.rank == 4
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(ArtifactError, match="--force"):
        export_tenant_adapter(tmp_path / "run", "a", tmp_path / "out")
    assert export_tenant_adapter(tmp_path / "run", "a", tmp_path / "out", force=True).rank == 4


def test_summary_rows_encode_as_json(run_events):
    rows = msgspec.json.decode(msgspec.json.encode(summarize(run_events)))
    assert rows[1]["tenant"] == "b" and rows[1]["time_waiting_s"] == pytest.approx(2.0)


def test_tenant_progress_advances_only_the_reporting_tenant():
    import io

    from rich.console import Console

    from clora.config import ExperimentConfig
    from clora.observe.console import ProgressBars

    class Record(msgspec.Struct):
        step: int
        adapter_version: int
        reward_mean: float
        trained: bool

    console = Console(file=io.StringIO(), width=120)
    experiments = [ExperimentConfig(name="a", steps=2), ExperimentConfig(name="b", steps=3)]
    with ProgressBars(console, experiments) as progress:
        progress.on_step("a", Record(step=1, adapter_version=1, reward_mean=0.5, trained=True))
        progress.on_step("a", Record(step=2, adapter_version=1, reward_mean=0.0, trained=False))
    assert (progress.completed("a"), progress.completed("b")) == (2, 0)
    assert "a step 2 reward 0.00 v1 (skipped) - final eval" in console.file.getvalue()


def test_a_fused_trainer_step_counts_once_for_the_trainer_and_fully_for_each_tenant(tmp_path, hand_made_run):
    fused = [e for e in hand_made_run.run if e["event"] != "trainer.step"] + [
        {"ts": 1013.0, "level": "info", "event": "trainer.step", "tenant": t, "version": 1, "step": 1,
         "duration_s": 3.0, "wait_s": 0.0, "fused": 2} for t in ("a", "b")
    ]
    info = timeline(fused, tmp_path / "t.png")
    # b's second trainer step is gone; the fused one is 2
    assert info.marks == sum(hand_made_run.expected_spans.values()) - 1
    busy = [s for s in all_spans(fused) if s.row == "trainer"]
    assert sorted((s.tenant, s.start, s.end) for s in busy) == [("a", 1010.0, 1013.0), ("b", 1010.0, 1013.0)]


def test_engine_summary_prefers_the_totals_line_and_else_sums_the_windows():
    from clora.events import ENGINE_STATS, ENGINE_TOTALS
    from clora.observe import engine_line, engine_summary

    windows = [
        {"event": ENGINE_STATS, "prompt_tokens": 1000, "prompt_tokens_computed": 400, "prompt_tokens_cached": 600,
         "generation_tokens": 50, "decode_steps": 10, "decode_rows": 80, "decode_batch_max": 8, "busy_s": 2.0,
         "decode_batches": {"8-15": 10}},
        {"event": ENGINE_STATS, "prompt_tokens": 500, "prompt_tokens_computed": 500, "prompt_tokens_cached": 0,
         "generation_tokens": 30, "decode_steps": 30, "decode_rows": 60, "decode_batch_max": 16, "busy_s": 1.5,
         "decode_batches": {"2-3": 30}},
    ]
    assert engine_summary([{"event": "tenant.step"}]) is None
    summed = engine_summary(windows)
    assert (summed["prompt_tokens"], summed["prompt_tokens_cached"], summed["decode_rows"]) == (1500, 600, 140)
    assert summed["decode_batch_mean"] == 140 / 40 and summed["decode_batch_max"] == 16
    assert summed["decode_batches"] == {"8-15": 10, "2-3": 30}
    line = engine_line(summed)
    assert "1,500 prompt tokens (900 computed, 600 from the prefix cache = 40%)" in line and "mean 3.5" in line
    totals = {"event": ENGINE_TOTALS, "prompt_tokens": 7, "prompt_tokens_cached": 0}
    assert engine_summary([*windows, totals])["prompt_tokens"] == 7


@pytest.mark.parametrize("crash", ["sigkill", "ctrl-c"])
def test_a_resumed_run_is_one_run_with_each_step_counted_once(crash, resumed_run):
    older = [{"ts": 1.0, "event": "runtime.started", "duration_s": 0.0},
             {"ts": 2.0, "event": "tenant.started", "tenant": "old", "steps": 1}]
    events = last_run(older + resumed_run(crash))
    assert "old" not in {e.get("tenant") for e in events}  # the run before the first start is another run
    (row,) = summarize(events)
    assert (row.status, row.steps, row.trained, row.failures) == ("finished", 6, 6, 0)
    assert (row.reward_start, row.reward_end) == (0.1, 0.6)
    # A fresh (not resumed) start after it begins a new run.
    again = [{"ts": 200.0, "event": "runtime.started", "duration_s": 1.0, "resume": False},
             {"ts": 201.0, "event": "tenant.started", "tenant": "a", "steps": 6}]
    (row,) = summarize(last_run(resumed_run(crash) + again))
    assert (row.status, row.steps) == ("running", 0)


def test_progress_bars_continue_from_the_checkpointed_step():
    from rich.console import Console

    from clora.config import ExperimentConfig
    from clora.observe.console import ProgressBars
    from clora.tenant.actor import StepRecord

    def record(step: int) -> StepRecord:
        return StepRecord(step=step, adapter_version=step, reward_mean=0.5, time_rollout_s=0.0, time_train_s=0.0,
                          time_sync_s=0.0, trained=True)

    experiments = [ExperimentConfig(name="a", steps=6), ExperimentConfig(name="b", steps=6)]
    with ProgressBars(Console(quiet=True), experiments, done={"a": 4, "b": None}) as bars:
        assert (bars.completed("a"), bars.completed("b")) == (4, 0)
        for step in (5, 6):
            bars.on_step("a", record(step))
        bars.on_step("b", record(1))
    assert (bars.completed("a"), bars.completed("b")) == (6, 1)
