"""Promotion gates: score a candidate version against the one an alias points at.

A gate is either an async function ``gate(tenant, version) -> float`` (higher is better; it may
sample the version with ``tenant.sample(..., version=version)``) or an ``Env``: its held-out split,
one greedy episode per problem on the pinned version, scored as the fraction solved
(clora.rl.step.evaluate, the same evaluation experiments use); with ``temperature`` > 0 and
``samples`` episodes per problem it scores what sampled serving would get instead. ``decide`` says whether the
candidate passes: its score must exceed the baseline's by more than ``margin``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Union

import msgspec

from clora.envs.base import Env
from clora.errors import ConfigError
from clora.messages import SamplingSpec

if TYPE_CHECKING:
    from clora.tenant.handle import TenantHandle

__all__ = ["Gate", "Promotion", "gate_name", "score", "decide"]

Gate = Union[Callable[["TenantHandle", int], Awaitable[float]], Env]


class Promotion(msgspec.Struct, frozen=True, kw_only=True):
    """What ``promote`` did: ``promoted`` or refused by the gate, with the scores it compared."""

    tenant: str
    alias: str
    version: int  # the candidate
    previous: int | None  # what the alias pointed at before (None: nothing)
    promoted: bool
    gate: str | None = None  # the gate's name (None: no gate)
    score: float | None = None  # the candidate's
    baseline: float | None = None  # the previous version's (None: no previous version, or no gate)
    margin: float = 0.0


def gate_name(gate: Gate) -> str:
    if isinstance(gate, Env):
        return f"held_out:{gate.name}"
    return getattr(gate, "__name__", type(gate).__name__)


async def score(gate: Gate, tenant: TenantHandle, version: int, *, max_tokens: int = 64, max_turns: int = 3,
                temperature: float = 0.0, samples: int = 1) -> float:
    """The gate's score of ``version`` of ``tenant`` (an Env gate: ``samples`` episodes per held-out
    problem at ``temperature``, each with its own seed; the default is one greedy episode)."""
    if isinstance(gate, Env):
        if samples < 1 or temperature < 0 or (samples > 1 and temperature == 0):
            raise ConfigError(f"a held-out gate needs samples >= 1 and temperature >= 0, and more than one sample "
                              f"only when sampling (temperature > 0); got samples={samples}, temperature={temperature}")
        return await _held_out(gate, tenant, version, max_tokens=max_tokens, max_turns=max_turns,
                               temperature=temperature, samples=samples)
    if not callable(gate):
        raise ConfigError(f"gate must be an async function (tenant, version) -> float or an Env, got {gate!r}")
    value = await gate(tenant, version)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigError(f"gate {gate_name(gate)} returned {value!r} for version {version}; it must return a number")
    return float(value)


def decide(candidate: float, baseline: float | None, margin: float) -> bool:
    """The candidate passes when there is no baseline or it beats the baseline by more than ``margin``."""
    return baseline is None or candidate > baseline + margin


async def _held_out(env: Env, tenant: TenantHandle, version: int, *, max_tokens: int, max_turns: int,
                    temperature: float, samples: int) -> float:
    from clora.rl.step import EpisodeSettings, evaluate

    problems = list(env.held_out()) * samples  # episode i gets seed derive(0, i): the copies sample apart, and
    # the candidate and the baseline are scored on the same seeds (a paired comparison)
    if not problems:
        raise ConfigError(f"env {env.name!r} has no held-out problems to gate a promotion on")

    async def sample(prompt: list[int], spec: SamplingSpec) -> Any:
        result = await tenant.sample(prompt, n=1, max_tokens=spec.max_tokens, temperature=spec.temperature,
                                     seed=spec.seed, stop=spec.stop, version=version, record=False)
        return result.completions[0], result.adapter_version

    sampling = SamplingSpec(max_tokens=max_tokens, temperature=temperature, seed=0)
    settings = EpisodeSettings(max_turns=max_turns, sampling=sampling,
                               max_model_len=tenant.runtime.config.model.max_model_len)
    result = await evaluate(sample, tenant.runtime.renderer, env, problems, settings)
    return result.correct / result.total
