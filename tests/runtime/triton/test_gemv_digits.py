"""The digit-plane int4 GEMV: the digit planes and the packing against plain arithmetic (through ``emulate``, which
follows the mma fragments' definitions), and the Gluon kernel against the dequantized GEMV: compiled on CUDA, under
Triton's interpreter on the CPU (``_gluon``), the large shapes on the GPU only."""

import pytest
import torch

from qcompile.quant.grid import QuantizedWeight, QuantSpec
from qcompile.runtime.triton import gemv_digits as gd
from qcompile.runtime.triton.packing import pack_from_export
from qcompile.runtime.triton.reference import dequantize_packed, unpack_codes


def quantized(n, k, sym, seed=0):
    """A random int4 weight as the runtime packs it: (PackedWeight, codes [K, N], fp16 scales [K/128, N], uint8
    zero points [K/128, N] or None)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / k**0.5
    qw = QuantizedWeight.from_float(w, QuantSpec(bits=4, symmetric=sym, group_size=128))
    pw = pack_from_export(qw.qweight, qw.scale, qw.zero, bits=4, dtype=torch.float16)
    return pw, unpack_codes(pw), pw.scale, pw.zero


def dequantized_gemv(pw, x, magnitudes=False):
    """float64 ``x @ W`` of the dequantized weight (exact: ``dequantize_packed``'s fp32 products of 4-bit codes and
    fp16 scales are exact); ``magnitudes``: of the terms' absolute values, the size an fp32 rounding is relative to."""
    w = dequantize_packed(pw).double()
    return x.double().abs() @ w.abs() if magnitudes else x.double() @ w


def test_digit_planes_are_exact_over_fp16s_range():
    x = torch.cat([torch.randn(448, dtype=torch.float16) * 300,
                   torch.tensor([65504.0, -65504.0, 2.0**-24, -(2.0**-24), 0.0, 6.1e-5, -1.0, 1.0] * 8,
                                dtype=torch.float16)])
    planes = gd.digit_planes(x)
    assert planes.shape == (8, 512) and planes.dtype == torch.int8
    assert torch.equal(gd.planes_to_values(planes), x.double())
    assert not planes[gd.PLANES:].any()  # the documented unused rows: zeros
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
    pw, codes, scale, zero = quantized(n, k, sym, seed=k + n)
    x = (torch.randn(k, generator=torch.Generator().manual_seed(1)) * 4).to(torch.float16)
    dw = gd.pack_digits(codes, scale, zero)
    got = gd.emulate(dw, gd.digit_planes(x))
    ref = dequantized_gemv(pw, x)
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())


def test_emulation_sees_a_flipped_code():
    """One code changed in the packed words changes the emulated result (the check above can fail)."""
    pw, codes, scale, zero = quantized(32, 512, False, seed=3)
    x = torch.randn(512, generator=torch.Generator().manual_seed(2)).to(torch.float16)
    dw = gd.pack_digits(codes, scale, zero)
    ref = dequantized_gemv(pw, x)
    dw.words[0, 0, 0, 5, 0] = dw.words[0, 0, 0, 5, 0] ^ 0x0000000F  # lane 5, step 0: one low nibble flipped
    assert (gd.emulate(dw, gd.digit_planes(x)) - ref).abs().max() > 1e-3


def test_packing_puts_codes_where_the_ptx_fragments_read_them():
    """Hand-derived from the PTX ISA's m16n8k32 .u8 A fragment (a0: row g, columns 4t..4t+3; a1: row g + 8, the same
    columns; a2 / a3: the same rows, columns 16 + 4t..): lane 5 is (g, t) = (1, 1), so its word 1 holds row 9 at
    inputs 4..7 and its word 2 row 1 at inputs 20..23, byte j = input - 4t (- 16); a row's code in the low nibble,
    the code of the row 16 further in the high one."""
    codes = torch.zeros(512, 32, dtype=torch.int64)
    scale = torch.ones(4, 32, dtype=torch.float16)
    codes[5, 9] = 3  # input 5 = 4t + 1: word 1 (row g + 8), byte 1, low nibble
    codes[21, 1 + 16] = 7  # input 21 = 16 + 4t + 1, row g + 16: word 2 (row g), byte 1, high nibble
    dw = gd.pack_digits(codes, scale, None)
    words = dw.words.to(torch.int64) & 0xFFFFFFFF
    assert words[0, 0, 0, 5, 1].item() == 3 << 8
    assert words[0, 0, 0, 5, 2].item() == (16 * 7) << 8
    assert int((words != 0).sum()) == 2
    # scales and zero points: lane (g, t) reads rows g, g + 8, g + 16, g + 24 of each of its warp's groups
    scale[1, 25] = 2.0  # group 1 = warp 1's group 0; row 25 = g + 24 for g = 1
    dw = gd.pack_digits(codes, scale, None)
    assert dw.scale[0, 1, 0, 1, 3].item() == 2.0 and int((dw.scale != 1).sum()) == 1


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
    with pytest.raises(ValueError, match="power of two"):
        gd.pack_digits(codes, scale, zero, warps=3)
    with pytest.raises(ValueError, match="fp16 scales"):
        gd.pack_digits(codes, scale.float(), zero)
    _, codes8, scale8, zero8 = quantized(32, 8192, False)  # 256 words a thread with 4 warps in one slice
    with pytest.raises(ValueError, match="more than 4 warps"):
        gd.pack_digits(codes8, scale8, zero8, splits=1)
    with pytest.raises(ValueError, match="does not split into 3 slices"):
        gd.pack_digits(codes8, scale8, zero8, splits=3)
    with pytest.raises(ValueError, match="multiple of 32"):
        gd.pack_digits(codes[:, :16], scale[:, :16], zero[:, :16])
    _, codes3, scale3, zero3 = quantized(32, 1536, False)  # 3 groups a warp in one slice: not a power of two
    with pytest.raises(ValueError, match="power of two"):
        gd.pack_digits(codes3, scale3, zero3, splits=1)


def test_default_splits_are_the_fewest_slices_a_program_holds():
    assert gd.split_layouts(2048) == [1, 2, 4] and gd.split_layouts(14336, 2) == [7, 14, 28, 56]
    assert gd.split_layouts(640) == []
    assert [gd.default_splits(k) for k in (512, 4096, 8192, 1536, 14336)] == [1, 1, 2, 3, 7]
    assert gd.default_splits(4096, warps=2) == 2 and gd.default_splits(640) == 0  # 640: 5 groups, no slice fits
    # the default packing: 1024 inputs a warp where slices of that size divide K at 4 or 2 warps (2048: one slice
    # at 2 warps; 14336: 7 of 2048 at 2), else one slice at 4 warps, else slices of 1024 at one warp (3072), else
    # the fewest slices at 4
    assert [gd.default_layout(k) for k in (4096, 2048, 8192, 14336, 1024, 3072, 1536)] == [
        (1, 4), (1, 2), (2, 4), (7, 2), (1, 4), (3, 1), (3, 4)]
    _, codes, scale, zero = quantized(32, 3584, False)
    assert (gd.pack_digits(codes, scale, zero).splits, gd.pack_digits(codes, scale, zero).warps) == (7, 4)  # 512s


@pytest.mark.parametrize("n,k,splits", [(32, 1536, None), (64, 1024, 2), (32, 3584, None)])
def test_split_weight_emulates_the_dequantized_gemv(n, k, splits):
    """K in equal slices (1536: 3 of 512 by default; 1024 in 2; 3584: 7 of 512), each packed as a
    weight of its own and read from its run of the planes: the sum of the slices' products is the dequantized
    GEMV."""
    pw, codes, scale, zero = quantized(n, k, False, seed=n + k)
    x = (torch.randn(k, generator=torch.Generator().manual_seed(9)) * 2).to(torch.float16)
    dw = gd.pack_digits(codes, scale, zero, splits=splits)
    assert dw.splits == (splits or gd.default_layout(k)[0]) > 1
    assert dw.words.shape[:2] == (dw.splits, n // gd.ROWS) and dw.slice_features * dw.splits == k
    ref = dequantized_gemv(pw, x)
    assert torch.allclose(gd.emulate(dw, gd.digit_planes(x)), ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())
    dw.words[dw.splits - 1, 0, 0, 0, 5, 0] ^= 0x0000000F  # a code of the last slice flipped: seen
    assert (gd.emulate(dw, gd.digit_planes(x)) - ref).abs().max() > 1e-3


def fp16_ulp(v):
    """The spacing of fp16 numbers at |v| (2^-24 below the normal range)."""
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0**-14)))
    return torch.exp2(e - 10)


def test_chain_rejects_a_pace_it_cannot_issue_and_an_empty_chain():
    planes, out = torch.zeros(2, 8, 512, dtype=torch.int8), torch.zeros(2, 512, dtype=torch.float16)
    with pytest.raises(ValueError, match="pace must be 1, 2, 4 or 8"):
        gd.gemv_digits_chain(planes, gd.DigitChain([]), out, pace=3)
    with pytest.raises(ValueError, match="no layers"):
        gd.gemv_digits_chain(planes, gd.DigitChain([]), out)
    _, codes, scale, zero = quantized(512, 512, False)
    with pytest.raises(ValueError, match="do not divide"):  # 512 inputs: 4 steps a warp
        gd.gemv_digits_chain(planes, gd.DigitChain([gd.pack_digits(codes, scale, zero)]), out, pace=8)
    with pytest.raises(ValueError, match="one slice"):
        gd.gemv_digits_chain(planes, gd.DigitChain([gd.pack_digits(codes, scale, zero, warps=2, splits=2)]), out)


_SASS_CHILD = """
import json, sys
from qcompile.runtime.triton import gemv_digits as gd
from qcompile.runtime.triton.aot_check import DIGITS_TYPES, compile_one, sass_text
out = {}
for pace in map(int, sys.argv[1:]):
    res = compile_one(gd._digits_kernel, DIGITS_TYPES, dict(K=4096, LEV_W=3, PDL=True, PACE=pace,
                      num_warps=gd.WARPS), num_warps=gd.WARPS, keep_cubin=True)
    lines = [ln.split(";")[0].split("*/")[-1].strip() for ln in sass_text(res["cubin"]).splitlines() if ";" in ln]
    out[pace] = (lines, res["spills"])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def sm90_sass():
    """pace -> (SASS lines, spill bytes) of the kernel compiled for sm_90 on this machine (Triton's ptxas and
    cuobjdump), in a child process without the interpreter: this folder's conftest turns it on for CPU machines,
    and then Triton's own library functions (the reductions' combine functions) cannot be compiled."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import qcompile

    root = str(Path(qcompile.__file__).resolve().parents[1])
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _SASS_CHILD, "1", "4", "8"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {int(k): v for k, v in json.loads(proc.stdout.splitlines()[-1]).items()}


def _word_loads_issued_after_a_word_is_read(lines):
    """Before the PDL wait (ACQBULK): the 16-byte loads, and how many of them are issued after the first
    instruction that reads a register an earlier one wrote (the pacing's dependency: the thread stalls there until
    that word is in)."""
    import re

    end = next(i for i, ln in enumerate(lines) if "ACQBULK" in ln)
    loaded, used, after, words = set(), False, 0, 0
    for ln in lines[:end]:
        m = re.match(r"(?:@!?U?P\w+ )?LDG\.E\.128 R(\d+),", ln)
        if m:
            words += 1
            after += used
            loaded |= {int(m.group(1)) + i for i in range(4)}
        elif "," in ln and {int(r) for r in re.findall(r"\bR(\d+)\b", ln.split(",", 1)[1])} & loaded:
            used = True
    return words, after


@pytest.mark.parametrize("pace,paced", [(1, 0), (4, 24), (8, 28)])
def test_paced_word_loads_wait_for_the_batch_before_in_the_sm90_code(sm90_sass, pace, paced):
    """The pacing is a data dependency the compilers must keep: in the sm_90 code, the 32 word loads a thread
    (16 bytes each) go out before the wait, and with PACE batches all but the first batch's go out only after an
    instruction that reads a word already loaded (unpaced: none)."""
    lines, spills = sm90_sass[pace]
    words, after = _word_loads_issued_after_a_word_is_read(lines)
    assert (words, spills) == (32, 0)
    assert after >= paced if pace > 1 else after == 0


_GPU = pytest.mark.cuda


@pytest.mark.parametrize("n,layers,sym,pace", [
    (512, 2, False, 4), (512, 2, True, 1), (1024, 2, False, 8),
    pytest.param(4096, 3, False, 4, marks=_GPU), pytest.param(4096, 2, True, 4, marks=_GPU),
    pytest.param(4096, 3, False, 1, marks=_GPU), pytest.param(4096, 2, False, 2, marks=_GPU),
    pytest.param(4096, 2, False, 8, marks=_GPU)])
def test_kernel_chain(n, layers, sym, pace, device):
    """Each layer's fp16 output is the dequantized GEMV of the layer's own input, rounded to fp16 after the
    kernel's fp32 steps: within half an fp16 ulp plus 2^-18 of the size of the terms (a bound on about a dozen fp32
    roundings of partial sums up to a few times that size); the same bits on a second run; its digit planes are
    ``digit_planes`` of it, all six written and rows 6-7 neither read nor written (the buffers start as noise).
    Each pace of the word loads (batches issued one after another) is checked the same way. On a CPU the Gluon
    kernel runs under Triton's interpreter (``_gluon``: its mma PTX emulated lane by lane), at K up to 1024."""
    from qcompile.runtime.triton.gemv_chain import stack_chain

    ws, pws = [], []
    for layer in range(layers):
        pw, _, _, _ = quantized(n, n, sym, seed=layer)
        ws.append(pw)
        pws.append(pw.to(device))
    dc = gd.stack_digits(stack_chain(pws))
    gen = torch.Generator().manual_seed(n + layers)
    x = torch.randn(n, generator=gen).to(torch.float16).to(device)
    noise = torch.randint(-128, 128, (layers + 1, 8, n), generator=gen, dtype=torch.int8).to(device)
    outs = []
    for _ in range(2):
        planes = noise.clone()
        planes[0, :gd.PLANES] = gd.digit_planes(x)[:gd.PLANES]
        out = torch.zeros(layers + 1, n, dtype=torch.float16, device=device)
        out[0] = x
        gd.gemv_digits_chain(planes, dc, out, pace=pace)
        outs.append(out.cpu())
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(planes[:, gd.PLANES:], noise[:, gd.PLANES:])
    for layer, pw in enumerate(ws):
        xin = out[layer].cpu()
        ref = dequantized_gemv(pw, xin)
        terms = dequantized_gemv(pw, xin, magnitudes=True)
        got = out[layer + 1].cpu().double()
        bound = 0.5 * fp16_ulp(torch.maximum(ref.abs(), got.abs())) + terms * 2.0**-18
        assert ((got - ref).abs() <= bound).all(), (layer, ((got - ref).abs() / bound).max().item())
        assert torch.equal(planes[layer + 1, :gd.PLANES].cpu(), gd.digit_planes(out[layer + 1].cpu())[:gd.PLANES])


def test_digit_weight_repacks_the_runtimes_packed_weight():
    """``digit_weight`` of a non-square PackedWeight (96 outputs, 1024 inputs) gives, through the emulation, the
    dequantized GEMV; weights outside the kernel's scope are refused with what does not fit."""
    pw, _, _, _ = quantized(96, 1024, True, seed=7)
    x = (torch.randn(1024, generator=torch.Generator().manual_seed(8)) * 3).to(torch.float16)
    got = gd.emulate(gd.digit_weight(pw), gd.digit_planes(x))
    ref = dequantized_gemv(pw, x)
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())
    qw = QuantizedWeight.from_float(torch.randn(32, 512), QuantSpec(bits=4, symmetric=False, group_size=64))
    with pytest.raises(ValueError, match="groups of 128"):
        gd.digit_weight(pack_from_export(qw.qweight, qw.scale, qw.zero, bits=4, dtype=torch.float16))
    with pytest.raises(ValueError, match="float16"):
        gd.digit_weight(pack_from_export(*quantized_weight_parts(32, 512), bits=4, dtype=torch.float32))
    with pytest.raises(ValueError, match="power of two"):  # K = 1536 in one slice: 3 groups a warp
        gd.digit_weight(pack_from_export(*quantized_weight_parts(32, 1536), bits=4, dtype=torch.float16), splits=1)
    assert gd.digit_weight(pack_from_export(*quantized_weight_parts(32, 1536), bits=4,
                                            dtype=torch.float16)).splits == 3


def quantized_weight_parts(n, k):
    qw = QuantizedWeight.from_float(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)),
                                    QuantSpec(bits=4, symmetric=False, group_size=128))
    return qw.qweight, qw.scale, qw.zero


@pytest.mark.parametrize("n,k,biased,res,pdl,splits", [
    (64, 512, False, False, False, None), (96, 1536, True, True, True, None), (64, 2048, False, True, True, 2),
    pytest.param(3072, 2048, False, False, False, None, marks=_GPU),
    pytest.param(16384, 2048, True, False, True, None, marks=_GPU),
    pytest.param(6144, 4096, True, True, True, None, marks=_GPU),
    pytest.param(4096, 4096, False, True, True, None, marks=_GPU),
    pytest.param(1024, 512, False, False, True, None, marks=_GPU),
    pytest.param(4096, 14336, False, False, True, None, marks=_GPU),
    pytest.param(2048, 8192, False, True, False, None, marks=_GPU),
    pytest.param(2048, 2048, False, True, True, 4, marks=_GPU),
    pytest.param(3072, 2048, True, False, True, 2, marks=_GPU)])
def test_single_gemv(n, k, biased, res, pdl, splits, device):
    """One launch, N != K (the runner's q|k|v and gate|up; o with the residual; K in 7, 3 and 2 slices by default
    for 14336, 1536 and 8192; the 1.2B Llama's o and q|k|v shapes also in 4 and 2 slices of 2048): the fp16 output
    within half an ulp plus 2^-18 of the terms of the dequantized GEMV (plus the bias and the residual), the same
    bits twice (a split's arrival counters back at zero after each launch). On a CPU, under the interpreter."""
    pw, _, _, _ = quantized(n, k, False, seed=n + k)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(k, generator=gen).to(torch.float16)
    bias = (torch.randn(n, generator=gen) * 0.1).to(torch.float16) if biased else None
    resid = (torch.randn(1, n, generator=gen) * 3).to(torch.float16) if res else None
    dw = gd.digit_weight(pw.to(device), splits=splits)
    planes = gd.digit_planes(x.to(device))
    outs = [gd.gemv_digits(planes, dw, bias=None if bias is None else bias.to(device),
                           residual=None if resid is None else resid.to(device), pdl=pdl) for _ in range(2)]
    assert outs[0].shape == (1, n) and torch.equal(outs[0], outs[1])
    extra = sum(t.double().view(-1) for t in (bias, resid) if t is not None)
    ref = dequantized_gemv(pw, x) + extra
    terms = dequantized_gemv(pw, x, magnitudes=True) + sum(t.double().abs().view(-1) for t in (bias, resid)
                                                           if t is not None)
    got = outs[0][0].cpu().double()
    bound = 0.5 * fp16_ulp(torch.maximum(ref.abs(), got.abs())) + terms * 2.0**-18
    assert ((got - ref).abs() <= bound).all(), ((got - ref).abs() / bound).max().item()
