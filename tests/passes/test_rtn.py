import pytest
import torch

from qcompile.errors import RecipeError
from qcompile.models import load
from qcompile.passes import rtn


def test_rtn_quantizes_every_linear_and_model_computes_dequantized_weights(tiny_model_dirs):
    h = load(tiny_model_dirs["qwen2"])
    stats = rtn.apply(h, rtn.RTNConfig(bits=4, group_size=16))
    assert stats["quantized_linears"] == 14 and len(h.quant_state) == 14
    for name, qw in h.quant_state.items():
        assert torch.equal(h.model.get_submodule(name).weight, qw.dequantize())
    assert "lm_head" not in h.quant_state


def test_lm_head_is_quantized_only_when_asked_with_its_own_bits(tmp_path):
    from tiny_models import make_tiny_model

    h = load(make_tiny_model("llama", tmp_path / "tied", tie_word_embeddings=True))
    emb = h.adapter.embed(h.model).weight.clone()
    rtn.apply(h, rtn.RTNConfig(bits=4, group_size=16, quantize_lm_head=True, lm_head_bits=8))
    assert h.quant_state["lm_head"].spec.bits == 8
    assert not h.adapter.ties_embeddings(h.model)  # untied so the embeddings stay float
    assert torch.equal(h.adapter.embed(h.model).weight, emb)


def test_more_bits_less_error(tiny_model_dirs):
    errs = []
    for bits in (2, 3, 4, 8):
        h = load(tiny_model_dirs["llama"])
        ref = {n: m.weight.clone() for n, _, m in h.linears()}
        rtn.apply(h, rtn.RTNConfig(bits=bits, group_size=16))
        errs.append(sum((h.model.get_submodule(n).weight - w).pow(2).sum().item() for n, w in ref.items()))
    assert errs == sorted(errs, reverse=True)


def test_bad_group_size_fails_before_touching_weights(tiny_model_dirs):
    h = load(tiny_model_dirs["llama"])
    before = h.model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(RecipeError, match="does not divide in_features 64"):
        rtn.apply(h, rtn.RTNConfig(bits=4, group_size=48))
    assert torch.equal(before, h.model.model.layers[0].self_attn.q_proj.weight) and not h.quant_state
