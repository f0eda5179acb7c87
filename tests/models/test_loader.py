import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qcompile.errors import QCompileError, UnsupportedModelError
from qcompile.models import SUPPORTED_ARCHITECTURES, load


def test_loads_every_family_with_its_adapter(tiny_model_dirs):
    for family, path in tiny_model_dirs.items():
        h = load(path)
        assert h.adapter.family == family
        assert len(h.adapter.layers(h.model)) == 2
        assert len(h.linears()) == 14
        assert h.source_sha256 and len(h.source_sha256) == 64
        assert all(not p.requires_grad for p in h.model.parameters())


def test_qwen3_adapter_names_qk_norms(tiny_model_dirs):
    h = load(tiny_model_dirs["qwen3"])
    layer = h.adapter.layers(h.model)[0]
    assert h.adapter.qk_norms(layer) is not None
    assert load(tiny_model_dirs["llama"]).adapter.qk_norms(layer) is None


def test_missing_path():
    with pytest.raises(QCompileError, match="does not exist"):
        load("/nonexistent/model")


def test_folder_without_config(tmp_path):
    with pytest.raises(QCompileError, match="no config.json"):
        load(tmp_path)


def test_unsupported_architecture_names_supported_ones(tmp_path, tiny_model_dirs):
    folder = tmp_path / "gpt2ish"
    shutil.copytree(tiny_model_dirs["llama"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        load(folder)
    assert "GPT2LMHeadModel" in str(e.value)
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(e.value)


def test_corrupt_safetensors(tmp_path, tiny_model_dirs):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dirs["llama"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1000])  # truncated download
    with pytest.raises(QCompileError, match="cannot load the safetensors weights"):
        load(folder)


def test_nan_weights_are_rejected_by_name(tmp_path, tiny_model_dirs):
    folder = tmp_path / "nan"
    shutil.copytree(tiny_model_dirs["llama"], folder)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QCompileError, match=r"model\.layers\.1\.mlp\.down_proj\.weight has 1 NaN"):
        load(folder)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(QCompileError, match="not a GGUF file"):
        load(bad)


def test_truncated_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(200))
    with pytest.raises(QCompileError, match="cannot read GGUF file"):
        load(bad)


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.pt"
    torch.save({}, f)
    with pytest.raises(QCompileError, match="not a .gguf model"):
        load(f)


def test_missing_tensor_is_refused_not_filled_with_random_values(tmp_path, tiny_model_dirs):
    """transformers initialises a tensor the checkpoint lacks at random and only warns: the loader refuses."""
    folder = tmp_path / "missing"
    shutil.copytree(tiny_model_dirs["llama"], folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QCompileError, match=r"lack 1 tensor\(s\).*model\.layers\.1\.mlp\.down_proj\.weight"):
        load(folder)


def test_model_type_that_contradicts_architectures_is_refused(tmp_path, tiny_model_dirs):
    """transformers builds the class model_type names; the adapter follows architectures: they must agree."""
    folder = tmp_path / "bertish"
    shutil.copytree(tiny_model_dirs["llama"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QCompileError, match="inconsistent: model_type 'bert' builds BertLMHeadModel, but "
                                            "architectures names LlamaForCausalLM"):
        load(folder)
