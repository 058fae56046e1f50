"""Continual learning: serve `production`, learn from late feedback, promote through a gate, roll back.

Simulated users ask arithmetic tool-use questions of one tenant's `production` version (each
conversation pinned to the version it started on). Their feedback (the env's reward of the
conversation) arrives one to three rounds later, out of order. The learner trains a `candidate`
from it in the background; every few rounds the candidate is scored against production on the env's
held-out problems and promoted only if it is better. Halfway through, an operator promotes a
deliberately bad version without the gate; the served accuracy drops and the monitor rolls
production back (and sets the learner back to it). Prints served accuracy per round and writes
continual.png into the run folder.

    python examples/continual.py                       # SmolLM2 on vLLM: real learning
    python examples/continual.py --simulate --model tiny

``--simulate`` uses clora.testing.FakeEngine instead of vLLM: each version answers correctly with a
probability the script sets (better after each learner step, never right for the bad version), so it
shows the mechanics (versions, feedback, gate, rollback; the trainer's steps are real) in seconds,
not learning.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from dataclasses import dataclass, field
from pathlib import Path

import clora
from clora.config import EngineConfig, EnvConfig, LossConfig, ModelConfig, OptimConfig, RuntimeConfig
from clora.envs import make_env
from clora.messages import Completion, SamplingSpec
from clora.rl.rollout import run_episode, start_episode


SERVE_TEMPERATURE = 0.7  # the users' conversations; the gate scores versions the same way
BAD_STEPS, BAD_LR = 4, 2e-2  # the operator's mistake (_bad_version)


@dataclass
class Round:
    round: int
    production: int
    accuracy: float
    event: str = ""


@dataclass
class Report:
    rounds: list[Round] = field(default_factory=list)
    promoted: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    rolled_back: list[tuple[int, int]] = field(default_factory=list)  # (bad version, back to)
    plot: Path | None = None


class SimulatedModel:
    """The FakeEngine's answers: a Final Answer, right with the probability ``quality[version]``."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.answers: dict[tuple[int, ...], str] = {}  # rendered prompt -> the right answer
        self.quality: dict[int, float] = {0: 0.3}

    def script(self, request) -> Completion:
        answer = self.answers.get(tuple(request.prompt_token_ids), "0")
        right = self.rng.random() < self.quality.get(request.version or 0, 0.3)
        text = f"<tool>Final Answer: {answer if right else int(float(answer)) + 1}</tool>"
        tokens = [100 + ord(c) % 50 for c in text][: request.sampling.max_tokens]
        return Completion(token_ids=tokens, logprobs=[-0.5] * len(tokens), text=text, finish_reason="stop")


async def run(rt: clora.Runtime, *, rounds: int = 12, users: int = 8, gate_every: int = 3, bad_round: int = 7,
              seed: int = 0, model: SimulatedModel | None = None, log=print) -> Report:
    """The loop on a started runtime (``model``: the simulated engine's answers, when it is one)."""
    env = make_env(EnvConfig(kind="arithmetic", difficulty=0, held_out_size=16, seed=seed))
    rng = random.Random(seed)
    policy = clora.LearnerPolicy(min_batch=users, max_age_s=30.0, loss=LossConfig(kind="ppo"), alias="candidate")
    tenant = await rt.tenant("support", optim=OptimConfig(lr=2e-3), continual=policy)
    if model is not None:
        for problem in env.held_out():
            model.answers[tuple(rt.renderer.initial(env.start(problem).initial_messages()))] = problem.answer
    report, late = Report(), []  # late: (round due, sample ids, reward)
    watch = None  # (the newest promotion, the version it replaced) while the monitor watches it

    async def conversation(problem) -> tuple[list[str], float]:
        episode = start_episode(env, problem)
        if model is not None:
            model.answers[tuple(rt.renderer.initial(episode.initial_messages()))] = problem.answer
        version, ids = tenant.continual.resolve("production"), []  # one version for the whole conversation

        async def sample(prompt: list[int], spec: SamplingSpec):
            result = await tenant.sample(prompt, max_tokens=spec.max_tokens, temperature=spec.temperature,
                                         stop=spec.stop, version=version)
            ids.extend(result.sample_ids)
            return result.completions[0], result.adapter_version

        trajectory = await run_episode(sample, rt.renderer, episode, max_turns=3, max_model_len=1024,
                                       sampling=SamplingSpec(max_tokens=48, temperature=SERVE_TEMPERATURE, stop=env.stop_sequences))
        return ids, trajectory.reward

    async def gate_score(handle, version: int) -> float:  # what users would see: sampled, 4 episodes per problem
        from clora.continual.gate import score

        return await score(env, handle, version, max_tokens=48, temperature=SERVE_TEMPERATURE, samples=4)

    for r in range(1, rounds + 1):
        serving = tenant.aliases()["production"]
        done = await asyncio.gather(*(conversation(p) for p in env.train_problems(rng, users)))
        accuracy = sum(reward for _, reward in done) / len(done)
        row = Round(r, serving, accuracy)
        late += [(r + rng.randint(1, 3), ids, reward) for ids, reward in done]
        arrived = [item for item in late if item[0] <= r]
        late = [item for item in late if item[0] > r]
        rng.shuffle(arrived)  # out of order
        if arrived:
            await tenant.feedback_many([(i, reward) for _, ids, reward in arrived for i in ids])
        await tenant.continual.wait_learned()
        if model is not None:  # the simulated model gets better with each learned version
            for info in tenant.versions():
                if info.version not in model.quality and info.parent is not None:
                    model.quality[info.version] = min(0.95, model.quality.get(info.parent, 0.3) + 0.15)
        candidate = tenant.aliases().get("candidate")
        if watch is not None and serving == watch[0]:  # the monitor: is the newest promotion serving worse?
            before = [x.accuracy for x in report.rounds if x.production == watch[1]][-3:]
            if before and accuracy < 0.5 * sum(before) / len(before):
                back = await tenant.rollback()  # the alias moves at once: the next conversation is served by it
                report.rolled_back.append((serving, back))
                learner = await tenant.checkout(back)  # and the learner continues from it, not from the bad one
                if model is not None:
                    model.quality[learner.version] = model.quality[back]
                row.event, watch = f"monitor: v{serving} served {accuracy:.0%}, rolled back to v{back}", None
        if r == bad_round:
            bad = await _bad_version(tenant, model)
            await tenant.promote(bad)  # an operator's mistake: no gate
            report.promoted.append(bad)
            row.event = f"v{bad} promoted without the gate"
            watch = (bad, tenant.continual.registry.history("production")[-1])
        elif r % gate_every == 0 and candidate is not None and candidate != tenant.aliases()["production"]:
            promotion = await tenant.promote(candidate, gate=gate_score, margin=0.0)
            (report.promoted if promotion.promoted else report.refused).append(candidate)
            row.event = (f"gate: v{candidate} {promotion.score:.2f} vs v{promotion.previous} "
                         f"{promotion.baseline:.2f} -> {'promoted' if promotion.promoted else 'refused'}")
            if promotion.promoted:
                watch = (candidate, promotion.previous)
        report.rounds.append(row)
        log(f"round {r:>2}: production v{row.production:<3} served accuracy {accuracy:5.0%}  {row.event}")
    report.plot = _plot(report, rt.run_dir / "continual.png")
    log(f"plot: {report.plot}")
    return report


async def _bad_version(tenant, model: SimulatedModel | None) -> int:
    """A deliberately bad version: a few large steps of cross-entropy on random tokens (it learns to babble).
    One small step on such data barely moved SmolLM2: the version served as well as its parent."""
    from clora.testing import make_data

    data = make_data(8, seed=99)
    for _ in range(BAD_STEPS):
        await tenant.forward_backward(data, LossConfig(kind="cross_entropy"))
        await tenant.optim_step(OptimConfig(lr=BAD_LR))
    info = await tenant.commit("bad")
    if model is not None:
        model.quality[info.version] = 0.0
    return info.version


def _plot(report: Report, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.5))
    ax = fig.add_subplot()
    xs = [r.round for r in report.rounds]
    ax.plot(xs, [r.accuracy for r in report.rounds], marker="o", label="served accuracy (production)")
    for r in report.rounds:
        ax.annotate(f"v{r.production}", (r.round, r.accuracy), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=7)
        if r.event:
            ax.axvline(r.round, color="grey", alpha=0.3, linestyle="--")
    ax.set(xlabel="round", ylabel="accuracy", ylim=(-0.05, 1.1), title="continual learning: served accuracy")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


async def main(args: argparse.Namespace) -> Report:
    config = RuntimeConfig(model=ModelConfig(source=args.model, max_model_len=1024),
                           engine=EngineConfig(max_loras=4, max_lora_rank=8), run_dir=args.run_dir)
    model = engine = None
    if args.simulate:
        from clora.testing import FakeEngine

        model = SimulatedModel(args.seed)
        engine = FakeEngine(model.script)
    async with clora.Runtime(config, console_level="warning", engine=engine) as rt:
        return await run(rt, rounds=args.rounds, users=args.users, seed=args.seed, model=model)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--simulate", action="store_true", help="FakeEngine with scripted per-version accuracy")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", default="runs/continual")
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
