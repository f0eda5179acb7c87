"""export.fuse_projections: q|k|v and gate|up as one MatMul each compute what the unfused graph and torch do."""

import numpy as np
import pytest
import torch

from qcompile import passes
from qcompile.errors import RecipeError
from qcompile.eval.parity import greedy_parity
from qcompile.export.onnx_builder import build_graph
from qcompile.graph import fuse_projections, weight_qdq
from qcompile.models import load
from qcompile.pipeline import export, run_passes
from qcompile.recipe import PassStep, Recipe
from qcompile.runtime.ort import OrtCausalLM, matmul_op_counts
from tiny_models import FAMILIES

W4 = [("canonicalize", {}), ("rtn", dict(bits=4, group_size=16, symmetric=False))]
ROTATED_W4A4KV4 = [("canonicalize", {}), ("rotate", {}), ("rtn", dict(bits=4, group_size=16)),
                   ("act_quant", dict(bits=4, symmetric=False)), ("kv_quant", dict(bits=4, prefix=3))]


def _recipe(steps, attention="standard", fuse=True) -> Recipe:
    r = Recipe("test", [PassStep(name, passes.get(name).Config(**kw)) for name, kw in steps])
    r.export.attention, r.export.fuse_projections = attention, fuse
    return r


def _export(folder, out, steps, attention, fuse):
    h = load(folder)
    recipe = _recipe(steps, attention, fuse)
    run_passes(h, recipe)
    return h, export(h, out, recipe)


def _rel_max_diff(got, ref) -> float:
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("attention", ["standard", "gqa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_w4_graph_matches_torch_and_the_unfused_graph(tiny_model_dirs, tmp_path, family, attention):
    h, report = _export(tiny_model_dirs[family], tmp_path / "fused", W4, attention, True)
    _, _ = _export(tiny_model_dirs[family], tmp_path / "plain", W4, attention, False)
    layers = h.model.config.num_hidden_layers
    stats = report["graph_pass"]["fuse_projections"]
    assert stats["groups"] == 2 * layers and stats["matmuls_removed"] == 3 * layers
    # q|k|v go into GroupQueryAttention packed, unless q/k norms (Qwen3) sit between the projection and the op
    assert stats["gqa_reads_packed_qkv"] == (layers if attention == "gqa" and family != "qwen3" else 0)
    # one quantized MatMul for q|k|v and one for gate|up per layer: 4 MatMulNBits per layer instead of 7
    assert matmul_op_counts(tmp_path / "fused" / "model.onnx")["MatMulNBits"] == 4 * layers
    assert matmul_op_counts(tmp_path / "plain" / "model.onnx")["MatMulNBits"] == 7 * layers

    fused, plain = (OrtCausalLM.from_dir(tmp_path / k, accuracy_level=1) for k in ("fused", "plain"))
    ids = np.random.default_rng(0).integers(3, 300, (1, 16))
    with torch.no_grad():
        ref = h.model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    assert _rel_max_diff(fused.logits(ids), ref) < 1e-4
    prompt = ids[0].tolist()
    assert fused.generate(prompt, 10) == plain.generate(prompt, 10)  # through the cache, token by token


@pytest.mark.parametrize("attention", ["standard", "gqa"])
def test_fused_float_graph_loads_in_optimum_and_generates_like_torch(tiny_model_dirs, tmp_path, attention):
    """No quantization: the float weights are concatenated. Qwen2: q/k/v biases become one Add."""
    from optimum.onnxruntime import ORTModelForCausalLM

    h, _ = _export(tiny_model_dirs["qwen2"], tmp_path / "fused", [("canonicalize", {})], attention, True)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        ref = h.model(input_ids=ids, use_cache=False).logits.numpy()
    assert np.abs(OrtCausalLM.from_dir(tmp_path / "fused").logits(ids.numpy()) - ref).max() < 1e-4
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8)
    model = ORTModelForCausalLM.from_pretrained(tmp_path / "fused")
    assert model.generate(ids, **kwargs).tolist() == h.model.generate(ids, **kwargs).tolist()


@pytest.mark.parametrize("attention", ["standard", "gqa"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fusion_keeps_rotations_activation_and_kv_quantization(tiny_model_dirs, tmp_path, family, attention):
    """R3/R4, per-token activation quantizers (q/k/v share one, gate/up share one) and the KV-cache quantizers
    stay where runtime_quant put them: the fused graph computes the torch fake-quant model."""
    h, report = _export(tiny_model_dirs[family], tmp_path / "fused", ROTATED_W4A4KV4, attention, True)
    assert report["graph_pass"]["fuse_projections"]["groups"] == 2 * h.model.config.num_hidden_layers
    runner = OrtCausalLM.from_dir(tmp_path / "fused", accuracy_level=1)
    ids = np.random.default_rng(3).integers(3, 200, (1, 20))
    with torch.no_grad():
        ref = h.model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    assert _rel_max_diff(runner.logits(ids), ref) < 1e-4
    g = greedy_parity(h.model, runner, h.tokenizer, max_new_tokens=10)
    assert g["identical"] == g["prompts"]


def test_refuses_groups_with_different_inputs_or_weight_layouts(tiny_model_dirs, tmp_path):
    # activation quantization on q only: k and v read another tensor than q
    with pytest.raises(RecipeError, match="q_proj, .*k_proj, .*v_proj read different inputs"):
        _export(tiny_model_dirs["llama"], tmp_path / "a", [("canonicalize", {}), ("act_quant", dict(roles=["q"]))],
                "standard", True)
    # k_proj left float beside int4 q_proj and v_proj
    h = load(tiny_model_dirs["llama"])
    run_passes(h, _recipe(W4))
    graph = build_graph(h)
    weight_qdq.apply(graph, {n: q for n, q in h.quant_state.items() if "k_proj" not in n})
    with pytest.raises(RecipeError, match="store their weights differently"):
        fuse_projections.apply(graph, h)


def test_fused_names_round_trip():
    members = ["model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.k_proj", "model.layers.3.self_attn.v_proj"]
    assert fuse_projections.fused_name(members) == "model.layers.3.self_attn.q_proj+k_proj+v_proj"
    assert fuse_projections.member_names(fuse_projections.fused_name(members)) == members
    other = ["a.b.gate", "c.d.up"]  # members under different parents keep their full names
    assert fuse_projections.member_names(fuse_projections.fused_name(other)) == other
