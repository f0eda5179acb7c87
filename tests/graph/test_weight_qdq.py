import ml_dtypes
import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch

from qcompile.export.artifact import MODEL_FILE, write_artifact
from qcompile.export.onnx_builder import build_graph
from qcompile.graph import weight_qdq
from qcompile.models import load
from qcompile.passes import canonicalize, rtn
from qcompile.runtime.ort import OrtCausalLM

SPECS = [  # (bits, symmetric, group_size)
    (4, False, 16),
    (4, True, 32),
    (3, False, 16),
    (3, True, 16),
    (8, False, 16),
    (8, True, None),
    (4, False, None),
]


def quantized_export(folder, out_dir, **rtn_kwargs):
    h = load(folder)
    canonicalize.apply(h, canonicalize.CanonicalizeConfig())
    rtn.apply(h, rtn.RTNConfig(**rtn_kwargs))
    graph = build_graph(h)
    stats = weight_qdq.apply(graph, h.quant_state)
    write_artifact(h, graph, out_dir, {})
    return h, out_dir, stats


@torch.no_grad()
@pytest.mark.parametrize("bits,symmetric,group_size", SPECS)
def test_graph_computes_the_fake_quant_model(tiny_model_dir, tmp_path, bits, symmetric, group_size):
    h, out, stats = quantized_export(tiny_model_dir, tmp_path, bits=bits, symmetric=symmetric, group_size=group_size)
    assert stats["dequantize_linear_nodes"] == len(h.quant_state) == 14
    runner = OrtCausalLM.from_dir(out, accuracy_level=1)  # fp32 compute in the fused MatMulNBits
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    ref = h.model(ids).logits.numpy()
    assert np.abs(runner.logits(ids.numpy()) - ref).max() < 1e-4
    prompt = [1, 40, 41, 42, 43, 44]
    expected = h.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 6, dtype=torch.long),
                                do_sample=False, max_new_tokens=8)[0, 6:].tolist()
    assert runner.generate(prompt, 8, eos_token_id=2) == expected


@pytest.mark.parametrize("bits,symmetric,group_size", SPECS)
def test_initializers_hold_the_exact_integers(tiny_model_dirs, tmp_path, bits, symmetric, group_size):
    h, out, _ = quantized_export(tiny_model_dirs["qwen2"], tmp_path, bits=bits, symmetric=symmetric,
                                 group_size=group_size)
    m = onnx.load(str(out / MODEL_FILE))
    inits = {t.name: t for t in m.graph.initializer}
    types = {(True, True): onnx.TensorProto.INT4, (True, False): onnx.TensorProto.UINT4,
             (False, True): onnx.TensorProto.INT8, (False, False): onnx.TensorProto.UINT8}
    expected_type = types[(bits <= 4, symmetric)]
    dqs = {n.output[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear"}
    for name, qw in h.quant_state.items():
        assert f"{name}.weight" not in inits
        q = inits[f"{name}.weight_q"]
        assert q.data_type == expected_type
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(q).astype(np.int16), qw.qweight.numpy().T)
        scale = onnx.numpy_helper.to_array(inits[f"{name}.weight_scale"])
        np.testing.assert_array_equal(scale, qw.scale.numpy().T.reshape(scale.shape))
        if symmetric:
            assert f"{name}.weight_zero" not in inits
        else:
            zero = inits[f"{name}.weight_zero"]
            assert zero.data_type == expected_type
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(zero).astype(np.float32),
                                          qw.zero.numpy().T.reshape(scale.shape))
        dq = dqs[f"{name}.weight_dq"]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        if group_size is None:
            assert attrs == {"axis": 1} and scale.shape == (qw.qweight.shape[0],)
        else:
            assert attrs == {"axis": 0, "block_size": group_size}
            assert scale.shape == (qw.qweight.shape[1] // group_size, qw.qweight.shape[0])
        assert len(dq.input) == (2 if symmetric else 3)


@torch.no_grad()
def test_quantized_untied_lm_head(tmp_path):
    from tiny_models import make_tiny_model

    folder = make_tiny_model("llama", tmp_path / "tied", tie_word_embeddings=True)
    h, out, stats = quantized_export(folder, tmp_path / "out", bits=4, group_size=16, quantize_lm_head=True,
                                     lm_head_bits=8)
    assert "lm_head" in h.quant_state and stats["weights_by_type"] == {"uint4": 14, "uint8": 1}
    names = {t.name for t in onnx.load(str(out / MODEL_FILE), load_external_data=False).graph.initializer}
    assert {"lm_head.weight_q", "lm_head.weight_scale", "model.embed_tokens.weight"} <= names
    assert "lm_head.weight" not in names
    ids = np.array([[1, 5, 9, 200, 17, 3]])
    ref = h.model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(OrtCausalLM.from_dir(out, accuracy_level=1).logits(ids) - ref).max() < 1e-4


def test_two_bit_weights_use_the_four_bit_container(tiny_model_dirs, tmp_path):
    h, out, stats = quantized_export(tiny_model_dirs["llama"], tmp_path, bits=2, symmetric=True, group_size=16)
    assert stats["weights_by_type"] == {"int4": 14}
    q = onnx.numpy_helper.to_array(next(t for t in onnx.load(str(out / MODEL_FILE)).graph.initializer
                                        if t.name.endswith("q_proj.weight_q")))
    assert q.dtype == ml_dtypes.int4 and q.astype(int).min() >= -2 and q.astype(int).max() <= 1


def test_quant_state_without_initializer_is_a_clear_error(tiny_model_dirs):
    h = load(tiny_model_dirs["llama"])
    rtn.apply(h, rtn.RTNConfig(bits=4, group_size=16))
    graph = build_graph(h)
    state = dict(h.quant_state)
    state["model.layers.9.mlp.up_proj"] = state["model.layers.0.mlp.up_proj"]
    with pytest.raises(ValueError, match=r"no float initializer in the graph: model\.layers\.9\.mlp\.up_proj"):
        weight_qdq.apply(graph, state)
    assert "model.layers.0.mlp.up_proj.weight" in graph.graph.initializers  # nothing rewritten


def test_shape_mismatch_is_a_clear_error(tiny_model_dirs):
    h = load(tiny_model_dirs["llama"])
    rtn.apply(h, rtn.RTNConfig(bits=4, group_size=16))
    state = dict(h.quant_state)
    state["model.layers.1.mlp.up_proj"] = state["model.layers.1.mlp.down_proj"]
    graph = build_graph(h)
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj: graph weight .* has shape"):
        weight_qdq.apply(graph, state)
    assert not any(n.op_type == "DequantizeLinear" for n in graph.graph)  # checked before any rewrite
