"""A small, hand-made run: two tenants on one trainer, with numbers chosen to check by hand.

Timeline (seconds, epoch 1000 + x); every event's ts is the END of what it describes:
- runtime up at 1000 after 10 s of start-up (so the run began at 990); an older run at ts 500.
- a: eval 1001-1003 (acc 0.25); step 1: rollout 1003-1007, training 1007-1010 (no wait),
  publish 1010-1011 (reward 0.25, v1); step 2 skipped at 1015 (reward 0.0);
  eval 1015-1016 (acc 0.5); finished at 1016 after 15 s.
- b: eval 1001-1003 (acc 0.5); step 1: rollout 1003-1008, waits for the trainer (busy with a)
  1008-1010, training 1010-1013, publish 1013-1014 (reward 0.5, v1); step 2: rollout 1014-1016,
  training 1016-1018, publish 1018-1019 (reward 0.75, v2); fails at 1020.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

OLD_RUN = [
    {"ts": 400.0, "level": "info", "event": "runtime.started", "duration_s": 1.0},
    {"ts": 500.0, "level": "info", "event": "tenant.step", "tenant": "old", "step": 1, "adapter_version": 1,
     "duration_s": 1.0, "time/rollout": 1.0, "time/train": 0.0, "time/sync": 0.0, "reward/mean": 1.0},
]


def _step(tenant, ts, step, version, rollout, train, sync, reward):
    return {"ts": ts, "level": "info", "event": "tenant.step", "tenant": tenant, "step": step,
            "adapter_version": version, "duration_s": rollout + train + sync, "queue_depth": 0,
            "reward/mean": reward, "time/rollout": rollout, "time/train": train, "time/sync": sync,
            "train/loss": 0.1 * step, "train/sequences": 4}


def _trainer(tenant, ts, version, duration):
    return {"ts": ts, "level": "info", "event": "trainer.step", "actor": "trainer", "tenant": tenant,
            "version": version, "step": version, "duration_s": duration, "queue_depth": 0, "loss": 0.1}


def _published(tenant, ts, version, duration):
    return {"ts": ts, "level": "info", "event": "sync.published", "actor": "sync", "tenant": tenant,
            "adapter_version": version, "duration_s": duration, "size_bytes": 1000}


def _eval(tenant, ts, step, accuracy, duration):
    return {"ts": ts, "level": "info", "event": "tenant.eval", "tenant": tenant, "step": step,
            "adapter_version": 0, "accuracy": accuracy, "problems": 4, "duration_s": duration}


def _sample(tenant, ts, duration, n=1):
    return {"ts": ts, "level": "info", "event": "sampler.sample_done", "actor": "sampler", "tenant": tenant,
            "adapter_version": 0, "n": n, "prompt_tokens": 10, "completion_tokens": 5, "duration_s": duration}


RUN = [
    {"ts": 995.0, "level": "info", "event": "sampler.engine_started", "actor": "sampler", "duration_s": 5.0},
    {"ts": 1000.0, "level": "info", "event": "runtime.started", "duration_s": 10.0, "run_dir": "x"},
    _published("a", 1000.9, 0, 0.1),  # the sync actor publishes one at a time
    _published("b", 1001.0, 0, 0.1),
    {"ts": 1001.0, "level": "info", "event": "tenant.started", "tenant": "a", "actor": "tenant:a", "steps": 2},
    {"ts": 1001.0, "level": "info", "event": "tenant.started", "tenant": "b", "actor": "tenant:b", "steps": 2},
    _eval("a", 1003.0, 0, 0.25, 2.0),
    _eval("b", 1003.0, 0, 0.5, 2.0),
    _sample("a", 1007.0, 4.0, n=2),
    _sample("b", 1008.0, 5.0, n=2),
    _trainer("a", 1010.0, 1, 3.0),
    _published("a", 1011.0, 1, 0.5),
    _step("a", 1011.0, 1, 1, rollout=4.0, train=3.0, sync=1.0, reward=0.25),
    _trainer("b", 1013.0, 1, 3.0),
    _published("b", 1014.0, 1, 0.5),
    _step("b", 1014.0, 1, 1, rollout=5.0, train=5.0, sync=1.0, reward=0.5),
    {"ts": 1015.0, "level": "info", "event": "tenant.step_skipped", "tenant": "a", "step": 2, "adapter_version": 1,
     "reward/mean": 0.0},
    _eval("a", 1016.0, 2, 0.5, 1.0),
    {"ts": 1016.0, "level": "info", "event": "tenant.finished", "tenant": "a", "accuracy_start": 0.25,
     "accuracy_end": 0.5, "steps": 2, "duration_s": 15.0, "adapter_version": 1},
    _trainer("b", 1018.0, 2, 2.0),
    _published("b", 1019.0, 2, 0.5),
    _step("b", 1019.0, 2, 2, rollout=2.0, train=2.0, sync=1.0, reward=0.75),
    {"ts": 1020.0, "level": "warning", "event": "tenant.failed", "tenant": "b", "error": "EnvError: boom"},
]

# Hand-counted spans of RUN: a 6 (eval, rollout, training, publishing, skipped rollout, eval),
# b 8 (eval; rollout, waiting, training, publishing; rollout, training, publishing),
# trainer 3, sync 5.
EXPECTED_SPANS = {"a": 6, "b": 8, "trainer": 3, "sync": 5}


def write_run(run_dir: Path, events=None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = b"".join(msgspec.json.encode(e) + b"\n" for e in (events if events is not None else OLD_RUN + RUN))
    (run_dir / "events.jsonl").write_bytes(lines)
    return run_dir
