"""Nothing loads pickle: safetensors, JSON and msgspec only.

A scan of every source file of clora/ and actors/ (by syntax tree, so comments and strings do not
count) fails on an import of a pickle-based module, a ``torch.load`` without
``weights_only=True``, an ``np.load`` with ``allow_pickle=True``, a pandas ``read_pickle``, and a
model ``from_pretrained`` that may fall back to ``pytorch_model.bin`` (no ``use_safetensors=True``,
no ``gguf_file``). Pickle-only adapters and model folders are refused with a clear error.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from clora.sampler.engine import check_adapter
from clora.errors import AdapterMismatchError, ModelNotFoundError
from clora.models import check_model_dir

ROOT = Path(__file__).resolve().parents[1]
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "pickletools"}


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def pickle_uses(source: str, filename: str = "<source>") -> list[str]:
    """Every place in ``source`` that could load pickle, as 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name.endswith("torch.load") and not _keyword_is(node, "weights_only", True):
                found.append(f"{where}: {name}() without weights_only=True")
            elif name in ("np.load", "numpy.load") and not _keyword_is(node, "allow_pickle", False) \
                    and any(k.arg == "allow_pickle" for k in node.keywords):
                found.append(f"{where}: {name}(allow_pickle=...)")
            elif name.endswith(("read_pickle", "Unpickler")):
                found.append(f"{where}: {name}()")
            elif name.endswith(".from_pretrained") and "Model" in name.rsplit(".", 1)[0] \
                    and not _keyword_is(node, "use_safetensors", True) and not any(
                        k.arg == "gguf_file" for k in node.keywords):
                found.append(f"{where}: {name}() without use_safetensors=True (may read pytorch_model.bin)")
    return found


def test_the_scanner_finds_each_kind_of_pickle_load():
    bad = """
import pickle
import dill as d
from joblib import load
torch.load(path)
torch.load(path, weights_only=False)
np.load(f, allow_pickle=True)
pd.read_pickle(f)
AutoModelForCausalLM.from_pretrained(d)
"""
    good = """
torch.load(path, weights_only=True)
np.load(f)
np.load(f, allow_pickle=False)
AutoModelForCausalLM.from_pretrained(d, use_safetensors=True)
AutoModelForCausalLM.from_pretrained(d, gguf_file="m.gguf")
AutoTokenizer.from_pretrained(d)
x = "import pickle; torch.load(p)"  # strings and comments: torch.load(p)
"""
    assert len(pickle_uses(bad)) == 8
    assert pickle_uses(good) == []


def test_no_source_in_clora_or_actors_loads_pickle():
    files = sorted((ROOT / "clora").rglob("*.py")) + sorted((ROOT / "actors").rglob("*.py"))
    assert len(files) > 40, "the scan must see the sources"
    found = [hit for f in files for hit in pickle_uses(f.read_text(), str(f.relative_to(ROOT)))]
    assert found == []


def test_a_pickle_only_adapter_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"]}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(AdapterMismatchError, match="no adapter_model.safetensors \\(adapter_model.bin is pickle"):
        check_adapter(tmp_path, max_rank=16)


def test_a_pickle_only_model_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelNotFoundError, match="no weights as model.safetensors \\(pytorch_model.bin is pickle"):
        check_model_dir(tmp_path)
