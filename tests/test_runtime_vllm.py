"""The vertical slice on the tiny model with real vLLM: 3 tenants train concurrently.

A toy env gives a reward that depends on the sampled text, so groups have spread, advantages
are non-zero and every tenant trains. Asserts versions, isolation, and the event log.
"""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from clora.config import EnvConfig, ExperimentConfig, LoraConfig, OptimConfig, RuntimeConfig
from clora.events import read_events
from clora.testing import ToyEnv

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]


def _experiment(name: str, lr: float, seed: int) -> ExperimentConfig:
    return ExperimentConfig(
        name=name, lora=LoraConfig(rank=8, alpha=16, init_seed=seed), optim=OptimConfig(lr=lr),
        env=EnvConfig(max_turns=1), steps=3, prompts_per_step=2, group_size=4, max_tokens=12, seed=seed,
    )


async def test_three_tenants_train_concurrently_with_versions_isolation_and_events(
    tiny_engine, tiny_model_dir, tiny_engine_config, tmp_path
):
    import clora

    config = RuntimeConfig(
        model=clora.ModelConfig(source=str(tiny_model_dir), max_model_len=512),
        engine=tiny_engine_config,  # the session's engine, borrowed: 3 LoRA slots for 4 tenants
        run_dir=str(tmp_path / "run"),
    )
    good = [_experiment("alpha", 1e-2, 1), _experiment("beta", 5e-3, 2), _experiment("gamma", 2e-3, 3)]
    broken = _experiment("broken", 1e-2, 4)
    steps_seen: list[tuple[str, int, int]] = []

    async with clora.Runtime(config, engine=tiny_engine) as rt:
        import asyncio

        async def run(exp, env):
            return await rt.run(exp, env=env, on_step=lambda t, r: steps_seen.append((t, r.step, r.adapter_version)))

        outcomes = await asyncio.gather(
            *(run(e, ToyEnv(held_out=4)) for e in good),
            run(broken, ToyEnv(held_out=4, fail_after=4 + 8)),  # fails after held-out eval + step 1
            return_exceptions=True,
        )
    results = dict(zip([e.name for e in good] + ["broken"], outcomes))

    # The broken tenant failed alone, with its own error; the others finished every step.
    assert isinstance(results["broken"], Exception) and "broken on purpose" in str(results["broken"])
    for exp in good:
        result = results[exp.name]
        assert not isinstance(result, BaseException), result
        assert [s.step for s in result.steps] == [1, 2, 3]
        versions = [s.adapter_version for s in result.steps]
        trained = sum(s.trained for s in result.steps)
        assert versions == sorted(versions), "versions must be monotonic"
        assert versions[-1] == trained >= 1, "one new version per trained step"

    # Isolation: each tenant's exported adapter is its own, and none equals another's.
    exported = {e.name: load_file(str(tmp_path / "run" / "tenants" / e.name / "adapter" / "adapter_model.safetensors"))
                for e in good}
    some_key = next(k for k in exported["alpha"] if "lora_B" in k)
    assert not (exported["alpha"][some_key] == exported["beta"][some_key]).all()
    assert not (exported["beta"][some_key] == exported["gamma"][some_key]).all()

    # The event log tells the story: canonical step lines, publishes, one failure.
    log = list(read_events(tmp_path / "run"))
    step_lines = [e for e in log if e["event"] == "tenant.step"]
    assert {e["tenant"] for e in step_lines} == {e.name for e in good} | {"broken"}  # broken did step 1
    for line in step_lines:
        for key in ("step", "adapter_version", "duration_s", "queue_depth", "reward/mean", "time/rollout",
                    "time/train", "time/sync"):
            assert key in line, key
    published = [e for e in log if e["event"] == "sync.published"]
    for exp in good:
        tenant_versions = [e["adapter_version"] for e in published if e["tenant"] == exp.name]
        assert tenant_versions == sorted(set(tenant_versions)) and tenant_versions[0] == 0
    # Every rollout group was sampled with the version published before that step (on-policy).
    groups = [e for e in log if e["event"] == "tenant.rollout_group" and e["tenant"] == "alpha"]
    version_before = {r.step: r.adapter_version for r in results["alpha"].steps}
    version_before = {step: version_before.get(step - 1, 0) for step in (1, 2, 3)}
    for g in groups:
        assert g["versions"] == [version_before[g["step"]]]
    assert any(e["event"] == "tenant.failed" and e["tenant"] == "broken" for e in log)
    assert [s for t, s, _ in steps_seen if t == "broken"] == [1], "broken failed in its step 2"
