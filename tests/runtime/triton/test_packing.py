"""Export integers -> kernel layouts: lossless, in both orientations, with the grid's conventions."""

import pytest
import torch

from qcompile.quant.grid import QuantizedWeight, QuantSpec
from qcompile.runtime.triton import reference as R
from qcompile.runtime.triton.packing import concat_packed, pack_from_export, pack_int_gemm

SPECS = [(4, False, 32), (4, True, 64), (2, False, 16), (3, True, 32), (8, True, 32), (8, False, None),
         (5, False, 64), (4, False, None)]


def _qw(n, k, bits, sym, group, seed=0):
    torch.manual_seed(seed)
    return QuantizedWeight.from_float(torch.randn(n, k), QuantSpec(bits=bits, symmetric=sym, group_size=group))


@pytest.mark.parametrize("bits,sym,group", SPECS)
def test_pack_is_lossless_in_both_orientations(bits, sym, group):
    qw = _qw(24, 128, bits, sym, group)
    pw = pack_from_export(qw.qweight, qw.scale, qw.zero, bits=bits, group_size=group or 128, dtype=torch.float32)
    assert pw.qweight.dtype == torch.int32 and pw.qweight.shape == (128 // pw.pack, 24)
    assert torch.equal(R.dequantize_packed(pw), qw.dequantize().t())
    # the graph's orientation: [in, out] integers, [in/G, out] scales (per-channel: [out])
    scale_g = qw.scale.t() if group else qw.scale.reshape(-1)
    zero_g = None if qw.zero is None else (qw.zero.t() if group else qw.zero.reshape(-1))
    pg = pack_from_export(qw.qweight.t(), scale_g, zero_g, bits=bits, layout="in_out", dtype=torch.float32)
    assert torch.equal(pg.qweight, pw.qweight) and torch.equal(pg.scale, pw.scale)
    expected_zero = None if sym else qw.zero.t().to(torch.uint8)
    assert (pg.zero is None) == sym and (sym or torch.equal(pg.zero, expected_zero))


def test_codes_pack_low_bits_first_along_k():
    q = torch.arange(16).view(1, 16).repeat(2, 1) % 16  # asym 4-bit codes 0..15 along K
    pw = pack_from_export(q, torch.ones(2, 1), torch.zeros(2, 1), bits=4)
    assert pw.qweight[:, 0].tolist() == [0x76543210, 0xFEDCBA98 - 2**32]
    sym = pack_from_export(torch.full((1, 8), -8), torch.ones(1, 1), None, bits=4)
    assert sym.qweight.item() == 0  # symmetric codes are q + 8


def test_pack_refuses_off_grid_and_unpackable_shapes():
    with pytest.raises(ValueError, match="outside the symmetric"):
        pack_from_export(torch.full((2, 8), 8), torch.ones(2, 1), None, bits=4)
    with pytest.raises(ValueError, match="outside the asymmetric"):
        pack_from_export(torch.full((2, 8), -1), torch.ones(2, 1), torch.zeros(2, 1), bits=4)
    with pytest.raises(ValueError, match="multiples of 8"):
        pack_from_export(torch.zeros(2, 12, dtype=torch.int16), torch.ones(2, 3), torch.zeros(2, 3), bits=4)
    with pytest.raises(ValueError, match="zero points must be integers"):
        pack_from_export(torch.zeros(2, 8, dtype=torch.int16), torch.ones(2, 1), torch.full((2, 1), 0.5), bits=4)
    with pytest.raises(ValueError, match="group_size 32 does not match"):
        pack_from_export(torch.zeros(2, 64, dtype=torch.int16), torch.ones(2, 1), None, bits=4, group_size=32)


def test_concat_packs_columns_side_by_side():
    a, b = _qw(8, 64, 4, False, 32, 1), _qw(16, 64, 4, False, 32, 2)
    pa, pb = (pack_from_export(x.qweight, x.scale, x.zero, bits=4, dtype=torch.float32) for x in (a, b))
    pb.bias = torch.randn(16)
    cat = concat_packed([pa, pb])
    assert cat.out_features == 24
    assert torch.equal(R.dequantize_packed(cat), torch.cat([a.dequantize(), b.dequantize()]).t())
    assert torch.equal(cat.bias[:8], torch.zeros(8)) and torch.equal(cat.bias[8:], pb.bias)
    with pytest.raises(ValueError, match="same bits"):
        concat_packed([pa, pack_from_export(a.qweight, a.scale, None, bits=8)])


@pytest.mark.parametrize("bits,sym,group", [(8, True, None), (8, False, 64), (4, True, 128), (4, False, None),
                                            (3, False, 64)])
def test_int_gemm_pack_is_lossless(bits, sym, group):
    qw = _qw(16, 256, bits, sym, group)
    pw = pack_int_gemm(qw.qweight, qw.scale, qw.zero, bits=bits)
    v = R.unpack_int_weight(pw).double().t()
    g = pw.group_size
    if pw.zero is not None:
        v = v - pw.zero.double().repeat_interleave(g, 0)
    w = v * pw.scale.double().repeat_interleave(g, 0)
    assert torch.equal(w.float(), qw.dequantize().t())
    assert pw.qweight.dtype == (torch.int8 if pw.bits == 8 else torch.uint8)
    assert R.unpack_int_weight(pw).abs().max() <= (128 if pw.bits == 8 else 8)


def test_int_gemm_pack_needs_w4a4_tiles():
    qw = _qw(4, 96, 4, True, 32)
    with pytest.raises(ValueError, match="multiples of 64"):
        pack_int_gemm(qw.qweight, qw.scale, None, bits=4)
