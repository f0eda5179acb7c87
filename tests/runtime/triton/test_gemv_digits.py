"""The digit-plane int4 GEMV: the digit planes and the packing against plain arithmetic on the CPU (through
``emulate``, which follows the mma fragments' definitions), the Gluon kernel on CUDA."""

import pytest
import torch

from qcompile.quant.grid import QuantizedWeight, QuantSpec
from qcompile.runtime.triton import gemv_digits as gd
from qcompile.runtime.triton.packing import pack_from_export
from qcompile.runtime.triton.reference import unpack_codes


def quantized(n, k, sym, seed=0):
    """A random int4 weight as the runtime packs it: (PackedWeight, codes [K, N], fp16 scales [K/128, N], uint8
    zero points [K/128, N] or None)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / k**0.5
    qw = QuantizedWeight.from_float(w, QuantSpec(bits=4, symmetric=sym, group_size=128))
    pw = pack_from_export(qw.qweight, qw.scale, qw.zero, bits=4, dtype=torch.float16)
    return pw, unpack_codes(pw), pw.scale, pw.zero


def dequantized_gemv(codes, scale, zero, x, magnitudes=False):
    """float64 sum_k scale * (code - zero) * x, the weights' own fp16 scales (``magnitudes``: of the terms'
    absolute values, the size an fp32 rounding is relative to)."""
    z = torch.full_like(scale, 8, dtype=torch.uint8) if zero is None else zero
    w = (codes.double() - z.double().repeat_interleave(128, 0)) * scale.double().repeat_interleave(128, 0)
    return x.double().abs() @ w.abs() if magnitudes else x.double() @ w


def test_digit_planes_are_exact_over_fp16s_range():
    x = torch.cat([torch.randn(448, dtype=torch.float16) * 300,
                   torch.tensor([65504.0, -65504.0, 2.0**-24, -(2.0**-24), 0.0, 6.1e-5, -1.0, 1.0] * 8,
                                dtype=torch.float16)])
    planes = gd.digit_planes(x)
    assert planes.shape == (8, 512) and planes.dtype == torch.int8
    assert torch.equal(gd.planes_to_values(planes), x.double())
    assert not planes[gd.PLANES:].any()
    # the permutation is one: every input has its own byte in each plane
    assert torch.equal(torch.sort(gd.plane_positions(512)).values, torch.arange(512))


def test_digit_planes_reject_non_finite_and_odd_sizes():
    with pytest.raises(ValueError, match="inf or NaN"):
        gd.digit_planes(torch.tensor([1.0, float("nan")] * 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="multiple of 64"):
        gd.digit_planes(torch.zeros(96, dtype=torch.float16))
    with pytest.raises(ValueError, match="fp16"):
        gd.digit_planes(torch.zeros(64))


@pytest.mark.parametrize("n,k", [(64, 512), (32, 1024)])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_emulated_kernel_equals_the_dequantized_gemv(n, k, sym):
    """The packed words, scales and zero points and the digit planes, multiplied as the mma fragments define it,
    give the GEMV of the dequantized weight (float64, so to rounding only)."""
    _, codes, scale, zero = quantized(n, k, sym, seed=k + n)
    x = (torch.randn(k, generator=torch.Generator().manual_seed(1)) * 4).to(torch.float16)
    dw = gd.pack_digits(codes, scale, zero)
    got = gd.emulate(dw, gd.digit_planes(x))
    ref = dequantized_gemv(codes, scale, zero, x)
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())


def test_emulation_sees_a_misplaced_code():
    """One code moved by one input in the packing changes the emulated result (the check above can fail)."""
    _, codes, scale, zero = quantized(32, 512, False, seed=3)
    x = torch.randn(512, generator=torch.Generator().manual_seed(2)).to(torch.float16)
    dw = gd.pack_digits(codes, scale, zero)
    ref = dequantized_gemv(codes, scale, zero, x)
    dw.words[0, 0, 0, 5, 0] = dw.words[0, 0, 0, 5, 0] ^ 0x0000000F  # lane 5, step 0: one low nibble flipped
    assert (gd.emulate(dw, gd.digit_planes(x)) - ref).abs().max() > 1e-3


def test_emulation_ignores_planes_six_and_seven():
    """The kernel's lanes g = 6, 7 load nothing, so whatever rows 6 and 7 of the planes hold changes nothing."""
    _, codes, scale, zero = quantized(32, 512, False, seed=4)
    x = torch.randn(512, generator=torch.Generator().manual_seed(5)).to(torch.float16)
    dw = gd.pack_digits(codes, scale, zero)
    planes = gd.digit_planes(x)
    noisy = planes.clone()
    noisy[gd.PLANES:] = torch.randint(-128, 128, noisy[gd.PLANES:].shape, dtype=torch.int8)
    assert torch.equal(gd.emulate(dw, noisy), gd.emulate(dw, planes))


def test_pack_rejects_values_that_are_not_4_bit():
    _, codes, scale, zero = quantized(32, 512, False)
    with pytest.raises(ValueError, match="codes 0..15"):
        gd.pack_digits(codes * 2, scale, zero)
    with pytest.raises(ValueError, match="zero points 0..15"):
        gd.pack_digits(codes, scale, zero + 16)


def test_pack_rejects_shapes_the_kernel_cannot_take():
    _, codes, scale, zero = quantized(32, 512, False)
    with pytest.raises(ValueError, match="multiple of 32"):
        gd.pack_digits(codes[:, :16], scale[:, :16], zero[:, :16])
    _, codes3, scale3, zero3 = quantized(32, 1536, False)  # 3 groups a warp: not a power of two
    with pytest.raises(ValueError, match="power of two"):
        gd.pack_digits(codes3, scale3, zero3)


@pytest.mark.cuda
@pytest.mark.parametrize("n,layers,sym", [(512, 2, False), (4096, 3, False), (4096, 2, True)])
def test_kernel_chain_on_gpu(n, layers, sym):
    """Each layer's fp16 output is the dequantized GEMV of the layer's own input, correctly rounded up to the
    kernel's fp32 scale products and sums (within one fp16 ulp, or 2^-20 of the size of the terms where an output
    nearly cancels), the same bits on a second run, and its digit planes are ``digit_planes`` of it."""
    from qcompile.runtime.triton.gemv_chain import stack_chain

    ws, pws = [], []
    for layer in range(layers):
        pw, codes, scale, zero = quantized(n, n, sym, seed=layer)
        ws.append((codes, scale, zero))
        pws.append(pw.to("cuda"))
    dc = gd.stack_digits(stack_chain(pws))
    x = torch.randn(n, generator=torch.Generator().manual_seed(n + layers)).to(torch.float16).cuda()
    outs = []
    for _ in range(2):
        planes = torch.zeros(layers + 1, 8, n, dtype=torch.int8, device="cuda")
        planes[0] = gd.digit_planes(x)
        out = torch.zeros(layers + 1, n, dtype=torch.float16, device="cuda")
        out[0] = x
        gd.gemv_digits_chain(planes, dc, out)
        torch.cuda.synchronize()
        outs.append(out.cpu())
    assert torch.equal(outs[0], outs[1])
    for layer, (codes, scale, zero) in enumerate(ws):
        xin = out[layer].cpu()
        ref = dequantized_gemv(codes, scale, zero, xin)
        terms = dequantized_gemv(codes, scale, zero, xin, magnitudes=True)
        got = out[layer + 1].cpu().double()
        ulp = torch.finfo(torch.float16).eps * ref.abs().clamp_min(2.0**-14)
        assert ((got - ref).abs() <= torch.maximum(1.01 * ulp, terms * 2.0**-20)).all(), layer
        assert torch.equal(planes[layer + 1].cpu(), gd.digit_planes(out[layer + 1].cpu()))
