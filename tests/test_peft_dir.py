"""The PEFT folder format (clora.checkpoint.peft_dir) and the LoRA shape rule (clora.checkpoint.compat),
each in one place: the trainer, the sampler and ``clora export`` read folders and name problems alike."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from clora.checkpoint.compat import LoraShapeMismatch, check_lora_shape, lora_shape_mismatch
from clora.checkpoint.peft_dir import config_target_modules, read_peft_dir, safetensors_names
from clora.config import LoraConfig
from clora.errors import AdapterMismatchError, ModelNotFoundError
from clora.observe.artifacts import ArtifactError, check_peft_dir
from clora.sampler.adapter_files import check_adapter
from clora.trainer.peft_io import read_peft

LORA = LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


def _folder(path: Path, config: object = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj"]} if config is None else config
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    header = json.dumps({"base_model.model.m.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    (path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 4)
    return path


def _pickle_only(p: Path) -> None:
    (p / "adapter_model.safetensors").unlink()
    (p / "adapter_model.bin").write_bytes(b"\x80\x04not read")


BREAKAGES = {
    "no-folder": (lambda p: p.rename(p.with_name("elsewhere")), "adapter folder '.*' does not exist"),
    "no-config": (lambda p: (p / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    "no-weights": (lambda p: (p / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
    "pickle-only": (_pickle_only, r"no adapter_model.safetensors \(adapter_model.bin is pickle; clora reads only"),
    "bad-json": (lambda p: (p / "adapter_config.json").write_text("{"), "is not valid JSON"),
    "not-an-object": (lambda p: (p / "adapter_config.json").write_text("[4]"), "holds list, not a JSON object"),
}
READERS = {  # every reader of PEFT folders, with the error its callers expect
    "sampler": (lambda p: check_adapter(p, max_rank=16), AdapterMismatchError),
    "trainer": (read_peft, ModelNotFoundError),
    "observe": (check_peft_dir, ArtifactError),
}


@pytest.mark.parametrize("breakage", BREAKAGES, ids=list(BREAKAGES))
@pytest.mark.parametrize("reader", READERS, ids=list(READERS))
def test_every_reader_names_a_broken_folder_alike_in_its_own_error(tmp_path, reader, breakage):
    read, error = READERS[reader]
    folder = _folder(tmp_path / "adapter")
    damage, message = BREAKAGES[breakage]
    damage(folder)
    with pytest.raises(error, match=message) as raised:
        read(folder)
    with pytest.raises(ValueError) as direct:
        read_peft_dir(folder, ValueError)
    assert str(raised.value) == str(direct.value)


def test_a_sound_folder_reads_its_config_and_header_names(tmp_path):
    folder = read_peft_dir(_folder(tmp_path / "a", {"r": 2, "target_modules": "q_proj"}), ValueError)
    assert folder.config["r"] == 2 and folder.weights_file == tmp_path / "a" / "adapter_model.safetensors"
    assert config_target_modules(folder.config) == ["q_proj"]  # PEFT allows one name as a string
    assert config_target_modules({}) == []
    assert safetensors_names(folder.weights_file, ValueError) == ["base_model.model.m.lora_A.weight"]
    folder.weights_file.write_bytes(b"\1\2")
    with pytest.raises(ValueError, match="not a safetensors file"):
        safetensors_names(folder.weights_file, ValueError)


def test_the_lora_shape_rule_compares_rank_then_alpha_as_floats_then_targets_as_a_set():
    assert lora_shape_mismatch(4, 8, ["v_proj", "q_proj"], LORA) is None  # 8 == 8.0, order free
    assert lora_shape_mismatch(8, 16.0, [], LORA) == LoraShapeMismatch("rank", 8, 4)
    assert lora_shape_mismatch(4, 16.0, [], LORA) == LoraShapeMismatch("alpha", 16.0, 8.0)
    assert lora_shape_mismatch(4, 8.0, ["q_proj"], LORA) == LoraShapeMismatch(
        "target modules", ["q_proj"], ["q_proj", "v_proj"]
    )
    assert lora_shape_mismatch(4, 8.0, None, LORA).field == "target modules"  # not a list of names
    with pytest.raises(AdapterMismatchError, match=r"^ck: alpha mismatch: checkpoint alpha 2.0, tenant alpha 8.0$"):
        check_lora_shape(LoraConfig(rank=4, alpha=2.0, target_modules=LORA.target_modules), LORA, "ck", "checkpoint")
    check_lora_shape(LORA, LORA, "ck", "checkpoint")
