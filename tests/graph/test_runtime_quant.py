"""Online rotations, activation and KV-cache quantization in the graph match the torch fake-quant model."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from qcompile import passes
from qcompile.eval.parity import greedy_parity
from qcompile.graph.quant_nodes import Emitter, fake_quantize_tokens, hadamard
from qcompile.models import load
from qcompile.pipeline import export, run_passes
from qcompile.quant.activations import TokenQuantSpec
from qcompile.quant.activations import fake_quantize_tokens as torch_fake_quantize
from qcompile.quant.hadamard import hadamard_factors, hadamard_matrix
from qcompile.recipe import PassStep, Recipe
from qcompile.runtime.ort import OrtCausalLM


def _run_subgraph(build, x: np.ndarray) -> np.ndarray:
    """Run ``build(emitter, input_value) -> output_value`` as a one-input ONNX model on ORT."""
    inp = ir.val("x", ir.DataType.FLOAT, ir.Shape(list(x.shape)))
    e = Emitter("/t")
    out = build(e, inp)
    out.name = "y"
    graph = ir.Graph([inp], [out], nodes=e.nodes, opset_imports={"": 21})
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("spec", [TokenQuantSpec(8, True), TokenQuantSpec(4, False), TokenQuantSpec(3, False, 16),
                                  TokenQuantSpec(4, True, 8, 0.85), TokenQuantSpec(2, False, 32, 0.9)])
def test_quantizer_nodes_equal_torch(spec):
    x = (torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 4, 64)).numpy()
    x[0, 0] = 0.0  # an all-zero token
    got = _run_subgraph(lambda e, v: fake_quantize_tokens(e, v, 3, 64, spec), x)
    ref = torch_fake_quantize(torch.from_numpy(x), spec).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert not np.allclose(got, x)


@pytest.mark.parametrize("n", [64, 96, 576, 1536])
@pytest.mark.parametrize("dense", [False, True])
def test_hadamard_nodes_equal_the_matrix(n, dense):
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(1))
    h = hadamard_matrix(n)
    got = _run_subgraph(lambda e, v: hadamard(e, v, 3, h, hadamard_factors(n), dense), x.numpy())
    np.testing.assert_allclose(got, (x.double() @ h).numpy(), atol=2e-5)


def _recipe(*steps) -> Recipe:
    return Recipe("test", [PassStep(name, passes.get(name).Config(**kw)) for name, kw in steps])


ROTATED_W4A4KV4 = [("canonicalize", {}), ("rotate", {}), ("rtn", dict(bits=4, group_size=16)),
                   ("act_quant", dict(bits=4, symmetric=False)), ("kv_quant", dict(bits=4, prefix=3))]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_rotated_w4a4kv4_graph_matches_torch(tiny_model_dirs, tmp_path, family):
    h = load(tiny_model_dirs[family])
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        float_logits = h.model(input_ids=ids, use_cache=False).logits.numpy()
    recipe = _recipe(*ROTATED_W4A4KV4)
    run_passes(h, recipe)
    report = export(h, tmp_path / "out", recipe)
    rq = report["graph_pass"]["runtime_quant"]
    assert rq["r4_rotations"] == 2 and rq["activation_quantizers"] == 8  # q/k/v share, gate/up share: 4 per layer
    assert rq["kv"]["r3"] and rq["kv"]["float_prefix"] == 3
    assert report["runtime_quantization"]["kv_cache"]["prefix"] == 3
    runner = OrtCausalLM.from_dir(tmp_path / "out", accuracy_level=1)
    with torch.no_grad():
        ref = h.model(input_ids=ids, use_cache=False).logits.numpy()
    got = runner.logits(ids.numpy())
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert np.abs(ref - float_logits).max() > 1e-3  # the quantizers do change the function
    g = greedy_parity(h.model, runner, h.tokenizer, max_new_tokens=12)
    assert g["identical"] == g["prompts"]  # through the KV cache, one token at a time


def test_float_prefix_keeps_the_first_positions_exact(tiny_model_dirs):
    """With a prefix P, logits at positions < P are those of the unquantized-KV model (causal attention reads
    only keys/values < P there), and positions >= P differ."""
    base = load(tiny_model_dirs["llama"])
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = base.model(input_ids=ids, use_cache=False).logits
    h = load(tiny_model_dirs["llama"])
    run_passes(h, _recipe(("kv_quant", dict(bits=2, prefix=5))))
    with torch.no_grad():
        got = h.model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got[:, :5], ref[:, :5], atol=1e-6)
    assert not torch.allclose(got[:, 5:], ref[:, 5:], atol=1e-4)


def test_dense_and_kron_hadamard_graphs_agree(tiny_model_dirs, tmp_path):
    outs = {}
    for impl in ("kron", "dense"):
        h = load(tiny_model_dirs["qwen2"])
        recipe = _recipe(("canonicalize", {}), ("rotate", {}), ("kv_quant", dict(bits=8)))
        recipe.export.online_hadamard = impl
        run_passes(h, recipe)
        export(h, tmp_path / impl, recipe)
        outs[impl] = OrtCausalLM.from_dir(tmp_path / impl).logits(np.arange(3, 20, dtype=np.int64)[None])
    np.testing.assert_allclose(outs["kron"], outs["dense"], atol=1e-5)


def test_act_quant_refuses_a_second_step_and_bad_roles(tiny_model_dirs):
    from qcompile.errors import RecipeError

    h = load(tiny_model_dirs["llama"])
    run_passes(h, _recipe(("act_quant", {})))
    with pytest.raises(RecipeError, match="already quantized"):
        run_passes(h, _recipe(("act_quant", {})))
    with pytest.raises(RecipeError, match="roles"):
        passes.get("act_quant").Config(roles=["qkv"])


def test_cli_kv_prefix_reaches_the_graph_and_run_notes_a_longer_system_turn(tiny_model_dirs, tmp_path, capsys):
    from qcompile.cli import main

    out = tmp_path / "kv"
    calib = tmp_path / "calib.txt"
    calib.write_text("The river runs past the old mill and the town square in spring. " * 40)
    rc = main(["export", str(tiny_model_dirs["llama"]), "-o", str(out), "--recipe", "w4a4kv4",
               "--calib-text", str(calib), "--set", "gptq.calib_samples=2", "--set", "gptq.calib_seq_len=64",
               "--group-size", "16", "--kv-prefix", "4"])
    assert rc == 0
    import json

    meta = json.loads((out / "qcompile.json").read_text())
    assert meta["runtime_quantization"]["kv_cache"]["prefix"] == 4
    capsys.readouterr()
    assert main(["run", str(out), "hi", "--system", "You are a helpful assistant. " * 4, "--max-new-tokens", "2"]) == 0
    assert "keeps only its first 4 positions in float" in capsys.readouterr().err
    assert main(["export", str(tiny_model_dirs["llama"]), "-o", str(tmp_path / "x"), "--recipe", "w4a16-g64-rtn",
                 "--kv-prefix", "4"]) == 2


def test_rotated_w4a4kv4_through_group_query_attention(tiny_model_dirs, tmp_path):
    """export.attention=gqa: the R3/KV-quant rewrites still land on q/k/v before ORT's GroupQueryAttention, so the
    graph computes what the standard one does (batch 1, through the cache)."""
    h = load(tiny_model_dirs["qwen3"])
    recipe = _recipe(*ROTATED_W4A4KV4)
    run_passes(h, recipe)
    export(h, tmp_path / "standard", recipe)
    recipe.export.attention = "gqa"
    report = export(h, tmp_path / "gqa", recipe)
    assert report["graph_pass"]["runtime_quant"]["kv"]["r3"]  # RoPE stayed a subgraph for R3 and the quantizers
    ids = np.random.default_rng(3).integers(3, 200, (1, 20))
    std, gqa = (OrtCausalLM.from_dir(tmp_path / k, accuracy_level=1) for k in ("standard", "gqa"))
    ref = std.logits(ids)
    assert np.abs(gqa.logits(ids) - ref).max() < 1e-5 * max(1.0, np.abs(ref).max())
    assert gqa.generate(ids[0].tolist(), 10) == std.generate(ids[0].tolist(), 10)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_online_o_rotation_graph_matches_torch(tiny_model_dirs, tmp_path, family):
    """rotate.online_o: one Hadamard across heads on every o_proj input, in torch (a hook) and in the graph."""
    h = load(tiny_model_dirs[family])
    steps = [s if s[0] != "rotate" else ("rotate", dict(online_o=True)) for s in ROTATED_W4A4KV4]
    recipe = _recipe(*steps)
    run_passes(h, recipe)
    report = export(h, tmp_path / "out", recipe)
    rq = report["graph_pass"]["runtime_quant"]
    assert rq["o_rotations"] == 2 and rq["r4_rotations"] == 2
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    runner = OrtCausalLM.from_dir(tmp_path / "out", accuracy_level=1)
    with torch.no_grad():
        ref = h.model(input_ids=ids, use_cache=False).logits.numpy()
    assert np.abs(runner.logits(ids.numpy()) - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    g = greedy_parity(h.model, runner, h.tokenizer, max_new_tokens=12)
    assert g["identical"] == g["prompts"]
