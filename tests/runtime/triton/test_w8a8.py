"""Per-token activation quantization and the int8 tensor-core GEMM (W8A8, W4A4) against the torch reference."""

import pytest
import torch

from rows_past_int32 import run_in_subprocess

from qcompile.quant.grid import QuantizedWeight, QuantSpec
from qcompile.runtime.triton import reference as R
from qcompile.runtime.triton.packing import pack_int_gemm
from qcompile.runtime.triton.w8a8 import (
    _tma_storable,
    int_gemm_candidates,
    int_linear,
    quantize_rows,
    takes_tma_path,
    tma_candidates,
    w8a8_linear,
    wgmma_capable,
)


def int_weight(n, k, bits, sym, group, device, bias=False, seed=0):
    torch.manual_seed(seed)
    qw = QuantizedWeight.from_float(torch.randn(n, k), QuantSpec(bits=bits, symmetric=sym, group_size=group))
    return pack_int_gemm(qw.qweight, qw.scale, qw.zero, bits=bits, bias=torch.randn(n) if bias else None).to(device)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_rows_is_bit_exact(device, bits, dtype):
    x = (torch.randn(19, 200) * torch.linspace(0.1, 30, 19)[:, None]).to(device, dtype)
    x[3] = 0  # an all-zero row must not divide by zero
    q, s = quantize_rows(x, bits)
    # reference on the CPU: CUDA torch divides a tensor by a scalar as a product with its reciprocal (1 ulp off
    # IEEE division at times); the kernel, ORT's Div and CPU torch divide exactly
    qr, sr = R.quantize_rows_ref(x.cpu(), bits)
    assert torch.equal(q.cpu(), qr) and torch.equal(s.cpu(), sr)
    assert q.abs().max() <= 2 ** (bits - 1) - 1  # clip 1: the -2^(b-1) code is never needed


@pytest.mark.parametrize("bits,clip", [(8, 1.0), (4, 0.9)])
def test_quantize_rows_is_the_graphs_fake_quantization(device, bits, clip):
    activations = pytest.importorskip("qcompile.quant.activations")
    x = torch.randn(6, 128, device=device) * 5
    q, s = quantize_rows(x, bits, clip_ratio=clip)
    spec = activations.TokenQuantSpec(bits=bits, symmetric=True, group_size=None, clip_ratio=clip)
    assert torch.equal((q.float() * s[:, None]).cpu(), activations.fake_quantize_tokens(x.cpu(), spec))


def test_quantize_rows_fused_rmsnorm(device):
    x = torch.randn(9, 96, device=device) * 4
    w = torch.rand(96, device=device) + 0.5
    q, s = quantize_rows(x, 8, norm=True, norm_weight=w, eps=1e-5)
    qr, sr = R.quantize_rows_ref(x, 8, w, 1e-5, norm=True)
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=0)
    assert (q.int() - qr.int()).abs().max() <= 1 and (q != qr).float().mean() < 0.01


@pytest.mark.parametrize("bits,sym,group", [(8, True, None), (8, False, None), (8, True, 64), (8, False, 32),
                                            (4, True, None), (4, False, 64), (4, True, 128)])
def test_int_linear_matches_reference(device, bits, sym, group):
    pw = int_weight(72, 256, bits, sym, group, device, bias=True)
    x = torch.randn(33, 256, device=device) * 3
    xq, xs = R.quantize_rows_ref(x, bits)
    y = int_linear(xq, xs, pw, torch.float32)
    ref = R.int_linear_ref(xq, xs, pw, torch.float32)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())


def test_tma_gemm_matches_pointer_gemm_and_reference(device):
    """The persistent TMA kernel (int8 per-channel weights, M >= 128): partial tiles in M, N and K (the
    descriptors zero-fill), bias, fp16 and fp32 outputs; it is the default path there and bit-identical to the
    pointer-based kernel (both sum the same int32 products and apply the same scales)."""
    pw = int_weight(80, 208, 8, True, None, device, bias=True)
    x = torch.randn(150, 208, device=device) * 3
    xq, xs = quantize_rows(x, 8)
    assert takes_tma_path(150, pw, xq)
    ref = R.int_linear_ref(xq, xs, pw, torch.float32)
    y_tma = int_linear(xq, xs, pw, torch.float32, tma=True)
    torch.testing.assert_close(y_tma, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
    assert torch.equal(y_tma, int_linear(xq, xs, pw, torch.float32, tma=False))
    assert torch.equal(int_linear(xq, xs, pw, torch.float32), y_tma)  # the default at M >= 128
    assert int_linear(xq, xs, pw).dtype == torch.float16
    asym = int_weight(80, 208, 8, False, None, device)
    assert not takes_tma_path(150, asym, xq)
    with pytest.raises(ValueError, match="TMA GEMM needs"):
        int_linear(xq, xs, asym, tma=True)


def test_tma_store_needs_aligned_float_rows():
    """The TMA-store epilogue's precondition: 16-byte aligned rows and base, and an output type it has a layout for."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert _tma_storable(torch.empty(4, 64, dtype=dtype))
        assert not _tma_storable(torch.empty(4, 64, dtype=dtype)[:, 1:])  # unit stride, base off by one element
    assert not _tma_storable(torch.empty(4, 84, dtype=torch.float16))  # 168-byte rows
    assert _tma_storable(torch.empty(4, 84, dtype=torch.float32))  # 336-byte rows
    assert not _tma_storable(torch.empty(4, 64, dtype=torch.int32))
    assert not _tma_storable(torch.empty(64, 4, dtype=torch.float16).t())  # column-major


def test_wgmma_candidates_only_where_the_gluon_kernel_runs(monkeypatch):
    """The Gluon wgmma kernel needs sm_90: never a tuning candidate on CPU (the interpreter runs it only when a
    config asks for it, as the test below does) or unless asked."""
    assert not wgmma_capable("cpu")
    assert not any(c.get("WGMMA") for c in tma_candidates(1024, torch.float16))
    monkeypatch.setattr("qcompile.runtime.triton.w8a8.interpreting", lambda: False)
    wg = [c for c in tma_candidates(1024, torch.float16, wgmma=True, tma_store=True) if c.get("WGMMA")]
    tiles = [(128, 256, 4, 8), (128, 128, 3, 4)]
    assert sorted({(c["BLOCK_M"], c["BLOCK_N"], c["STAGES"], c["num_warps"]) for c in wg}) == sorted(tiles)
    assert all(c["BLOCK_N"] % c["INSTR_N"] == 0 and c["INSTR_N"] <= 224 for c in wg)  # int8 wgmma: N <= 224
    # every tile with the direct and the TMA-store epilogue; the re-laid-out store only below 256 columns
    for epi, want in ((0, tiles), (2, tiles), (1, [t for t in tiles if t[1] < 256])):
        assert sorted((c["BLOCK_M"], c["BLOCK_N"], c["STAGES"], c["num_warps"]) for c in wg
                      if c["EPILOGUE"] == epi) == sorted(want)
    # no TMA store where the output rows are not 16-byte aligned
    assert not any(c.get("EPILOGUE") == 2 for c in tma_candidates(1024, torch.float16, wgmma=True))


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] != 9,
                    reason="the Gluon wgmma kernel needs an sm_90 GPU (or Triton's interpreter)")
@pytest.mark.parametrize("m,n,k", [(150, 80, 208), (150, 84, 208), pytest.param(1000, 4000, 4096,
                                                                                marks=pytest.mark.cuda)])
def test_wgmma_gemm_is_the_tma_kernel_bit_for_bit(m, n, k, device, monkeypatch):
    """Every tile and epilogue of the Gluon kernel (one wgmma in flight) against the Triton TMA kernel: the same
    int32 sums and the same epilogue arithmetic, so the same output bit for bit, with partial tiles in M, N and K
    (zero-filled by TMA, clipped by the TMA store), a bias, fp32, fp16 and bf16 outputs (the TMA store's shared
    layout differs per element type); N = 84 gives 16-bit rows that are not 16-byte aligned (no TMA-store
    candidate, and forcing one is refused). Each output is poisoned with NaN once checked, so the next candidate,
    which the allocator hands the same memory, cannot pass by leaving it as it was. On a CPU both kernels run under
    Triton's interpreter (the Gluon one through ``_gluon``: TMA copies, shared memory and wgmma as numpy), with
    the GPU's candidates."""
    from qcompile.runtime.triton import w8a8

    pw = int_weight(n, k, 8, True, None, device, bias=True, seed=5)
    x = torch.randn(m, k, device=device) * 3
    xq, xs = quantize_rows(x, 8)
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        aligned = n * torch.empty(0, dtype=out_dtype).element_size() % 16 == 0
        assert _tma_storable(torch.empty(m, n, dtype=out_dtype, device=device)) == aligned
        with monkeypatch.context() as gpu:  # the GPU's candidates, also under the interpreter
            gpu.setattr(w8a8, "interpreting", lambda: False)
            cands = tma_candidates(m, out_dtype, wgmma=True, tma_store=aligned)
        want = int_linear(xq, xs, pw, out_dtype, config=[c for c in cands if not c.get("WGMMA")][0], tma=True)
        ref = R.int_linear_ref(xq, xs, pw, torch.float32)
        torch.testing.assert_close(want.float(), ref, rtol=1e-5 if out_dtype == torch.float32 else 1e-2,
                                   atol=1e-4 * ref.abs().max().item())
        wg = [c for c in cands if c.get("WGMMA")]
        assert any(c["EPILOGUE"] == 2 for c in wg) == aligned
        for cfg in wg:
            got = int_linear(xq, xs, pw, out_dtype, config=cfg, tma=True)
            assert torch.equal(got, want), cfg
            got.fill_(float("nan"))
        if not aligned:
            with pytest.raises(ValueError, match="16-byte aligned"):
                int_linear(xq, xs, pw, out_dtype, config=dict(wg[0], EPILOGUE=2), tma=True)


def test_w8a8_linear_end_to_end_error_is_quantization_error(device):
    """Quantize + GEMM against the float product: the error is what 8-bit rounding allows, not more."""
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    qw = QuantizedWeight.from_float(w, QuantSpec(bits=8, symmetric=True, group_size=None))
    pw = pack_int_gemm(qw.qweight, qw.scale, None, bits=8).to(device)
    x = torch.randn(40, 128, device=device, dtype=torch.float16)
    y = w8a8_linear(x, pw)
    ref = x.float() @ qw.dequantize().t().to(device)
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    assert y.dtype == torch.float16 and rel < 0.01


@pytest.mark.cuda
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("bits,group", [(8, None), (8, 128), (4, None), (4, 128)])
def test_int_gemm_every_config_at_llama_shapes(n, k, bits, group):
    pw = int_weight(n, k, bits, True, group, "cuda")
    x = torch.randn(1024, k, device="cuda")
    xq, xs = quantize_rows(x, bits)
    ref = R.int_linear_ref(xq, xs, pw, torch.float32)
    for cfg in int_gemm_candidates(1024, n, k, pw):
        y = int_linear(xq, xs, pw, torch.float32, config=cfg, tma=False)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(), msg=str(cfg))
    if takes_tma_path(1024, pw, xq):
        # the Gluon kernel's too, with every epilogue (fp32 rows of these N are 16-byte aligned)
        for cfg in tma_candidates(1024, torch.float32, wgmma=wgmma_capable("cuda"), tma_store=True):
            y = int_linear(xq, xs, pw, torch.float32, config=cfg, tma=True)
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(), msg=str(cfg))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="the TMA kernels need a Hopper-or-newer GPU")
def test_int8_gemm_output_past_two_to_the_31_elements():
    """M x N >= 2^31 outputs through every TMA-path candidate (Triton and, on sm_90, each Gluon epilogue): the
    epilogue's row offsets must not wrap in int32 (4.3 GB of output; poisoned between candidates)."""
    n, k, m = 131200, 64, 16384
    pw = int_weight(n, k, 8, True, None, "cuda")
    xq, xs = quantize_rows(torch.randn(m, k, device="cuda"), 8)
    refs = {rows: R.int_linear_ref(xq[rows], xs[rows], pw, torch.float32)
            for rows in (slice(0, 2), slice(m - 2, m))}
    for cfg in tma_candidates(m, torch.float16, wgmma=wgmma_capable("cuda"), tma_store=True):
        y = int_linear(xq, xs, pw, torch.float16, config=cfg, tma=True)
        for rows, ref in refs.items():
            torch.testing.assert_close(y[rows].float(), ref, rtol=1e-2, atol=1e-3 * ref.abs().max().item(),
                                       msg=str(cfg))
        y.fill_(float("nan"))
        del y


def test_int_gemm_reads_activation_rows_past_two_to_the_31_elements(device):
    """The pointer kernel (4-bit weights; 8-bit in groups) on a row tile of int8 activations starting past 2^31
    elements: its offset is taken in int64."""
    run_in_subprocess("int_gemm", device)
