"""Weight-only GEMV/GEMM against the torch reference: small shapes (interpreter on CPU), real shapes on CUDA."""

import pytest
import torch

from rows_past_int32 import run_in_subprocess

from qcompile.quant.grid import QuantizedWeight, QuantSpec
from qcompile.runtime.triton import reference as R
from qcompile.runtime.triton.packing import column_bands, pack_from_export
from qcompile.runtime.triton.wq_matmul import gemm_candidates, gemv_candidates, wq_linear


def packed(n, k, bits, sym, group, device, dtype, bias=False, seed=0):
    torch.manual_seed(seed)
    qw = QuantizedWeight.from_float(torch.randn(n, k), QuantSpec(bits=bits, symmetric=sym, group_size=group))
    pw = pack_from_export(qw.qweight, qw.scale, qw.zero, bits=bits, dtype=dtype,
                          bias=torch.randn(n) if bias else None)
    return pw.to(device)


def check(y, ref, rel):
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= rel * ref.float().abs().max().item(), (err, ref.abs().max().item())


# (bits, symmetric, group) over the grid's variety: 2/3-bit in the 4-bit container, per-channel, 8-bit asym
SPECS = [(4, False, 32), (4, True, 64), (3, False, 16), (8, True, 32), (8, False, None)]


@pytest.mark.parametrize("bits,sym,group", SPECS)
def test_gemv_matches_reference(device, bits, sym, group):
    pw = packed(72, 128, bits, sym, group, device, torch.float32, bias=True)
    for m in (1, 3, 8):
        x = torch.randn(m, 128, device=device)
        res = torch.randn(m, 72, device=device)
        check(wq_linear(x, pw, residual=res), R.wq_linear_ref(x, pw, residual=res), 1e-5)


@pytest.mark.parametrize("split", [1, 3, 6])
def test_gemv_split_k_and_partial_tiles(device, split):
    """Explicit configs: N not a multiple of the tile, K splits that do not divide the rows, more splits than
    steps (6 splits of 4 steps: empty programs) -- the last arriving program must still sum every partial once."""
    pw = packed(24, 64, 4, False, 32, device, torch.float32, seed=1)
    x = torch.randn(2, 64, device=device)
    cfg = dict(BLOCK_M=2, BLOCK_N=16, BLOCK_R=2, SPLIT_K=split)
    y1 = wq_linear(x, pw, config=cfg)
    check(y1, R.wq_linear_ref(x, pw), 1e-5)
    assert torch.equal(y1, wq_linear(x, pw, config=cfg))  # counters were reset; same summation order


def test_gemv_outgrown_workspace_stays_allocated(device):
    """When a wider split-K needs a bigger workspace, the outgrown partials and counters stay allocated: a CUDA graph
    captured on them keeps their addresses (freed, the allocator could hand them to another tensor; on the H100 the
    runner's captured decode step then gave NaN logits after a short prompt's prefill, whose M = 5..8 GEMVs grew
    the workspace: ``test_runner.py::test_gpu_cuda_graph_decode_equals_eager`` run after the other GPU tests)."""
    import gc
    import weakref

    from qcompile.runtime.triton.wq_matmul import _Workspace

    pw = packed(24, 64, 4, False, 32, device, torch.float32, seed=1)
    x = torch.randn(2, 64, device=device)
    cfg = dict(BLOCK_M=2, BLOCK_N=16, BLOCK_R=2, SPLIT_K=2)
    y = wq_linear(x, pw, config=cfg)
    part, lock = _Workspace.buffers[str(x.device)]
    old = weakref.ref(part), weakref.ref(lock)
    _Workspace.get(x.device, part.numel() + 1, lock.numel() + 1)
    del part, lock
    gc.collect()
    assert old[0]() is not None and old[1]() is not None
    assert torch.equal(wq_linear(x, pw, config=cfg), y)


@pytest.mark.parametrize("extra", [dict(PDL=True), dict(PREFETCH=True), dict(PDL=True, PREFETCH=True)],
                         ids=["pdl", "prefetch", "pdl-prefetch"])
@pytest.mark.parametrize("m", [1, 2])
def test_gemv_launch_variants_compute_the_same(device, extra, m):
    """PDL (programmatic dependent launch) changes when the kernel may start, and PREFETCH (the first weight tile
    peeled off the loop, read before PDL's wait) when a tile is read, not what is computed: bit-identical to the
    plain launch of the same tiles, including an empty split (3 splits over 4 steps). Under the interpreter PDL is a
    plain launch, so there the test covers the peeled loop; PDL is refused on a GPU older than sm_90."""
    pw = packed(24, 64, 4, False, 32, device, torch.float32, seed=2)
    x = torch.randn(m, 64, device=device)
    cfg = dict(BLOCK_M=m, BLOCK_N=16, BLOCK_R=2, SPLIT_K=3)
    if extra.get("PDL") and device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        with pytest.raises(ValueError, match="sm_90"):
            wq_linear(x, pw, config={**cfg, **extra})
        return
    y = wq_linear(x, pw, config={**cfg, **extra})
    check(y, R.wq_linear_ref(x, pw), 1e-5)
    assert torch.equal(y, wq_linear(x, pw, config=cfg))


def test_wide_gemv_candidates_where_they_fit(monkeypatch):
    """The compiled run's GEMV candidates: wide programs (8-16 warps, 32-64 columns) only for 4-bit codes at batch 1
    (8-bit ones spill registers on the float path), each at two split factors within the K rows; none whose step
    is mostly past K; every split leaves each split at least one step."""
    from qcompile.runtime.triton import wq_matmul

    monkeypatch.setattr(wq_matmul, "interpreting", lambda: False)

    def wide(m, n, k, bits):
        return [c for c in gemv_candidates(m, n, k, bits, 132) if c["num_warps"] >= 8 and c["BLOCK_N"] <= 64]

    big = wide(1, 4096, 14336, 4)
    assert {(c["BLOCK_N"], c["BLOCK_R"], c["num_warps"]) for c in big} == {
        (32, 128, 16), (32, 64, 8), (64, 128, 8), (32, 256, 16), (32, 512, 16)}
    assert {(c["BLOCK_N"], c["BLOCK_R"], c["SPLIT_K"]) for c in big} >= {(32, 128, 1), (32, 64, 4)}
    assert len({tuple(sorted(c.items())) for c in big}) == len(big) == 10
    # at K = 4096 the 512-word step is the whole slice: one step per program, no split
    assert [c["SPLIT_K"] for c in wide(1, 4096, 4096, 4) if c["BLOCK_R"] == 512] == [1]
    assert wide(1, 4096, 4096, 8) == [] and wide(4, 4096, 4096, 4) == []
    for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (576, 576)):
        for c in wide(1, n, k, 4):
            rows = k // 8
            assert c["BLOCK_R"] <= 2 * rows and (c["SPLIT_K"] == 1 or rows // c["SPLIT_K"] >= c["BLOCK_R"]), c
    assert {c["BLOCK_R"] for c in wide(1, 576, 576, 4)} == {64, 128}  # 72 word rows: no 256-row step


def test_gemm_candidates_fit_shared_memory_for_small_8bit_groups(monkeypatch):
    """The candidates a compiled run tunes over: 128-deep K tiles of 8-bit codes in groups smaller than the tile
    pipeline 3 stages (4 need 242-254 KB of shared memory, over Hopper's 227 KiB: aot_check --all); 4-bit codes
    and groups that cover the tile keep their 4 stages."""
    from qcompile.runtime.triton import wq_matmul

    monkeypatch.setattr(wq_matmul, "interpreting", lambda: False)

    def deep(bits, group):
        return {c["num_stages"] for c in gemm_candidates(2048, 4096, 4096, group, False, bits) if c["BLOCK_K"] == 128}

    assert deep(8, 32) == {3} and deep(8, 64) == {3}
    assert deep(8, 128) == deep(4, 32) == {4}
    shallow = [c for c in gemm_candidates(2048, 4096, 4096, 32, False, 8) if c["BLOCK_K"] < 128]
    assert shallow == [c for c in gemm_candidates(2048, 4096, 4096, 32, False, 4) if c["BLOCK_K"] < 128]


def test_gemv_silu_mul_prologue(device):
    pw = packed(48, 64, 4, True, 32, device, torch.float32)
    x = torch.randn(2, 128, device=device)  # gate | up
    res = torch.randn(2, 48, device=device)
    check(wq_linear(x, pw, act="silu_mul", residual=res), R.wq_linear_ref(x, pw, residual=res, act="silu_mul"), 1e-5)


@pytest.mark.parametrize("bits,sym,group", [(4, False, 32), (4, True, 128), (8, True, None), (8, False, 64)])
def test_gemm_matches_reference(device, bits, sym, group):
    pw = packed(80, 256, bits, sym, group, device, torch.float32, bias=True)
    x = torch.randn(37, 256, device=device)
    res = torch.randn(37, 80, device=device)
    check(wq_linear(x, pw, residual=res), R.wq_linear_ref(x, pw, residual=res), 1e-5)
    x2 = torch.randn(21, 128, device=device)  # gate|up through the GEMM path
    pw2 = packed(80, 64, bits, sym, 32 if group else None, device, torch.float32)
    check(wq_linear(x2, pw2, act="silu_mul"), R.wq_linear_ref(x2, pw2, act="silu_mul"), 1e-5)


def test_fp16_activations(device):
    pw = packed(64, 128, 4, False, 32, device, torch.float16)
    for m in (1, 20):
        x = torch.randn(m, 128, device=device, dtype=torch.float16)
        y = wq_linear(x, pw)
        assert y.dtype == torch.float16
        check(y, R.wq_linear_ref(x, pw), 5e-3)


def test_dtype_and_shape_errors(device):
    pw = packed(16, 64, 4, False, 32, device, torch.float32)
    with pytest.raises(ValueError, match="scales are torch.float32"):
        wq_linear(torch.randn(1, 64, device=device, dtype=torch.float16), pw)
    with pytest.raises(ValueError, match="expects 64"):
        wq_linear(torch.randn(1, 32, device=device), pw)


def test_gemv_column_bands_compute_the_same(device):
    """BAND (the words stored in column bands ``[N / BAND, K / 8, BAND]``, a bench variant: each program of BAND
    columns reads one contiguous run) addresses the same words: bit-identical to the plain layout, one band per
    tile, two tiles per band and two bands per tile, with K splits."""
    pw = packed(64, 128, 4, False, 32, device, torch.float32, seed=5)
    x = torch.randn(1, 128, device=device)
    for band, bn in ((16, 16), (32, 16), (32, 32), (16, 32)):
        banded = column_bands(pw, band)
        # word (r, b * band + c) of the plain layout sits at [b, r, c] of the banded one
        assert torch.equal(banded.qweight.view(64 // band, 16, band), pw.qweight.view(16, 64 // band, band)
                           .permute(1, 0, 2))
        for split in (1, 3):
            cfg = dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_R=4, SPLIT_K=split)
            assert torch.equal(wq_linear(x, banded, config=dict(cfg, BAND=band)), wq_linear(x, pw, config=cfg))
    with pytest.raises(ValueError, match="multiple"):
        column_bands(pw, 48)


# -- real shapes (H100) -----------------------------------------------------------------------------------

LLAMA3_8B = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K): q/o, gate/up, down


@pytest.mark.cuda
@pytest.mark.parametrize("n,k", LLAMA3_8B)
@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (8, True)])
def test_gemv_every_config_at_llama_shapes(n, k, bits, sym):
    pw = packed(n, k, bits, sym, 128, "cuda", torch.float16)
    ref_pw = pw.to(dtype=torch.float32)
    for m in (1, 4):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = R.wq_linear_ref(x.float(), ref_pw)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        cands = gemv_candidates(m, n, k, pw.bits, sms)
        if m == 1 and bits == 4:  # the tuner's half2 candidates decode row pairs (PAIRS); the per-word decode too
            cands = cands + [dict(c, PAIRS=True) for c in cands]
        for cfg in cands:
            y = wq_linear(x, pw, config=cfg)
            check(y, ref, 2e-3)
            assert torch.equal(y, wq_linear(x, pw, config=cfg)), cfg  # deterministic split-K


@pytest.mark.cuda
@pytest.mark.parametrize("n,k", LLAMA3_8B)
def test_gemm_every_config_at_llama_shapes(n, k):
    pw = packed(n, k, 4, False, 128, "cuda", torch.float16)
    x = torch.randn(512, k, device="cuda", dtype=torch.float16)
    ref = R.wq_linear_ref(x.float(), pw.to(dtype=torch.float32))
    for cfg in gemm_candidates(512, n, k, 128, False):
        check(wq_linear(x, pw, config=cfg), ref, 2e-3)


@pytest.mark.cuda
def test_gemv_under_cuda_graph():
    pw = packed(4096, 4096, 4, False, 128, "cuda", torch.float16)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    eager = wq_linear(x, pw)  # tunes and sizes the workspace before capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = wq_linear(x, pw)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)


@pytest.mark.cuda
@pytest.mark.parametrize("extra", [dict(PDL=True), dict(PDL=True, PREFETCH=True)], ids=["pdl", "pdl-prefetch"])
def test_gemv_pdl_chain_under_cuda_graph(extra):
    """Three split-K GEMVs, each reading the one before's output and sharing its split-K workspace, launched as
    programmatic dependents inside a CUDA graph: bit-identical to the same chain launched plainly, so each kernel's
    gdc_wait holds its reads of x and its workspace writes until the kernel before has finished (with PREFETCH the
    next kernel is released at once and reads weights before its wait)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    pws = [packed(4096, 4096, 4, False, 128, "cuda", torch.float16, seed=s) for s in range(3)]
    for pw in pws:  # W / 64: each output stays of the input's size (sqrt(4096) = 64), far from fp16's range
        pw.scale.mul_(1 / 64)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    cfg = gemv_candidates(1, 4096, 4096, 4, sms)[0]
    assert cfg["SPLIT_K"] > 1
    outs = [torch.empty(1, 4096, device="cuda", dtype=torch.float16) for _ in pws]

    def chain(extra):  # each GEMV reads the previous output buffer directly: no torch op in between
        y = x
        for pw, out in zip(pws, outs):
            y = wq_linear(y, pw, out=out, config={**cfg, **extra})
        return y.clone()

    plain = chain({})
    assert plain.isfinite().all() and plain.abs().max() > 0.1
    chain(extra)  # compiles before capture
    outs[-1].zero_()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for pw, out, src in zip(pws, outs, [x] + outs[:-1]):
            wq_linear(src, pw, out=out, config={**cfg, **extra})
    for _ in range(3):
        for o in outs:
            o.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(outs[-1], plain)


@pytest.mark.cuda
def test_gemv_prefetch_empty_split():
    """The half2 path (one scale row per step when a step lies in one group) with PREFETCH and an empty split
    (33 splits of 512 word rows: the last starts at row 512): the peeled step of that split must read no scale
    past the tensor. The scales sit in a buffer whose rows beyond them are NaN, so a stray read shows as NaN."""
    from qcompile.runtime.triton._tune import supports_pdl

    n, k = 256, 4096
    pw = packed(n, k, 4, False, 128, "cuda", torch.float16, seed=4)
    rows = pw.scale.shape[0]
    buf = torch.full(((rows + 8) * n,), float("nan"), dtype=torch.float16, device="cuda")
    buf[: rows * n] = pw.scale.reshape(-1)
    pw.scale = buf[: rows * n].view(rows, n)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    cfg = dict(BLOCK_M=1, BLOCK_N=64, BLOCK_R=16, SPLIT_K=33, num_warps=4, num_stages=2)
    plain = wq_linear(x, pw, config=cfg)
    assert plain.isfinite().all()
    check(plain.float(), R.wq_linear_ref(x.float(), pw.to(dtype=torch.float32)), 2e-3)
    for extra in ({"PREFETCH": True}, {"PREFETCH": True, "PDL": True}):
        if extra.get("PDL") and not supports_pdl("cuda"):
            continue
        assert torch.equal(wq_linear(x, pw, config={**cfg, **extra}), plain), extra


def half2_case(sym, group):
    """The half2 GPU tests' layer (1536 x 1152, bias), activation row, residual and fp32 reference."""
    n, k = 1536, 576 * 2
    pw = packed(n, k, 4, sym, group, "cuda", torch.float16, bias=True)
    ref_pw = pw.to(dtype=torch.float32)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    res = torch.randn(1, n, device="cuda", dtype=torch.float16)
    return n, k, pw, ref_pw, sms, x, res, R.wq_linear_ref(x.float(), ref_pw, residual=res.float())


def test_gemv_row_pairs_need_the_half2_path(device):
    """PAIRS is a variant of the half2 decode (inline PTX): refused where that path is off, here fp32 activations
    (and, under the interpreter, every launch)."""
    pw = packed(64, 256, 4, False, 128, device, torch.float32)
    x = torch.randn(1, 256, device=device)
    with pytest.raises(ValueError, match="PAIRS needs"):
        wq_linear(x, pw, config=dict(BLOCK_M=1, BLOCK_N=32, BLOCK_R=16, SPLIT_K=1, PAIRS=True))


def test_gemv_row_pairs_by_default_where_they_apply(monkeypatch):
    """The tuner offers row pairs on the half2 path for groups of a multiple of 16 unless QCOMPILE_GEMV_PAIRS=0,
    and keys their tuning apart from the per-word decode's."""
    from qcompile.runtime.triton import wq_matmul

    pw = packed(64, 256, 4, False, 128, "cpu", torch.float16)
    monkeypatch.delenv("QCOMPILE_GEMV_PAIRS", raising=False)
    assert wq_matmul.gemv_row_pairs(pw, True) and not wq_matmul.gemv_row_pairs(pw, False)
    assert not wq_matmul.gemv_row_pairs(packed(64, 256, 4, False, 8, "cpu", torch.float16), True)
    monkeypatch.setattr(wq_matmul, "interpreting", lambda: False)  # a compiled run: fp16 batch 1 is half2
    x = torch.randn(1, 256, dtype=torch.float16)
    pairs_key = wq_matmul.gemv_tuning_key(x, pw)
    monkeypatch.setenv("QCOMPILE_GEMV_PAIRS", "0")
    assert not wq_matmul.gemv_row_pairs(pw, True)
    words_key = wq_matmul.gemv_tuning_key(x, pw)
    assert pairs_key == words_key + ("pairs",)
    assert wq_matmul.gemv_tuning_key(x, pw, pdl=True) == words_key + ("pdl",)


@pytest.mark.cuda
@pytest.mark.parametrize("sym,group", [(False, 128), (True, 64), (False, 32), (False, 16)])
def test_gemv_row_pairs_match_reference(sym, group):
    """PAIRS (two words of a column per decode, the scale applied per group in fp32, activations pre-scaled by
    1/32): every candidate tile against the fp32 reference, one group per step (128, 64) and several (32, 16),
    symmetric and not, bias and residual; bit-identical as PDL + PREFETCH launches; the SwiGLU prologue;
    outlier activations in the thousands (the half2 sums must stay finite); and an empty split whose peeled step must
    read no scale past the tensor (the rows beyond it are NaN)."""
    from qcompile.runtime.triton._tune import supports_pdl

    n, k, pw, ref_pw, sms, x, res, ref = half2_case(sym, group)
    for cfg in gemv_candidates(1, n, k, 4, sms):
        y = wq_linear(x, pw, residual=res, config=dict(cfg, PAIRS=True))
        check(y, ref, 2e-3)
        if supports_pdl("cuda"):
            assert torch.equal(wq_linear(x, pw, residual=res, config=dict(cfg, PAIRS=True, PDL=True, PREFETCH=True)),
                               y), cfg
    first = dict(gemv_candidates(1, n, k, 4, sms)[0], PAIRS=True)
    gu = torch.randn(1, 2 * k, device="cuda", dtype=torch.float16)
    check(wq_linear(gu, pw, act="silu_mul", config=first), R.wq_linear_ref(gu.float(), ref_pw, act="silu_mul"), 2e-3)
    big = x.clone()
    big[0, ::97] = 2000  # outlier channels in the thousands (the output stays within fp16)
    y_big = wq_linear(big, pw, config=first)
    assert y_big.isfinite().all()
    check(y_big, R.wq_linear_ref(big.float(), ref_pw), 2e-3)
    if group == 128:
        rows = pw.scale.shape[0]
        buf = torch.full(((rows + 8) * n,), float("nan"), dtype=torch.float16, device="cuda")
        buf[: rows * n] = pw.scale.reshape(-1)
        pw.scale = buf[: rows * n].view(rows, n)
        cfg = dict(BLOCK_M=1, BLOCK_N=64, BLOCK_R=16, SPLIT_K=12, num_warps=4, num_stages=2, PAIRS=True)  # 9 steps
        plain = wq_linear(x, pw, config=cfg)
        check(plain, R.wq_linear_ref(x.float(), ref_pw), 2e-3)
        if supports_pdl("cuda"):
            assert torch.equal(wq_linear(x, pw, config=dict(cfg, PREFETCH=True, PDL=True)), plain)


@pytest.mark.cuda
@pytest.mark.parametrize("sym,group", [(False, 128), (True, 64), (False, 32)])
def test_gemv_half2_path_matches_float_path(sym, group):
    """The half2 decode (inline PTX, fp16 products summed four to a lane) against the float-mantissa path and the
    fp32 reference: one group per step (128, 64) and several (32), symmetric and not, bias, residual, the SwiGLU
    prologue, and activations that start 2 bytes past an aligned address (which must take the float path)."""
    n, k, pw, ref_pw, sms, x, res, ref = half2_case(sym, group)
    for cfg in gemv_candidates(1, n, k, 4, sms):
        y = wq_linear(x, pw, residual=res, config=dict(cfg, HALF2=True))
        check(y, ref, 2e-3)
        y_float = wq_linear(x, pw, residual=res, config=dict(cfg, HALF2=False))
        check(y, y_float, 2e-3)
    gu = torch.randn(1, 2 * k, device="cuda", dtype=torch.float16)
    ref_act = R.wq_linear_ref(gu.float(), ref_pw, act="silu_mul")
    check(wq_linear(gu, pw, act="silu_mul", config=dict(gemv_candidates(1, n, k, 4, sms)[0], HALF2=True)),
          ref_act, 2e-3)
    buf = torch.randn(k + 1, device="cuda", dtype=torch.float16)
    x_odd = buf[1:].view(1, k)  # 2-byte aligned: the int32 activation loads would fault
    check(wq_linear(x_odd, pw), R.wq_linear_ref(x_odd.float(), ref_pw), 2e-3)


@pytest.mark.cuda
def test_gemm_output_past_two_to_the_31_elements():
    """All the prompt's logits over a large vocabulary: M x N >= 2^31 outputs, so the epilogue's row offsets must
    not wrap in int32 (the last rows landed on the first ones when they did)."""
    n, k, m = 131200, 64, 16384  # M x N = 2.15e9 > 2^31
    pw = packed(n, k, 4, False, 32, "cuda", torch.float16)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    y = wq_linear(x, pw)
    for rows in (slice(0, 2), slice(m - 2, m)):
        ref = R.wq_linear_ref(x[rows].float(), pw.to(dtype=torch.float32))
        check(y[rows], ref, 2e-3)


def test_gemm_reads_activation_rows_past_two_to_the_31_elements(device):
    """A row tile of activations starting past 2^31 elements (75k tokens of a 28672-wide MLP input): its offset is
    taken in int64 (in int32 the load landed outside the tensor)."""
    run_in_subprocess("wq_gemm", device)
