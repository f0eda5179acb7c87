import json

import numpy as np
import pytest
import torch

from qcompile.export.artifact import MODEL_FILE
from qcompile.runtime.ort import OrtCausalLM, create_session, matmul_op_counts
from tiny_models import export_tiny as export


@pytest.fixture(scope="module")
def int4_dir(tiny_model_dirs, tmp_path_factory):
    return export(tiny_model_dirs["llama"], tmp_path_factory.mktemp("int4"), bits=4, group_size=16)


@pytest.mark.parametrize("group_size", [16, 32])
def test_int4_blocks_fuse_into_matmulnbits(tiny_model_dirs, tmp_path, group_size):
    h, out = export(tiny_model_dirs["qwen2"], tmp_path, bits=4, group_size=group_size)
    counts = matmul_op_counts(out / MODEL_FILE)
    assert counts.get("MatMulNBits") == len(h.quant_state) == 14
    assert "DequantizeLinear" not in counts
    # what stays a plain MatMul: attention (q@k^T may become FusedMatMul) and the float lm_head
    assert counts.get("MatMul", 0) + counts.get("FusedMatMul", 0) == 2 * 2 + 1


def test_int8_and_per_channel_fuse_too(tiny_model_dirs, tmp_path):
    """ORT 1.32 also fuses 8-bit blocks and per-channel DequantizeLinear (rewritten as blocks of 32)."""
    h, out = export(tiny_model_dirs["llama"], tmp_path / "int8", bits=8, group_size=16)
    assert matmul_op_counts(out / MODEL_FILE).get("MatMulNBits") == 14
    h, out = export(tiny_model_dirs["llama"], tmp_path / "pc", bits=4, group_size=None)
    assert matmul_op_counts(out / MODEL_FILE).get("MatMulNBits") == 14


def test_blocks_below_16_are_not_fused(tiny_model_dirs, tmp_path):
    _, out = export(tiny_model_dirs["llama"], tmp_path, bits=4, group_size=8)
    counts = matmul_op_counts(out / MODEL_FILE)
    assert "MatMulNBits" not in counts and counts["DequantizeLinear"] == 14


def test_fp32_graph_has_no_matmulnbits(tiny_model_dirs, tmp_path):
    _, out = export(tiny_model_dirs["llama"], tmp_path)
    counts = matmul_op_counts(out / MODEL_FILE)
    assert "MatMulNBits" not in counts and counts.get("MatMul", 0) >= 14


@torch.no_grad()
def test_accuracy_levels(int4_dir):
    h, out = int4_dir
    ids = np.array([[1, 7, 80, 90, 33, 250, 12, 5]])
    ref = h.model(torch.from_numpy(ids)).logits.numpy()
    fp32 = OrtCausalLM.from_dir(out, accuracy_level=1)
    int8 = OrtCausalLM.from_dir(out, accuracy_level=4)  # activations quantized to int8 inside MatMulNBits
    assert fp32.accuracy_level == 1 and int8.accuracy_level == 4
    assert np.abs(fp32.logits(ids) - ref).max() < 1e-4
    err = np.abs(int8.logits(ids) - ref).max()
    assert 0 < err < 0.05 * np.abs(ref).max()


def test_accuracy_level_default_comes_from_qcompile_json(tiny_model_dirs, tmp_path):
    meta = {"ort_session_options": {"session.qdq_matmulnbits_accuracy_level": "1"}}
    _, out = export(tiny_model_dirs["llama"], tmp_path, meta, bits=4, group_size=16)
    assert OrtCausalLM.from_dir(out).accuracy_level == 1
    assert OrtCausalLM.from_dir(out, accuracy_level=4).accuracy_level == 4
    (out / "qcompile.json").write_text(json.dumps({}))
    assert OrtCausalLM.from_dir(out).accuracy_level is None  # ORT's own default


def test_create_session_options(int4_dir, tmp_path):
    _, out = int4_dir
    session = create_session(out / MODEL_FILE, accuracy_level=1, intra_op_threads=1,
                              optimized_model_path=str(tmp_path / "opt.onnx"))
    assert (tmp_path / "opt.onnx").is_file()
    assert [i.name for i in session.get_inputs()][:3] == ["input_ids", "attention_mask", "position_ids"]


def test_runner_reads_geometry_from_the_graph(int4_dir):
    runner = OrtCausalLM.from_dir(int4_dir[1])
    assert (runner.num_layers, runner.num_kv_heads, runner.head_dim) == (2, 2, 16)


def test_forward_defaults_equal_explicit_inputs(int4_dir):
    runner = OrtCausalLM.from_dir(int4_dir[1], accuracy_level=1)
    ids = np.array([[1, 7, 80, 90, 33]])
    logits, past = runner.forward(ids)
    explicit, _ = runner.forward(ids, np.ones((1, 5), np.int64), np.arange(5)[None], runner.empty_past(1))
    np.testing.assert_array_equal(logits, explicit)
    step, present = runner.forward(np.array([[44]]), past=past)
    assert step.shape == (1, 1, 320) and present[0][0].shape == (1, 2, 6, 16)
    full = runner.logits(np.array([[1, 7, 80, 90, 33, 44]]))
    assert np.abs(full[:, -1] - step[:, 0]).max() < 1e-4


def test_generate_streams_and_stops_at_eos(int4_dir):
    runner = OrtCausalLM.from_dir(int4_dir[1], accuracy_level=1)
    prompt = [1, 40, 41, 42]
    streamed = []
    tokens = runner.generate(prompt, 6, on_token=streamed.append)
    assert tokens == streamed and len(tokens) == 6
    assert runner.generate(prompt, 6, eos_token_id=tokens[2]) == tokens[:3]
    assert runner.generate(prompt, 6, eos_token_id=[999, tokens[1]]) == tokens[:2]


def test_sampling_is_seeded(int4_dir):
    runner = OrtCausalLM.from_dir(int4_dir[1], accuracy_level=1)
    prompt = [1, 40, 41, 42]
    a = runner.generate(prompt, 8, do_sample=True, temperature=1.5, top_p=0.9, seed=3)
    assert a == runner.generate(prompt, 8, do_sample=True, temperature=1.5, top_p=0.9, seed=3)
    assert all(0 <= t < 320 for t in a)
    # a vanishing nucleus keeps only the most likely token: greedy
    assert runner.generate(prompt, 8, do_sample=True, top_p=1e-9, seed=0) == runner.generate(prompt, 8)
