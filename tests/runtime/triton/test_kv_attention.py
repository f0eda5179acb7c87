"""RoPE + quantized KV-cache store and split-K decode attention against the torch reference."""

import math

import pytest
import torch

from rows_past_int32 import run_in_subprocess

from qcompile.runtime.triton import reference as R
from qcompile.runtime.triton import kv_attention
from qcompile.runtime.triton.kv_attention import LOG2E, KVCache, decode_attention, rope_store


def tables(s, d, device):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.arange(s).float()[:, None] * inv[None]
    return ang.cos().contiguous().to(device), ang.sin().contiguous().to(device)


def float_view(cache: KVCache, prefix):
    """The cache as float [B, Hkv, S, D] tensors, dequantized by the reference."""
    if cache.bits == 16:
        return cache.k_float.float().cpu(), cache.v_float.float().cpu()
    unpack = R.unpack_kv_int4 if cache.bits == 4 else (lambda t: t.int())
    c = {k: getattr(cache, k).cpu() for k in ("k_q", "v_q", "k_scale", "k_zero", "v_scale", "v_zero", "k_float",
                                              "v_float")}
    k = R.mixed_cache_ref(c["k_float"], unpack(c["k_q"]), c["k_scale"], c["k_zero"], prefix.cpu())
    v = R.mixed_cache_ref(c["v_float"], unpack(c["v_q"]), c["v_scale"], c["v_zero"], prefix.cpu())
    return k, v


@pytest.mark.parametrize("bits,sym,clip", [(16, False, 1.0), (8, False, 1.0), (4, False, 0.9), (4, True, 1.0)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_store_writes_the_reference_cache(device, bits, sym, clip, qk_norm):
    torch.manual_seed(0)
    b, t, nh, nkv, d, s = 2, 6, 4, 2, 32, 16
    cos, sin = tables(s, d, device)
    cache = KVCache.allocate(b, nkv, d, s, bits, prefix_capacity=4, dtype=torch.float32, device=device,
                             symmetric=sym, clip_ratio=clip)
    prefix = torch.tensor([3, 0], dtype=torch.int32, device=device)
    qkv = torch.randn(b * t, (nh + 2 * nkv) * d, device=device) * 2
    pos = (torch.arange(t) + 5).repeat(b).to(torch.int32).to(device)  # writes at positions 5..10
    qn = torch.rand(d, device=device) + 0.5 if qk_norm else None
    kn = torch.rand(d, device=device) + 0.5 if qk_norm else None
    q, k, v = rope_store(qkv, pos, t, cos, sin, cache, prefix, nh, nkv, q_norm=qn, k_norm=kn, eps=1e-6, out_kv=True)

    x = qkv.cpu().view(b * t, nh + 2 * nkv, d)
    c, s_ = cos.cpu()[pos.long().cpu()][:, None], sin.cpu()[pos.long().cpu()][:, None]
    qr, kr = x[:, :nh], x[:, nh:nh + nkv]
    if qk_norm:
        qr, kr = R.rms_norm_ref(qr, qn.cpu(), 1e-6), R.rms_norm_ref(kr, kn.cpu(), 1e-6)
    qr, kr, vr = R.rope_ref(qr, c, s_), R.rope_ref(kr, c, s_), x[:, nh + nkv:]
    torch.testing.assert_close(q.cpu(), qr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.cpu(), kr, rtol=1e-5, atol=1e-5)
    assert torch.equal(v.cpu(), vr)

    kview, vview = float_view(cache, prefix)
    kref = kr.view(b, t, nkv, d).transpose(1, 2)
    vref = vr.view(b, t, nkv, d).transpose(1, 2)
    for bi in range(b):
        for j, p in enumerate(range(5, 5 + t)):
            quantized = bits < 16 and p >= int(prefix[bi])
            # a quantized entry is within one step of the value (clipping aside); a float one is exact
            tol_k = cache.k_scale[bi, :, p].cpu()[:, None] / clip + 1e-6 if quantized else 1e-5
            tol_v = cache.v_scale[bi, :, p].cpu()[:, None] / clip + 1e-6 if quantized else 0
            if clip < 1:  # clipped values saturate: only check the ones inside the clipped range
                continue
            assert ((kview[bi, :, p] - kref[bi, :, j]).abs() <= tol_k).all()
            assert ((vview[bi, :, p] - vref[bi, :, j]).abs() <= tol_v).all()
    if bits < 16:  # codes are exactly the reference quantizer's
        codes, scale, zero = R.kv_quantize_ref(kref[1], bits, sym, clip)
        got = cache.k_q[1, :, 5:5 + t].cpu()
        got = R.unpack_kv_int4(got) if bits == 4 else got.int()
        assert torch.equal(got, codes)
        torch.testing.assert_close(cache.k_scale[1, :, 5:5 + t].cpu(), scale)
        assert cache.k_zero.dtype == torch.uint8 and torch.equal(cache.k_zero[1, :, 5:5 + t].cpu().float(), zero)


def fill_cache(cache: KVCache, prefix, seed=0):
    """Random keys/values written as the reference quantizer would (the kernel's own store is tested above)."""
    g = torch.Generator().manual_seed(seed)
    b, nkv, s, d = cache.k_float.shape[0], cache.kv_heads, cache.max_len, cache.head_dim
    k, v = (torch.randn(b, nkv, s, d, generator=g) * 2 for _ in range(2))
    cap = cache.prefix_capacity
    if cache.bits == 16:
        cache.k_float.copy_(k.to(cache.k_float.dtype)), cache.v_float.copy_(v.to(cache.v_float.dtype))
        return
    for x, fl, q, sc, zp in ((k, cache.k_float, cache.k_q, cache.k_scale, cache.k_zero),
                             (v, cache.v_float, cache.v_q, cache.v_scale, cache.v_zero)):
        codes, scale, zero = R.kv_quantize_ref(x, cache.bits)
        q.copy_(R.pack_kv_int4(codes) if cache.bits == 4 else codes.to(torch.uint8))
        sc.copy_(scale), zp.copy_(zero)
        fl.copy_(x[:, :, :cap].to(fl.dtype))


def decode_case(device, bits, d, dtype, seed):
    """Two sequences (lengths 37 and 11; a float prefix of 5 that ends inside a block, and none) over 2 kv heads
    with 3 query heads each: q, the filled cache, lens, prefix and the cache's float view."""
    torch.manual_seed(seed)
    b, nkv, g, s = 2, 2, 3, 40
    cache = KVCache.allocate(b, nkv, d, s, bits, prefix_capacity=8, dtype=dtype, device=device)
    lens = torch.tensor([37, 11], dtype=torch.int32, device=device)
    prefix = torch.tensor([5, 0], dtype=torch.int32, device=device)
    fill_cache(cache, prefix)
    kview, vview = float_view(cache, prefix)
    q = torch.randn(b, nkv * g, d, device=device, dtype=dtype)
    return q, cache, lens, prefix, kview, vview


@pytest.mark.parametrize("bits,d", [(16, 32), (8, 32), (4, 32), (4, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_matches_reference(device, bits, d, dtype):
    """Head dim 32: tensor-core dots; 16: the broadcast path. GQA 3 query heads per kv head, a float prefix that
    ends inside a block, split counts that leave some splits empty, and a sliding window."""
    q, cache, lens, prefix, kview, vview = decode_case(device, bits, d, dtype, seed=1)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    for window, splits in ((0, 1), (0, 8), (9, 2)):
        out = decode_attention(q, cache, lens, prefix, num_splits=splits, window=window)
        ref = R.decode_attention_ref(q.cpu().float(), kview, vview, lens.cpu(), window=window or None)
        torch.testing.assert_close(out.cpu().float(), ref, rtol=0, atol=tol, msg=f"window {window} splits {splits}")


def test_quantized_attention_error_shrinks_with_bits(device):
    """Against float attention over the same keys: the 8-bit cache errs ~16x less than the 4-bit one (step sizes
    255 vs 15 per range) and stays small against the output."""
    torch.manual_seed(2)
    b, nkv, d, s, t = 1, 2, 32, 32, 30
    lens = torch.tensor([t], dtype=torch.int32, device=device)
    prefix = torch.zeros(1, dtype=torch.int32, device=device)
    q = torch.randn(b, nkv * 2, d, device=device)
    errs = {}
    for bits in (16, 8, 4):
        cache = KVCache.allocate(b, nkv, d, s, bits, dtype=torch.float32, device=device)
        fill_cache(cache, prefix, seed=7)
        errs[bits] = decode_attention(q, cache, lens, prefix)
    e8 = (errs[8] - errs[16]).abs().max().item()
    e4 = (errs[4] - errs[16]).abs().max().item()
    assert e8 < e4 / 4 and e8 < 0.05 * errs[16].abs().max().item()


@pytest.mark.parametrize("bits,sym,clip", [(8, False, 1.0), (4, False, 0.9), (4, True, 1.0), (8, True, 0.8)])
def test_kv_quantizer_is_the_graphs_fake_quantization(bits, sym, clip):
    """The cache stores exactly the grid values qcompile.quant.activations.fake_quantize_tokens (and so the
    exported graph's KV fake quantization) computes."""
    activations = pytest.importorskip("qcompile.quant.activations")
    x = torch.randn(3, 5, 64) * torch.linspace(0.01, 10, 5)[:, None]
    x[0, 0] = 0
    spec = activations.TokenQuantSpec(bits=bits, symmetric=sym, group_size=None, clip_ratio=clip)
    assert torch.equal(R.kv_dequantize_ref(*R.kv_quantize_ref(x, bits, sym, clip)),
                       activations.fake_quantize_tokens(x, spec))


def test_cache_refuses_bad_geometry():
    with pytest.raises(ValueError, match="power of two"):
        KVCache.allocate(1, 1, 48, 8, 8, device="cpu")
    with pytest.raises(ValueError, match="16, 8 or 4"):
        KVCache.allocate(1, 1, 64, 8, 2, device="cpu")
    # the kernels index a layer's cache in int32: refused before anything is allocated
    with pytest.raises(ValueError, match="exceeds 2\\^31 entries"):
        KVCache.allocate(64, 8, 128, 131072, 8, device="cpu")  # batch, kv heads, head_dim, max_len, bits


# -- real shapes ------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("length", [8192, 32768])
def test_llama3_8b_decode_attention(bits, length):
    torch.manual_seed(3)
    nh, nkv, d, prefix_len = 32, 8, 128, 300
    cache = KVCache.allocate(1, nkv, d, length, bits, prefix_capacity=512, dtype=torch.float16, device="cuda")
    lens = torch.tensor([length], dtype=torch.int32, device="cuda")
    prefix = torch.tensor([prefix_len], dtype=torch.int32, device="cuda")
    cos, sin = tables(length, d, "cuda")
    for start in range(0, length, 4096):  # fill in chunks: rope_store writes any positions
        n = min(4096, length - start)
        qkv = torch.randn(n, (nh + 2 * nkv) * d, device="cuda", dtype=torch.float16)
        pos = torch.arange(start, start + n, dtype=torch.int32, device="cuda")
        rope_store(qkv, pos, n, cos, sin, cache, prefix, nh, nkv)
    q = torch.randn(1, nh, d, device="cuda", dtype=torch.float16)
    out = decode_attention(q, cache, lens, prefix)
    if bits == 16:
        k, v = cache.k_float[:, :, :length], cache.v_float[:, :, :length]
    else:
        unpack = R.unpack_kv_int4 if bits == 4 else (lambda t: t.int())
        k = R.mixed_cache_ref(cache.k_float, unpack(cache.k_q), cache.k_scale, cache.k_zero, prefix)
        v = R.mixed_cache_ref(cache.v_float, unpack(cache.v_q), cache.v_scale, cache.v_zero, prefix)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float()[:, :, None], k.float(), v.float(), enable_gqa=True, scale=1 / math.sqrt(d))[:, :, 0]
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_every_decode_candidate_computes_the_same_attention(bits):
    """Each configuration the tuner may pick (the launch variants with unpadded query rows and PDL included), at a
    Llama-3-8B decode shape on the codes: the same attention as the first candidate, within fp16 accumulation."""
    torch.manual_seed(4)
    nh, nkv, d, length = 32, 8, 128, 8192
    cache = KVCache.allocate(1, nkv, d, length, bits, prefix_capacity=64, dtype=torch.float16, device="cuda")
    lens = torch.tensor([length - 5], dtype=torch.int32, device="cuda")
    prefix = torch.tensor([40], dtype=torch.int32, device="cuda")
    cos, sin = tables(length, d, "cuda")
    qkv = torch.randn(length, (nh + 2 * nkv) * d, device="cuda", dtype=torch.float16)
    rope_store(qkv, torch.arange(length, dtype=torch.int32, device="cuda"), length, cos, sin, cache, prefix, nh, nkv)
    q = torch.randn(1, nh, d, device="cuda", dtype=torch.float16)
    cands = kv_attention.decode_candidates(1, nkv, length, "cuda", False, d, group=nh // nkv, on_codes=True)
    assert any("GP" in c for c in cands)
    first = decode_attention(q, cache, lens, prefix, config=cands[0]).float()
    for cfg in cands[1:]:
        out = decode_attention(q, cache, lens, prefix, config=cfg).float()
        # the candidates differ in summation order only: 1.5e-5 to 4.6e-5 apart at 32k on the H100 (the sweep)
        torch.testing.assert_close(out, first, rtol=0, atol=3e-4, msg=str(cfg))


@pytest.mark.parametrize("bits,sym", [(16, False), (8, True), (4, False)])
def test_store_kv_writes_what_rope_store_writes(device, bits, sym):
    """RoPE without a store, then ``store_kv`` of the rotated k/v (the runner's R3 path): the same cache bytes as
    ``rope_store`` storing directly, and an untouched cache after the store-less call."""
    from qcompile.runtime.triton.kv_attention import store_kv

    torch.manual_seed(1)
    b, t, nh, nkv, d, s = 1, 5, 4, 2, 16, 12
    cos, sin = tables(s, d, device)
    prefix = torch.tensor([2], dtype=torch.int32, device=device)
    qkv = torch.randn(b * t, (nh + 2 * nkv) * d, device=device) * 2
    pos = torch.arange(t, dtype=torch.int32, device=device) + 3
    caches = [KVCache.allocate(b, nkv, d, s, bits, prefix_capacity=4, dtype=torch.float32, device=device,
                               symmetric=sym) for _ in range(2)]
    rope_store(qkv, pos, t, cos, sin, caches[0], prefix, nh, nkv)
    q, k, v = rope_store(qkv, pos, t, cos, sin, caches[1], prefix, nh, nkv, out_kv=True, store=False)
    assert all(not x.any() for x in (caches[1].k_float, caches[1].k_q, caches[1].v_scale))
    store_kv(k, v, pos, t, caches[1], prefix)
    for name in ("k_float", "v_float", "k_q", "v_q", "k_scale", "k_zero", "v_scale", "v_zero"):
        assert torch.equal(getattr(caches[0], name), getattr(caches[1], name)), name


@pytest.mark.parametrize("bits", [16, 4])
def test_clear_returns_the_allocated_state(device, bits):
    """The CUDA runner clears its caches after the warm-up steps before graph capture (they store position 0 and
    1 with no float prefix set); ``clear`` must leave exactly what ``allocate`` gives."""
    cache = KVCache.allocate(1, 2, 16, 12, bits, prefix_capacity=4, dtype=torch.float32, device=device)
    fresh = KVCache.allocate(1, 2, 16, 12, bits, prefix_capacity=4, dtype=torch.float32, device=device)
    fill_cache(cache, torch.tensor([3], dtype=torch.int32))
    assert cache.k_float.abs().sum() > 0
    cache.clear()
    for name in ("k_float", "v_float", "k_q", "v_q", "k_scale", "k_zero", "v_scale", "v_zero"):
        assert torch.equal(getattr(cache, name), getattr(fresh, name)), name


@pytest.mark.parametrize("bits", [8, 4])
def test_decode_attention_with_unpadded_query_rows(device, bits):
    """The bench variant GP = G rounded to a power of two (4 rows for 3 query heads) instead of 16 computes the same
    attention; a GP below the group size or not a power of two is refused."""
    q, cache, lens, prefix, kview, vview = decode_case(device, bits, 32, torch.float32, seed=2)
    cfg = dict(BLOCK_S=16, SPLITS=2, GP=4, COMBINE_WARPS=8)
    out = decode_attention(q, cache, lens, prefix, config=cfg)
    ref = R.decode_attention_ref(q.cpu().float(), kview, vview, lens.cpu())
    torch.testing.assert_close(out.cpu().float(), ref, rtol=0, atol=1e-5)
    for bad in (2, 6):
        with pytest.raises(ValueError, match="power of two"):
            decode_attention(q, cache, lens, prefix, config={**cfg, "GP": bad})


@pytest.mark.parametrize("dc", [4, 8])
def test_decode_attention_combine_in_column_chunks(device, dc):
    """COMBINE_DC: the split combine in chunks of the head's columns (more, smaller programs) gives the very same
    output as one program per row; a chunk that does not divide head_dim or is not a power of two is refused."""
    q, cache, lens, prefix, kview, vview = decode_case(device, 8, 32, torch.float32, seed=3)
    cfg = dict(BLOCK_S=16, SPLITS=3)
    whole = decode_attention(q, cache, lens, prefix, config=cfg)
    chunked = decode_attention(q, cache, lens, prefix, config={**cfg, "COMBINE_DC": dc})
    assert torch.equal(chunked, whole)
    ref = R.decode_attention_ref(q.cpu().float(), kview, vview, lens.cpu())
    torch.testing.assert_close(chunked.cpu().float(), ref, rtol=0, atol=1e-5)
    for bad in (0, 3, 2 * q.shape[-1]):
        with pytest.raises(ValueError, match="COMBINE_DC"):
            decode_attention(q, cache, lens, prefix, config={**cfg, "COMBINE_DC": bad})


@pytest.mark.parametrize("dc", [32, 8])
def test_decode_attention_writes_the_outputs_digit_planes(device, dc):
    """``planes``: one sequence's output [Hq x D] also as ``gemv_digits.digit_planes`` (rows 0-5; 6 and 7 left as
    they were), whole rows or in column chunks of the combine; the output itself unchanged. Refused for two
    sequences or float32."""
    from qcompile.runtime.triton.gemv_digits import PLANES, digit_planes

    q, cache, lens, prefix, _, _ = decode_case(device, 8, 32, torch.float16, seed=5)
    q, lens, prefix = q[:1].contiguous(), lens[:1], prefix[:1]  # 6 heads x 32 = 192 outputs
    cache1 = KVCache.allocate(1, 2, 32, 40, 8, prefix_capacity=8, dtype=torch.float16, device=device)
    fill_cache(cache1, prefix)
    noise = torch.randint(-128, 128, (8, 192), generator=torch.Generator().manual_seed(6), dtype=torch.int8)
    planes = noise.to(device)
    cfg = dict(BLOCK_S=16, SPLITS=3, COMBINE_DC=dc)
    out = decode_attention(q, cache1, lens, prefix, config=cfg, planes=planes)
    assert torch.equal(out, decode_attention(q, cache1, lens, prefix, config=cfg))
    assert torch.equal(planes[:PLANES].cpu(), digit_planes(out.reshape(-1).cpu())[:PLANES])
    assert torch.equal(planes[PLANES:].cpu(), noise[PLANES:])
    with pytest.raises(ValueError, match="one fp16 sequence"):
        decode_attention(q.float(), cache, lens, prefix, config=cfg, planes=planes)


@pytest.mark.parametrize("pdl", [False, True])
def test_decode_candidates_offer_unpadded_rows_where_the_attention_runs_on_codes(monkeypatch, pdl):
    """The tuner's candidates as a compiled run sees them: on codes with a group below 16 rows, the unpadded
    variants (GP = the group rounded up to a power of two, at least 4; an 8-warp combine in 32-column chunks) follow
    the padded grid, PDL only where the device has it; never QK_I8 (it changes the result); none for fp32, the
    float cache, or a group that fills the 16 rows anyway."""
    monkeypatch.setattr(kv_attention, "interpreting", lambda: False)
    monkeypatch.setattr(kv_attention, "supports_pdl", lambda device: pdl)
    monkeypatch.setattr("qcompile.runtime.triton._tune.num_sms", lambda device: 132)  # an H100's

    def cands(group, on_codes=True, fp32=False):
        return kv_attention.decode_candidates(1, 8, 32768, "cpu", fp32, 128, group=group, on_codes=on_codes)

    padded = cands(4, on_codes=False)
    assert padded and all("GP" not in c and "PDL" not in c for c in padded)
    for group, rows in ((1, 4), (3, 4), (4, 4), (5, 8), (8, 8)):
        c = cands(group)
        assert c[:len(padded)] == padded  # the padded grid first, unchanged
        extra = c[len(padded):]
        assert len(extra) == (5 if pdl else 2)
        assert all(e["GP"] == rows and e["COMBINE_WARPS"] == 8 and e["COMBINE_DC"] == 32 for e in extra)
        assert sum(bool(e.get("PDL")) for e in extra) == (3 if pdl else 0)
        if pdl:  # twice the default splits (2 x 66 on 132 SMs) and that rounded down to a power of two
            assert [e["SPLITS"] for e in extra if e.get("PDL")] == [132, 181, 128]
        assert all(e["SPLITS"] <= 256 and e["SPLITS"] <= 32768 // e["BLOCK_S"] for e in c)
        assert not any(e.get("QK_I8") for e in c)
    assert cands(16) == padded
    assert cands(3, fp32=True) == cands(3, on_codes=False, fp32=True) and len(cands(3, fp32=True)) == 1


def int8_query_attention_ref(q, kview, vview, lens, prefix):
    """What QK_I8 computes, in float64: scores against the quantized part from q rounded per row to int8 (after the
    kernel's fp16 pre-scaling by sm_scale * log2 e), against the float prefix from q as it is."""
    d = q.shape[-1]
    scale = LOG2E / math.sqrt(d)
    q1 = (q.float() * scale).half().double()
    qsc = q1.abs().amax(-1, keepdim=True) / 127
    qi = torch.round(q1 / qsc) * qsc
    b, hq, _ = q.shape
    g = hq // kview.shape[1]
    out = torch.empty(b, hq, d, dtype=torch.float64)
    for i in range(b):
        n, p = int(lens[i]), int(prefix[i])
        k = kview[i, :, :n].double().repeat_interleave(g, 0)
        v = vview[i, :, :n].double().repeat_interleave(g, 0)
        s = torch.where(torch.arange(n) < p, torch.einsum("hd,hsd->hs", q1[i], k),
                        torch.einsum("hd,hsd->hs", qi[i], k))
        out[i] = torch.einsum("hs,hsd->hd", torch.softmax(s / LOG2E, -1), v)
    return out.float()


@pytest.mark.parametrize("bits", [8, 4])
def test_decode_attention_with_int8_query_key_dots(device, bits):
    """The bench variant QK_I8 (Q.K on int8 tensor cores: q rounded per row to int8, the key codes as they are,
    8-bit codes shifted into int8) computes attention with exactly that rounding of q and nothing else: it matches a
    float64 model of it as closely as the fp16 path matches exact attention (the P.V dot rounds P to fp16 in both),
    while exact attention is further away. It is refused where the attention does not run on the codes."""
    q, cache, lens, prefix, kview, vview = decode_case(device, bits, 32, torch.float16, seed=3)
    cfg = dict(BLOCK_S=16, SPLITS=2, GP=4)
    exact = R.decode_attention_ref(q.cpu().float(), kview, vview, lens.cpu())
    model = int8_query_attention_ref(q.cpu(), kview, vview, lens.cpu(), prefix.cpu())
    fp16 = decode_attention(q, cache, lens, prefix, config=cfg).cpu().float()
    i8 = decode_attention(q, cache, lens, prefix, config={**cfg, "QK_I8": True, "PDL": True}).cpu().float()
    torch.testing.assert_close(fp16, exact, rtol=0, atol=4e-3)
    torch.testing.assert_close(i8, model, rtol=0, atol=4e-3)
    assert (i8 - exact).abs().max().item() > 1e-2  # q's int8 rounding is visible: the int8 dots really ran
    with pytest.raises(ValueError, match="QK_I8"):
        decode_attention(q.float(), KVCache.allocate(2, 2, 32, 40, bits, prefix_capacity=8, dtype=torch.float32,
                                                     device=device), lens, prefix, config={**cfg, "QK_I8": True})


def test_rope_store_reads_rows_past_two_to_the_31_elements(device):
    """qkv rows starting past 2^31 elements: q, k, v and the cache written as from a small tensor."""
    run_in_subprocess("rope_store", device)
