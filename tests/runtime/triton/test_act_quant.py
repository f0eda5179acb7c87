"""Per-token fake quantization kernel against ``qcompile.quant.activations`` (what the graph's nodes compute)."""

import pytest
import torch

from qcompile.quant.activations import TokenQuantSpec, fake_quantize_tokens
from qcompile.runtime.triton.act_quant import fake_quantize


@pytest.mark.parametrize("spec", [TokenQuantSpec(8, True), TokenQuantSpec(4, False), TokenQuantSpec(3, False, 16),
                                  TokenQuantSpec(4, True, 8, 0.85), TokenQuantSpec(2, False, 32, 0.9),
                                  TokenQuantSpec(6, True, None, 0.9)])
def test_fake_quantize_is_bit_exact(device, spec):
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 4, 96)
    x[0, 0] = 0.0  # an all-zero token stays zero
    x[1, 2, :7] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 7.0])  # halfway cases: ties to even
    got = fake_quantize(x.to(device), spec.bits, spec.symmetric, spec.group_size, spec.clip_ratio)
    # CPU torch divides exactly, as ORT's Div and the kernel's div_rn do
    assert torch.equal(got.cpu(), fake_quantize_tokens(x, spec))
    assert got.dtype == x.dtype and not torch.equal(got.cpu(), x)


def test_fake_quantize_refuses_a_group_that_does_not_divide():
    with pytest.raises(ValueError, match="does not divide"):
        fake_quantize(torch.zeros(2, 48), 4, False, 32)
