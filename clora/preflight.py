"""Everything about a run that can be checked before the engine starts, in one place.

``clora run --check``, ``clora run`` (before it writes anything) and ``Runtime`` (before it creates
the run folder or starts vLLM) call these, so a bad base model, env file or LoRA target fails in
seconds with one ``ConfigError`` naming the field, instead of after the engine start:

- the base model: a folder that exists and is complete; "smollm2" needs its wheel, "tiny" nothing
  (both are built on first use); ``model.max_model_len`` fits the model's positions;
- the cluster, when ``cluster`` is set: Ray is installed (the addresses and placements are checked by the
  config itself; whether the cluster can place them, when the runtime joins it);
- each experiment: its env builds (a gsm8k file exists and parses), every LoRA target module is a
  linear layer of the base model that vLLM can serve, and the rank fits those layers.

Nothing is built or written: the LoRA targets are matched on the model's skeleton on torch's
"meta" device (no weights), with the trainer's own rule (clora.trainer.attach).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from clora.config import ExperimentConfig, ModelConfig, RuntimeConfig, check_fits_model
from clora.errors import AdapterMismatchError, ConfigError

__all__ = ["check_run", "check_experiment", "check_model_source", "check_cluster"]


def check_model_source(model: ModelConfig) -> Path | None:
    """The base model's folder when it exists already (checked complete), else None for a packaged
    model that clora builds on first use ("smollm2" with its wheel installed, "tiny")."""
    from clora.models import check_model_dir, cached_model_dir, find_smollm2_gguf
    from clora.sampler.adapter_files import check_model_len

    cached = cached_model_dir(model)
    if cached is not None and not cached.is_dir():
        if model.source == "smollm2":
            find_smollm2_gguf()  # ModelNotFoundError naming the wheel to install
        return None
    folder = check_model_dir(cached) if cached is not None else check_model_dir(Path(model.source).expanduser())
    check_model_len(folder, model.max_model_len)
    return folder


def check_run(config: RuntimeConfig, model_dir: Path | None = None) -> Path | None:
    """Check the base model and every experiment of ``config``; return the model folder when it exists.

    ``model_dir``: the resolved model folder, when the caller has it already (the Runtime)."""
    if model_dir is None:
        model_dir = check_model_source(config.model)
    else:
        from clora.sampler.adapter_files import check_model_len

        check_model_len(model_dir, config.model.max_model_len)
    check_cluster(config)
    for experiment in config.experiments:
        check_experiment(experiment, config, model_dir=model_dir)
    return model_dir


def check_cluster(config: RuntimeConfig) -> None:
    """A ``cluster`` needs its backend installed (one ConfigError naming the extra to install)."""
    if config.cluster is None:
        return
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ConfigError("cluster.backend: 'ray' needs Ray, which is not installed: pip install 'clora[cluster]' "
                          "(ray==2.60.0), or remove the [cluster] table to run in one process")


def check_experiment(
    experiment: ExperimentConfig, config: RuntimeConfig, *, model_dir: Path | None, env: bool = True
) -> None:
    """One experiment against the runtime it will run on: LoRA targets and rank, max_tokens, and its
    built-in env unless ``env`` is False (the caller brings its own)."""
    where = f"experiments.{experiment.name}"
    check_fits_model(experiment, config.model)
    if experiment.lora.rank > config.engine.max_lora_rank:
        raise AdapterMismatchError(
            f"{where}.lora.rank: {experiment.lora.rank} exceeds engine.max_lora_rank {config.engine.max_lora_rank}"
        )
    if env:
        _check_env(experiment, where)
    _check_targets(experiment, where, model_dir, config.model.source)


def _check_env(experiment: ExperimentConfig, where: str) -> None:
    from clora.envs import make_env

    try:
        make_env(experiment.env)
    except ConfigError as e:
        message = str(e)
        raise type(e)(f"{where}.{message}" if message.startswith("env.") else f"{where}.env: {message}") from None


def _check_targets(experiment: ExperimentConfig, where: str, model_dir: Path | None, source: str) -> None:
    from clora.sampler.adapter_files import LLAMA_LORA_MODULES
    from clora.trainer.attach import check_lora_fits

    lora = experiment.lora
    unservable = sorted(t for t in lora.target_modules if t.rsplit(".", 1)[-1] not in LLAMA_LORA_MODULES)
    try:
        check_lora_fits(_skeleton(str(model_dir) if model_dir is not None else None, source), lora)
    except AdapterMismatchError as e:
        raise AdapterMismatchError(f"{where}.lora.target_modules: {e}") from None
    if unservable:
        raise AdapterMismatchError(
            f"{where}.lora.target_modules: vLLM cannot serve a LoRA on {', '.join(unservable)} "
            f"(it can on {', '.join(sorted(LLAMA_LORA_MODULES))})"
        )


@functools.lru_cache(maxsize=4)
def _skeleton(model_dir: str | None, source: str) -> Any:
    """The base model's modules on torch's meta device: names and shapes, no weights, no memory.

    ``model_dir`` None: clora's own "smollm2" or "tiny" before its first build, from its known shape."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from clora.models import packaged_model_shape

    if model_dir is None:
        config = LlamaConfig(**{**packaged_model_shape(source), "num_hidden_layers": 1, "vocab_size": 32})
    else:
        try:
            config = AutoConfig.from_pretrained(model_dir)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"model.source: cannot read the model config in {model_dir!r}: {e}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
