"""LearnedWeight: the parametrization every learned pass trains (CPU, milliseconds)."""

import pytest
import torch

from qcompile.learn.weights import LearnedWeight
from qcompile.passes.gptq import gptq_quantize
from qcompile.quant.grid import QuantizedWeight, QuantSpec

W = torch.randn(24, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.2, 2, 64)

OPTIONS = [
    dict(scales="learned"),
    dict(scales="learned", svd_band=0),
    dict(scales="learned", svd_band=2, svd_corner=5),
    dict(scales="fixed", magnitude=True, lora_rank=3),
    dict(scales="learned", lora_rank=2, magnitude=True),
]


def _perturb(p: LearnedWeight, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in p.parameters():
            t.add_(0.05 * torch.randn(t.shape, generator=g))


@pytest.mark.parametrize("spec", [QuantSpec(3, False, 16), QuantSpec(4, True, 32), QuantSpec(2, False, None)])
@pytest.mark.parametrize("opts", OPTIONS)
def test_export_reproduces_the_trained_weight_bit_for_bit(spec, opts):
    p = LearnedWeight(W, spec, **opts)
    _perturb(p)
    qw = p.export(W)  # raises if the stored grid differs from forward()
    assert torch.equal(qw.dequantize(), p(W))
    assert qw.qweight.min() >= spec.qmin and qw.qweight.max() <= spec.qmax
    assert (qw.zero is None) == spec.symmetric


@pytest.mark.parametrize("opts", [dict(svd_band=1, svd_corner=4), dict(lora_rank=4)])
def test_adjustments_start_at_the_exact_weight(opts):
    p = LearnedWeight(W, QuantSpec(4, False, 16), **opts)
    assert torch.equal(p.adjusted(W), W)
    assert float(p.penalty(W).detach()) == 0.0
    _perturb(p)
    assert float(p.penalty(W).detach()) > 0.0


def test_svd_parameters_cover_band_and_corner():
    p = LearnedWeight(W, QuantSpec(4, False, 16), svd_band=1, svd_corner=3)
    r = 24  # min(out, in)
    band = r + 2 * (r - 1)
    corner_extra = 3 * 3 - (3 + 2 * 2)  # corner entries not already on the band
    assert p.d.numel() == band + corner_extra
    assert LearnedWeight(W, QuantSpec(4, False, 16), svd_band=0).d.numel() == r  # LSI: the diagonal


def test_fixed_scales_start_from_the_given_grid():
    """A fixed grid initialised from GPTQ's state reproduces GPTQ's integers and scales before any training."""
    spec = QuantSpec(3, False, 16)
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(3)) @ torch.randn(64, 64)
    res = gptq_quantize(W, 2 * x.T @ x / 500, spec)
    w_gptq = res.qweight.dequantize()
    p = LearnedWeight(w_gptq, spec, scales="fixed", init=res.qweight, magnitude=True, lora_rank=2)
    qw = p.export(w_gptq)
    assert torch.equal(qw.qweight, res.qweight.qweight) and torch.equal(qw.scale, res.qweight.scale)


def test_straight_through_rounding_gives_every_parameter_a_gradient():
    p = LearnedWeight(W, QuantSpec(3, False, 16), scales="learned", svd_band=1, lora_rank=2, magnitude=True)
    with torch.no_grad():
        p.lora_b.normal_(0, 0.01)  # B = 0 would zero A's gradient by construction
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    (x @ p(W).T).pow(2).sum().backward()
    for name, t in p.named_parameters():
        assert t.grad is not None and t.grad.abs().sum() > 0, name


def test_learned_clipping_starts_near_rtn_and_can_reach_it():
    spec = QuantSpec(4, False, 16)
    p = LearnedWeight(W, spec, scales="learned")
    with torch.no_grad():
        p.clip_hi.fill_(50.0)
        p.clip_lo.fill_(50.0)  # sigmoid = 1: plain min/max
    assert torch.equal(p.export(W).qweight, QuantizedWeight.from_float(W, spec).qweight)


@pytest.mark.parametrize("opts", [o for o in OPTIONS if o.get("svd_band") is not None or o.get("lora_rank")])
def test_forward_inside_bfloat16_autocast_is_what_export_gives(opts):
    """The end-to-end engine runs its forwards under bfloat16 autocast; the adjustment's matmuls must still be
    float32 there, or training would round other codes than the exported weight has."""
    p = LearnedWeight(W, QuantSpec(3, False, 16), **opts)
    _perturb(p, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w_train = p(W)
    assert w_train.dtype == torch.float32
    assert torch.equal(w_train, p.export(W).dequantize())


@pytest.mark.parametrize("opts", OPTIONS)
def test_trained_state_rebuilds_the_parametrization(opts):
    p = LearnedWeight(W, QuantSpec(4, False, 16), **opts)
    _perturb(p, seed=4)
    q = LearnedWeight(W, QuantSpec(4, False, 16), **opts)
    q.load_trained_state(p.trained_state())
    assert torch.equal(q(W), p(W))
    with pytest.raises(ValueError, match="do not fit"):
        LearnedWeight(W, QuantSpec(4, False, 16), scales="learned").load_trained_state(
            {**p.trained_state(), "extra": torch.zeros(1)})
