"""Every built-in recipe, end to end through the pipeline: the exported graph on ONNX Runtime computes what the
torch fake-quant model computes (logits within a stated bound, identical greedy tokens)."""

from collections import Counter

import pytest
import torch

from qcompile.eval.parity import greedy_parity, logit_parity
from qcompile.pipeline import compile_model
from qcompile.recipe import apply_overrides, builtin_recipes, load_recipe
from qcompile.runtime.ort import OrtCausalLM, matmul_op_counts

# |Δlogit| bound at MatMulNBits accuracy level 1 (fp32 compute); float32 rounding differences only
LOGIT_BOUND = 1e-3


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    f.write_text(("Calibration text about rivers, cities and the weather in spring. " * 30 + "\n") * 20)
    return f


@pytest.mark.parametrize("recipe_name", sorted(builtin_recipes()))
def test_builtin_recipe_parity_on_tiny_model(recipe_name, tiny_model_dirs, calib_file, tmp_path):
    recipe = apply_overrides(load_recipe(recipe_name), ["export.accuracy_level=1"], group_size=...,
                             calib_text=str(calib_file), calib_samples=4)
    if recipe.weight_quantizers():  # tiny models have 64/128-wide layers: groups of 16
        recipe = apply_overrides(recipe, [], group_size=16 if recipe.weight_quantizers()[0].config.group_size else None)
    for s in recipe.passes:
        if hasattr(s.config, "calib_seq_len"):
            s.config.calib_seq_len = 64
    result = compile_model(tiny_model_dirs["qwen2"], tmp_path / "out", recipe)
    runner = OrtCausalLM.from_dir(result.out_dir)
    assert runner.accuracy_level == 1
    ids = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    lp = logit_parity(result.handle.model, runner, ids)
    if result.handle.act_quant or result.handle.kv_quant is not None:
        # run-time quantizers: an activation within float rounding of a grid boundary can land one step apart in
        # torch and ORT (their MatMuls sum in different orders), so the bound is a fraction of the logit scale
        assert lp["max_abs_logit_diff"] < 0.05 * max(1.0, lp["max_abs_logit"]), lp
        assert lp["argmax_agreement"] >= 0.98, lp
    else:
        assert lp["max_abs_logit_diff"] < LOGIT_BOUND, lp
    gp = greedy_parity(result.handle.model, runner, result.handle.tokenizer, prompts=("hello", "the sea"),
                       max_new_tokens=12)
    assert gp["identical"] == gp["prompts"], gp
    n_quantized = len(result.handle.quant_state)
    specs = Counter(q.spec.describe() for q in result.handle.quant_state.values())  # e.g. an int8 lm_head too
    assert result.report["quantization"]["linears_by_spec"] == dict(specs)
    if n_quantized:  # one MatMulNBits per quantized linear, less those fused into one (export.fuse_projections)
        fused = result.report["graph_pass"].get("fuse_projections", {}).get("matmuls_removed", 0)
        assert fused == (3 * result.handle.model.config.num_hidden_layers if recipe.export.fuse_projections else 0)
        assert matmul_op_counts(result.out_dir / "model.onnx").get("MatMulNBits", 0) == n_quantized - fused


@pytest.mark.slow
def test_smollm2_int4_export_parity(tmp_path):
    """The real model: RTN int4 g64 through ORT, logits and greedy tokens as torch fake-quant computes them."""
    recipe = apply_overrides(load_recipe("w4a16-g64-rtn"), ["export.accuracy_level=1"])
    result = compile_model("smollm2-135m", tmp_path / "w4", recipe)
    runner = OrtCausalLM.from_dir(result.out_dir)
    tok = result.handle.tokenizer
    ids = tok("Robert Boulter is an English film, television and theatre actor. He had a guest-starring role on "
              "the television series The Bill in 2000.", return_tensors="pt")["input_ids"]
    lp = logit_parity(result.handle.model, runner, ids)
    assert lp["max_abs_logit_diff"] < LOGIT_BOUND and lp["argmax_agreement"] == 1.0, lp
    gp = greedy_parity(result.handle.model, runner, tok, max_new_tokens=16)
    assert gp["identical"] == gp["prompts"] == 5, gp
    counts = matmul_op_counts(result.out_dir / "model.onnx")
    assert counts["MatMulNBits"] == 30 * 7
    files = result.report["files"]
    assert files["model.onnx_data"] < 0.35 * 538e6  # int4 weights + the float embedding/lm_head
