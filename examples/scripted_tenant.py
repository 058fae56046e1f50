"""A tenant written as a plain async coroutine with clora's primitives.

The script teaches its adapter to mention "Paris" when asked about France, by policy gradient:
sample a group, reward each completion, centre the rewards, forward_backward + optim_step,
publish the new version into the running engine, and repeat. A second, untouched tenant
samples alongside to show it stays as it was.

    python examples/scripted_tenant.py --model tiny      # seconds, random tiny model
    python examples/scripted_tenant.py                   # SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse

import actors
import clora
from clora.config import EngineConfig, LoraConfig, LossConfig, ModelConfig, OptimConfig, RuntimeConfig
from clora.rl.rollout import completion_datum

PROMPT = "Which city is the capital of France? Answer in one sentence."


def reward(text: str) -> float:
    return 1.0 if "paris" in text.lower() else 0.0


async def main(args: argparse.Namespace) -> None:
    config = RuntimeConfig(
        model=ModelConfig(source=args.model, max_model_len=512),
        engine=EngineConfig(max_loras=2, max_lora_rank=8),
        run_dir=args.run_dir,
    )
    async with clora.Runtime(config, console_level="warning") as rt:
        learner = await rt.tenant("learner", lora=LoraConfig(rank=8), optim=OptimConfig(lr=args.lr))
        bystander = await rt.tenant("bystander", lora=LoraConfig(rank=8, init_seed=1))
        for step in range(1, args.steps + 1):
            group = await learner.sample(PROMPT, n=args.group, max_tokens=24, temperature=1.0)
            rewards = [reward(c.text) for c in group.completions]
            mean = sum(rewards) / len(rewards)
            data = [
                completion_datum(group.prompt_token_ids, c, advantage=r - mean)
                for c, r in zip(group.completions, rewards)
                if r != mean
            ]
            if data:
                await learner.forward_backward(data, LossConfig(kind="importance_sampling"))
                await learner.optim_step()
                await learner.publish()
            print(f"step {step}: reward {mean:.2f} (sampled with v{group.adapter_version}, serving v{learner.version})")
        other = await bystander.sample(PROMPT, n=1, max_tokens=24, temperature=0.0)
        print(f"bystander still at v{other.adapter_version}: {other.completions[0].text!r}")
        saved = await learner.save(f"{args.run_dir}/learner-adapter")
        print(f"learner adapter (PEFT format) saved to {saved}")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--run-dir", default="runs/scripted")
    args = parser.parse_args()
    actors.run(lambda: main(args))


if __name__ == "__main__":
    cli()
