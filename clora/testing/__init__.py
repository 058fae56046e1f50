"""Fakes for testing your own envs and scripted tenants without vLLM or a GPU.

- ``FakeEngine``: replays scripted completions (tokens, log-probs, text) where the vLLM engine is
  (``Runtime(config, engine=...)``, ``SamplerActor(..., shared_engine=...)``) or, through
  ``FakeEngine.sample_fn()``, where a rollout's sample function is; records requests and adapter
  loads, and refuses loads or dies on demand.
- ``ToyEnv``: a one-turn env scored by a function of the text (``parity_reward``, ``char_sum_reward``).
- ``capture_events`` / ``Events``: the events actors and runtimes log, filtered by name, tenant, fields.
- ``until``: await a condition with a timeout.
- ``make_data`` / ``with_nonfinite`` / ``store_state`` / ``assert_same_state``: tiny training data
  and bit-exact trainer state.

Nothing here imports vLLM; torch is imported only by the helpers that handle tensors.
See docs/testing.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from clora.testing.aio import until
from clora.testing.data import assert_same_state, make_data, store_state, with_nonfinite
from clora.testing.envs import ToyEnv, ToyEpisode, char_sum_reward, parity_reward
from clora.testing.events import Events, RecordingLog, capture_events, events_by_start

__all__ = [
    "FakeEngine",
    "FakeRequest",
    "LoadedAdapter",
    "Reply",
    "Script",
    "ToyEnv",
    "ToyEpisode",
    "parity_reward",
    "char_sum_reward",
    "Events",
    "events_by_start",
    "RecordingLog",
    "capture_events",
    "until",
    "make_data",
    "with_nonfinite",
    "store_state",
    "assert_same_state",
]

# The engine fake stands on clora.sampler, which imports torch: loaded on first use.
_LAZY = dict.fromkeys(("FakeEngine", "FakeRequest", "LoadedAdapter", "Reply", "Script"), "clora.testing.engine")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clora.testing' has no attribute {name!r}")
