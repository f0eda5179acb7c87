import pytest
import torch

from qcompile.models import load
from qcompile.passes import canonicalize


def _logits(h, ids):
    with torch.no_grad():
        return h.model(input_ids=ids).logits


@pytest.mark.parametrize("untie", [False, True])
def test_norm_fusion_preserves_logits(tiny_model_dir, untie):
    h = load(tiny_model_dir)
    ids = torch.randint(3, 300, (2, 24))
    ref = _logits(h, ids)
    stats = canonicalize.apply(h, canonicalize.CanonicalizeConfig(fuse_norms=True, untie_embeddings=untie))
    assert stats["norms_fused"] == 2 * 2 + 1  # two per layer, plus the final norm (lm_head is untied here)
    layer = h.adapter.layers(h.model)[0]
    assert torch.all(h.adapter.input_norm(layer).weight == 1)
    assert torch.allclose(_logits(h, ids), ref, atol=1e-5, rtol=1e-5)


def test_tied_model_keeps_final_norm_unless_untied(tmp_path):
    from tiny_models import make_tiny_model

    folder = make_tiny_model("llama", tmp_path / "tied", tie_word_embeddings=True)
    h = load(folder)
    assert h.adapter.ties_embeddings(h.model)
    ids = torch.randint(3, 300, (1, 16))
    ref = _logits(h, ids)
    stats = canonicalize.apply(h, canonicalize.CanonicalizeConfig())
    assert stats["norms_fused"] == 4 and h.adapter.ties_embeddings(h.model)
    stats = canonicalize.apply(load(folder), canonicalize.CanonicalizeConfig(untie_embeddings=True))
    assert stats == {"norms_fused": 5, "untied_embeddings": True}
    h2 = load(folder)
    canonicalize.apply(h2, canonicalize.CanonicalizeConfig(untie_embeddings=True))
    assert not h2.adapter.ties_embeddings(h2.model)
    assert torch.allclose(_logits(h2, ids), ref, atol=1e-5)


@pytest.mark.slow
def test_smollm2_norm_fusion_preserves_logits():
    h = load("smollm2-135m")
    ids = h.tokenizer("The tower is 324 metres tall, about the same height as an 81-storey building.",
                      return_tensors="pt")["input_ids"]
    ref = _logits(h, ids)
    canonicalize.apply(h, canonicalize.CanonicalizeConfig(fuse_norms=True, untie_embeddings=True))
    out = _logits(h, ids)
    assert (out - ref).abs().max() < 1e-3 * ref.abs().max()
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
