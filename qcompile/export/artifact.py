"""The exported folder: what ``optimum.onnxruntime.ORTModelForCausalLM.from_pretrained`` and
``qcompile.runtime.ort`` read.

* ``model.onnx`` + ``model.onnx_data`` (every initializer in that one file): the names Optimum looks for first;
* ``config.json`` (``use_cache: true``: Optimum feeds empty past tensors on the first step, sized from
  ``num_key_value_heads`` and ``hidden_size // num_attention_heads``) and ``generation_config.json``;
* the tokenizer files, chat template included;
* ``qcompile.json``: how the folder was made and the ORT session options it wants.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import onnx_ir as ir

from qcompile.models.handle import ModelHandle

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
META_FILE = "qcompile.json"


def save_graph(model: ir.Model, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/model.onnx`` with all initializers in ``out_dir/model.onnx_data``; returns the .onnx path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / MODEL_FILE
    ir.save(model, path, external_data=DATA_FILE, size_threshold_bytes=0)
    return path


def write_artifact(handle: ModelHandle, model: ir.Model, out_dir: str | os.PathLike, qcompile_meta: dict) -> dict:
    """Save graph, configs, tokenizer and ``qcompile.json`` into ``out_dir`` (fresh, empty); returns file sizes."""
    out = Path(out_dir)
    save_graph(model, out)
    config = copy.deepcopy(handle.model.config)
    config.use_cache = True
    config.save_pretrained(out)
    generation_config = getattr(handle.model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out)
    handle.tokenizer.save_pretrained(out)
    (out / META_FILE).write_text(json.dumps(qcompile_meta, indent=2, default=str))
    return {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
