import pytest
import torch

from qcompile.errors import RecipeError
from qcompile.quant.grid import QuantizedWeight, QuantSpec, compute_qparams, search_clip


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [16, None])
def test_roundtrip_stays_on_grid_and_within_half_step(bits, symmetric, group_size):
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    spec = QuantSpec(bits, symmetric, group_size)
    qw = QuantizedWeight.from_float(w, spec)
    assert qw.qweight.min() >= spec.qmin and qw.qweight.max() <= spec.qmax
    assert qw.scale.shape == (8, 64 // group_size if group_size else 1)
    assert (qw.zero is None) == symmetric
    err = (qw.dequantize() - w).abs().reshape(8, qw.scale.shape[1], -1)
    # inside the clipping range the error is at most half a step; symmetric clips at most one step at -amax side
    bound = qw.scale.unsqueeze(-1) * (0.5 if not symmetric else 1.0) + 1e-6
    assert (err <= bound).all()


def test_asymmetric_zero_is_exact():
    w = torch.tensor([[0.0, 0.1, -0.3, 0.5, 0.2, -0.1, 0.0, 0.4]])
    qw = QuantizedWeight.from_float(w, QuantSpec(4, False, 8))
    assert qw.dequantize()[0, 0] == 0.0 and qw.dequantize()[0, 6] == 0.0


def test_values_on_a_4bit_grid_are_lossless_at_4_bits():
    torch.manual_seed(1)
    scale = torch.rand(4, 2, 1) + 0.1
    q = torch.randint(0, 16, (4, 2, 32)).float()
    q[..., 0], q[..., 1] = 0, 15  # the grid's ends are used, as in a GGUF Q4 tensor
    zero = torch.randint(0, 16, (4, 2, 1)).float()
    q[..., 2] = zero[..., 0]  # and 0 is representable
    w = ((q - zero) * scale).reshape(4, 64)
    qw = QuantizedWeight.from_float(w, QuantSpec(4, False, 32))
    assert torch.allclose(qw.dequantize(), w, atol=1e-5)


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bits_out_of_range_is_a_recipe_error(bits):
    with pytest.raises(RecipeError, match="bits must be an integer from 2 to 8"):
        QuantSpec(bits=bits)


def test_group_size_must_divide():
    with pytest.raises(RecipeError, match="group_size 128 does not divide in_features 576 of q_proj"):
        QuantSpec(4, False, 128).groups(576, "q_proj")


def test_clip_search_never_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.randn(16, 128) * torch.rand(16, 1)
    w[0, 3] = 8.0  # an outlier that min/max scaling wastes range on
    spec = QuantSpec(3, False, 32)
    clip = search_clip(w, spec)
    assert clip.shape == (16, 4) and (clip <= 1).all() and (clip > 0.19).all()
    e_mse = (QuantizedWeight.from_float(w, spec, clip).dequantize() - w).pow(2).sum()
    e_minmax = (QuantizedWeight.from_float(w, spec).dequantize() - w).pow(2).sum()
    assert e_mse < e_minmax


def test_qparams_shapes_per_channel():
    s, z = compute_qparams(torch.randn(5, 40), QuantSpec(8, True, None))
    assert s.shape == (5, 1) and z is None
