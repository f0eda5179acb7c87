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


def _int8_cache_graph(path):
    """A minimal decoder-with-past graph in the shape onnxsim's int8 KV-cache pass leaves: int8 key/value caches
    and a third per-layer stream ``value_scale`` (float, one value per token). Each token writes its id (as int8,
    twice along head_dim) into key and value and its id as a float into value_scale; the logits [b, s, 1] are
    the sums over the whole caches, so they show which past the runner fed back."""
    from onnx import TensorProto, helper

    i8, f32 = TensorProto.INT8, TensorProto.FLOAT
    past = {n: helper.make_tensor_value_info(f"past_key_values.0.{n}", t, ["b", 1, "p", w])
            for n, t, w in (("key", i8, 2), ("value", i8, 2), ("value_scale", f32, 1))}
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["x"], to=f32),
        helper.make_node("Unsqueeze", ["x", "axes13"], ["x4"]),  # [b, 1, s, 1]
        helper.make_node("Concat", ["x4", "x4"], ["x42"], axis=3),
        helper.make_node("Cast", ["x42"], ["new_q"], to=i8),
        helper.make_node("Concat", ["past_key_values.0.key", "new_q"], ["present.0.key"], axis=2),
        helper.make_node("Concat", ["past_key_values.0.value", "new_q"], ["present.0.value"], axis=2),
        helper.make_node("Concat", ["past_key_values.0.value_scale", "x4"], ["present.0.value_scale"], axis=2),
        helper.make_node("Cast", ["present.0.key"], ["kf"], to=f32),
        helper.make_node("ReduceSum", ["kf"], ["ksum"], keepdims=0),
        helper.make_node("ReduceSum", ["present.0.value_scale"], ["ssum"], keepdims=0),
        helper.make_node("Add", ["ksum", "ssum"], ["total"]),
        helper.make_node("Mul", ["x", "zero"], ["zeros"]),  # [b, s]
        helper.make_node("Add", ["zeros", "total"], ["flat"]),
        helper.make_node("Unsqueeze", ["flat", "axes2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "int8_cache",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"]), *past.values()],
        [helper.make_tensor_value_info("logits", f32, ["b", "s", 1]),
         helper.make_tensor_value_info("present.0.key", i8, ["b", 1, "t", 2]),
         helper.make_tensor_value_info("present.0.value", i8, ["b", 1, "t", 2]),
         helper.make_tensor_value_info("present.0.value_scale", f32, ["b", 1, "t", 1])],
        [helper.make_tensor("axes13", TensorProto.INT64, [2], [1, 3]),
         helper.make_tensor("axes2", TensorProto.INT64, [1], [2]),
         helper.make_tensor("zero", f32, [], [0.0])])
    import onnx

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))


def test_extra_cache_streams_and_int8_caches(tmp_path):
    """Graphs from other tools (onnxsim's int8 KV-cache pass) declare int8 caches and further per-layer streams
    (``past_key_values.N.value_scale`` -> ``present.N.value_scale``): the runner finds them, starts them empty in
    the graph's dtypes and feeds every present back as the next past."""
    _int8_cache_graph(tmp_path / "m.onnx")
    runner = OrtCausalLM(create_session(tmp_path / "m.onnx"))
    assert runner.extra_streams == ["value_scale"] and runner.stream_types["key"] == np.int8
    assert (runner.num_kv_heads, runner.head_dim) == (1, 2)
    empty = runner.empty_past(1)[0]
    assert [a.dtype for a in empty] == [np.int8, np.int8, np.float32] and [a.shape[2] for a in empty] == [0, 0, 0]
    logits, past = runner.forward(np.array([[3, 5]]))
    assert [a.shape[2] for a in past[0]] == [2, 2, 2] and past[0][0].dtype == np.int8
    assert logits[0, -1, 0] == 2 * (3 + 5) + (3 + 5)
    logits, past = runner.forward(np.array([[7]]), past=past)
    assert [a.shape[2] for a in past[0]] == [3, 3, 3]
    assert logits[0, -1, 0] == 3 * (3 + 5 + 7)
    assert runner.generate([1, 2], 3) == [0, 0, 0]  # a vocabulary of one; the cached steps run
