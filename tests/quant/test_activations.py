import pytest
import torch

from qcompile.errors import RecipeError
from qcompile.quant.activations import TokenQuantSpec, fake_quantize_tokens


@pytest.mark.parametrize("spec", [TokenQuantSpec(8, True), TokenQuantSpec(4, False), TokenQuantSpec(3, False, 16),
                                  TokenQuantSpec(4, True, 8, 0.9)])
def test_values_lie_on_a_per_token_grid(spec):
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 10, 32)
    y = fake_quantize_tokens(x, spec)
    g = spec.group_size or 32
    levels = y.reshape(3, 5, 32 // g, g)
    for group in levels.reshape(-1, g):
        assert len(torch.unique(group)) <= 2**spec.bits  # at most 2^b distinct values per group
    err = (y - x).abs().reshape(3, 5, 32 // g, g).amax(-1)
    rng = x.reshape(3, 5, 32 // g, g)
    step = (rng.amax(-1) - rng.amin(-1)) / (2**spec.bits - 1)
    if spec.clip_ratio == 1:
        assert (err <= step * (1.01 if not spec.symmetric else 1.01 * 2)).all()  # within one grid step


def test_tokens_are_independent():
    """Quantizing a sequence equals quantizing each token alone: what lets the cache be quantized once."""
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    spec = TokenQuantSpec(4, False)
    whole = fake_quantize_tokens(x, spec)
    for t in range(7):
        assert torch.equal(whole[:, t], fake_quantize_tokens(x[:, t], spec))


def test_zero_tensor_stays_zero_and_8bit_is_close():
    assert torch.equal(fake_quantize_tokens(torch.zeros(2, 8), TokenQuantSpec(4, True)), torch.zeros(2, 8))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    rel = (fake_quantize_tokens(x, TokenQuantSpec(8, True)) - x).norm() / x.norm()
    assert 0 < rel < 0.01


@pytest.mark.parametrize("kwargs", [dict(bits=1), dict(bits=9), dict(group_size=0), dict(clip_ratio=0),
                                    dict(clip_ratio=1.5)])
def test_bad_specs(kwargs):
    with pytest.raises(RecipeError):
        TokenQuantSpec(**kwargs)


def test_group_that_does_not_divide():
    with pytest.raises(RecipeError, match="does not divide"):
        fake_quantize_tokens(torch.randn(2, 24), TokenQuantSpec(4, True, 16), "input of x")
