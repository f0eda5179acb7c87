"""KV cache with a float prefix and a quantized rest; RoPE + cache store; split-K decode attention (GQA).

Cache of one layer (``KVCache``), positions indexed absolutely:

* positions ``< prefix[b]`` live in the float prefix ``k_float/v_float`` [B, Hkv, P_cap, D] (BiSup's prompt mixed
  precision: the system prompt's keys and values, and the attention sinks with them, stay in high precision);
* the rest in ``k_q/v_q`` [B, Hkv, S, D] uint8 (8-bit) or [B, Hkv, S, D/2] (4-bit), quantized per token per head
  over D with the arithmetic of ``qcompile.quant.activations.fake_quantize_tokens`` (asymmetric with an integer
  zero point and a range that contains 0, or symmetric; optional clip ratio; ties-to-even rounding), so the cache
  holds exactly the grid values the graph's KV fake quantization computes: ``x = (code - zero) * scale``
  (``scale`` float32 [B, Hkv, S]; ``zero`` uint8 [B, Hkv, S], an integer in [0, 2^b - 1] by construction, so a
  byte holds it exactly and a decode step reads 6 bytes less per token and KV head (K's and V's) than float32;
  symmetric codes are stored offset by 2^(b-1)). 4-bit codes are packed
  ``byte[j] = code[j] | code[j + D/2] << 4``: the two halves RoPE already splits, so every load is contiguous;
* ``bits=16`` keeps everything in the float buffers (P_cap = S, prefix = S): the unquantized cache.

``rope_store`` (one program per token and head) applies the optional per-head q/k RMSNorm (Qwen3) and RoPE,
writes q out, and writes k/v into the cache, quantizing in registers when the position is past the prefix.

``decode_attention`` is flash-decoding: the grid is (B * Hkv) x splits; each program walks one slice of the
sequence for one KV head and all ``G = Hq / Hkv`` query heads that share it (K/V are read once per group; the
group is padded to 16 rows for tensor-core dots, or rounded up to a power of two by a tuner candidate), first
over the float prefix, then over the quantized part (dequantized in registers), with an online softmax in base 2;
a second kernel merges the splits. The sequence length is read from a device tensor, so the launch has a fixed
grid and can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qcompile.runtime.triton._env import interpreting, require_triton
from qcompile.runtime.triton._tune import Tuner, launch_opts, pdl_flag, supports_pdl

triton = require_triton()
import triton.language as tl  # noqa: E402

from qcompile.runtime.triton._jit import (MIN_SCALE, check_planes, round_half_even, row_ptr,  # noqa: E402
                                          store_digit_planes)
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: E402

LOG2E = 1.4426950408889634


@dataclass
class KVCache:
    """One layer's static cache (see the module docstring)."""

    bits: int
    k_float: torch.Tensor
    v_float: torch.Tensor
    k_q: torch.Tensor
    v_q: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    symmetric: bool = False
    clip_ratio: float = 1.0

    @classmethod
    def allocate(cls, batch: int, kv_heads: int, head_dim: int, max_len: int, bits: int = 16,
                 prefix_capacity: int = 0, dtype: torch.dtype = torch.float16, device="cuda",
                 symmetric: bool = False, clip_ratio: float = 1.0) -> KVCache:
        if bits not in (16, 8, 4):
            raise ValueError(f"KV bits must be 16, 8 or 4, got {bits}")
        if head_dim & (head_dim - 1) or head_dim < 4:
            raise ValueError(f"head_dim must be a power of two >= 4, got {head_dim}")
        if batch * kv_heads * max_len * head_dim >= 2**31:  # the kernels index the cache in int32
            raise ValueError(f"a KV cache of {batch} x {kv_heads} heads x {max_len} positions x {head_dim} exceeds "
                             f"2^31 entries a layer: use a smaller batch or max_len")
        cap = max_len if bits == 16 else max(1, min(prefix_capacity, max_len))
        fshape = (batch, kv_heads, cap, head_dim)
        if bits == 16:
            qshape, sshape = (1,), (1,)
        else:
            qshape = (batch, kv_heads, max_len, head_dim if bits == 8 else head_dim // 2)
            sshape = (batch, kv_heads, max_len)

        def z(shape, dt):
            return torch.zeros(shape, dtype=dt, device=device)

        if not 0 < clip_ratio <= 1:
            raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
        return cls(bits, z(fshape, dtype), z(fshape, dtype), z(qshape, torch.uint8), z(qshape, torch.uint8),
                   z(sshape, torch.float32), z(sshape, torch.uint8), z(sshape, torch.float32),
                   z(sshape, torch.uint8), bool(symmetric), float(clip_ratio))

    def clear(self) -> None:
        """Back to the state ``allocate`` returns (every code, scale, zero point and float entry zero)."""
        for t in (self.k_float, self.v_float, self.k_q, self.v_q, self.k_scale, self.k_zero, self.v_scale,
                  self.v_zero):
            t.zero_()

    @property
    def prefix_capacity(self) -> int:
        return self.k_float.shape[2]

    @property
    def max_len(self) -> int:
        return self.k_float.shape[2] if self.bits == 16 else self.k_q.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k_float.shape[3]

    @property
    def kv_heads(self) -> int:
        return self.k_float.shape[1]


# -- kernels ---------------------------------------------------------------------------------------------


@triton.jit
def _rms(x1, x2, w_ptr, half, eps, D: tl.constexpr):
    r = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / D + eps)
    w1 = tl.load(w_ptr + half).to(tl.float32)
    w2 = tl.load(w_ptr + D // 2 + half).to(tl.float32)
    return x1 * r * w1, x2 * r * w2


@triton.jit
def _kv_quant_store(x1, x2, q_ptr, s_ptr, z_ptr, idx, half, clip, D: tl.constexpr, BITS: tl.constexpr,
                    SYM: tl.constexpr):
    """Quantize one token's head (halves x1, x2) as qcompile.quant.activations does, store codes/scale/zero."""
    if SYM:
        QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
        MID: tl.constexpr = 1 << (BITS - 1)
        amax = tl.maximum(tl.max(tl.abs(x1), axis=0), tl.max(tl.abs(x2), axis=0))
        scale = tl.maximum(tl.div_rn(amax * clip, QMAX), MIN_SCALE)
        zero = scale * 0.0 + MID
        c1 = tl.minimum(tl.maximum(round_half_even(tl.div_rn(x1, scale)), -MID), QMAX) + MID
        c2 = tl.minimum(tl.maximum(round_half_even(tl.div_rn(x2, scale)), -MID), QMAX) + MID
    else:
        QMAX: tl.constexpr = (1 << BITS) - 1
        hi = tl.maximum(tl.maximum(tl.max(x1, axis=0), tl.max(x2, axis=0)), 0.0) * clip
        lo = tl.minimum(tl.minimum(tl.min(x1, axis=0), tl.min(x2, axis=0)), 0.0) * clip
        scale = tl.maximum(tl.div_rn(hi - lo, QMAX), MIN_SCALE)
        zero = round_half_even(tl.div_rn(-lo, scale))
        c1 = tl.minimum(tl.maximum(round_half_even(tl.div_rn(x1, scale)) + zero, 0.0), QMAX)
        c2 = tl.minimum(tl.maximum(round_half_even(tl.div_rn(x2, scale)) + zero, 0.0), QMAX)
    c1 = c1.to(tl.int32)
    c2 = c2.to(tl.int32)
    if BITS == 8:
        tl.store(q_ptr + idx * D + half, c1.to(tl.uint8))
        tl.store(q_ptr + idx * D + D // 2 + half, c2.to(tl.uint8))
    else:
        tl.store(q_ptr + idx * (D // 2) + half, (c1 | (c2 << 4)).to(tl.uint8))
    tl.store(s_ptr + idx, scale)
    tl.store(z_ptr + idx, zero.to(tl.uint8))  # an integer in [0, QMAX]


@triton.jit
def _store_float(k1, k2, v1, v2, kf_ptr, vf_ptr, off, half, D: tl.constexpr):
    tl.store(kf_ptr + off + half, k1.to(kf_ptr.dtype.element_ty))
    tl.store(kf_ptr + off + D // 2 + half, k2.to(kf_ptr.dtype.element_ty))
    tl.store(vf_ptr + off + half, v1.to(vf_ptr.dtype.element_ty))
    tl.store(vf_ptr + off + D // 2 + half, v2.to(vf_ptr.dtype.element_ty))


@triton.jit
def _rope_store_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr, q_out, k_out, v_out,
                       kf_ptr, vf_ptr, kq_ptr, vq_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, prefix_ptr,
                       T, stride_qkv, eps, PCAP, SMAX, clip,
                       NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, KV_BITS: tl.constexpr,
                       KV_SYM: tl.constexpr, QK_NORM: tl.constexpr, OUT_KV: tl.constexpr,
                       ROPE: tl.constexpr = True, STORE: tl.constexpr = True, PDL: tl.constexpr = False):
    H2: tl.constexpr = D // 2
    row = tl.program_id(0)
    head = tl.program_id(1)
    if PDL:  # a programmatic dependent: release the next kernel, then wait for qkv and positions
        gdc_launch_dependents()
        gdc_wait()
    b = row // T
    pos = tl.load(pos_ptr + row)
    half = tl.arange(0, H2)
    if ROPE:
        cos = tl.load(cos_ptr + pos * H2 + half)
        sin = tl.load(sin_ptr + pos * H2 + half)
    else:  # store_kv (no query heads, NH = 0: the query branch below is still compiled)
        cos = tl.full((H2,), 1.0, tl.float32)
        sin = tl.zeros((H2,), tl.float32)
    base = row_ptr(qkv_ptr, row, stride_qkv)
    if head < NH:
        x1 = tl.load(base + head * D + half).to(tl.float32)
        x2 = tl.load(base + head * D + H2 + half).to(tl.float32)
        if QK_NORM:
            x1, x2 = _rms(x1, x2, qn_ptr, half, eps, D)
        q_dst = row_ptr(q_out, row, NH * D) + head * D
        tl.store(q_dst + half, (x1 * cos - x2 * sin).to(q_out.dtype.element_ty))
        tl.store(q_dst + H2 + half, (x2 * cos + x1 * sin).to(q_out.dtype.element_ty))
    else:
        kvh = head - NH
        k1 = tl.load(base + (NH + kvh) * D + half).to(tl.float32)
        k2 = tl.load(base + (NH + kvh) * D + H2 + half).to(tl.float32)
        v1 = tl.load(base + (NH + NKV + kvh) * D + half).to(tl.float32)
        v2 = tl.load(base + (NH + NKV + kvh) * D + H2 + half).to(tl.float32)
        if QK_NORM:
            k1, k2 = _rms(k1, k2, kn_ptr, half, eps, D)
        if ROPE:
            r1 = k1 * cos - k2 * sin
            r2 = k2 * cos + k1 * sin
        else:  # store_kv: keys that are already rotated (and R3-transformed)
            r1 = k1
            r2 = k2
        if OUT_KV:
            kv_off = kvh * D
            k_row = row_ptr(k_out, row, NKV * D)
            v_row = row_ptr(v_out, row, NKV * D)
            tl.store(k_row + kv_off + half, r1.to(k_out.dtype.element_ty))
            tl.store(k_row + kv_off + H2 + half, r2.to(k_out.dtype.element_ty))
            tl.store(v_row + kv_off + half, v1.to(v_out.dtype.element_ty))
            tl.store(v_row + kv_off + H2 + half, v2.to(v_out.dtype.element_ty))
        slot = b * NKV + kvh
        if STORE:
            if KV_BITS == 16:
                _store_float(r1, r2, v1, v2, kf_ptr, vf_ptr, (slot * PCAP + pos) * D, half, D)
            else:
                if pos < tl.load(prefix_ptr + b):
                    _store_float(r1, r2, v1, v2, kf_ptr, vf_ptr, (slot * PCAP + pos) * D, half, D)
                else:
                    idx = slot * SMAX + pos
                    _kv_quant_store(r1, r2, kq_ptr, ks_ptr, kz_ptr, idx, half, clip, D, KV_BITS, KV_SYM)
                    _kv_quant_store(v1, v2, vq_ptr, vs_ptr, vz_ptr, idx, half, clip, D, KV_BITS, KV_SYM)


@triton.jit
def _attend(q1, q2, k1, k2, v1, v2, smask, m_i, l_i, acc1, acc2, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """One block of keys: scores (base-2 logits; q is pre-scaled by sm_scale*log2(e)), online-softmax update."""
    if USE_DOT:
        if IEEE:
            s = tl.dot(q1, tl.trans(k1), input_precision="ieee") + tl.dot(q2, tl.trans(k2), input_precision="ieee")
        else:
            s = tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))
    else:
        s = (tl.sum(q1.to(tl.float32)[:, None, :] * k1.to(tl.float32)[None, :, :], axis=2)
             + tl.sum(q2.to(tl.float32)[:, None, :] * k2.to(tl.float32)[None, :, :], axis=2))
    s = tl.where(smask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if USE_DOT:
        pv = p.to(v1.dtype)
        if IEEE:
            acc1 = acc1 * alpha[:, None] + tl.dot(pv, v1, input_precision="ieee")
            acc2 = acc2 * alpha[:, None] + tl.dot(pv, v2, input_precision="ieee")
        else:
            acc1 = acc1 * alpha[:, None] + tl.dot(pv, v1)
            acc2 = acc2 * alpha[:, None] + tl.dot(pv, v2)
    else:
        acc1 = acc1 * alpha[:, None] + tl.sum(p[:, :, None] * v1.to(tl.float32)[None, :, :], axis=1)
        acc2 = acc2 * alpha[:, None] + tl.sum(p[:, :, None] * v2.to(tl.float32)[None, :, :], axis=1)
    return m_new, l_i, acc1, acc2


@triton.jit
def _load_codes(q_ptr, idx, smask, half, D: tl.constexpr, BITS: tl.constexpr, ctype: tl.constexpr):
    """One block's codes as ``ctype`` integers, the two halves of D apart (8-bit: a byte each; 4-bit: the low and
    high nibbles of one byte)."""
    if BITS == 8:
        c1 = tl.load(q_ptr + idx[:, None] * D + half[None, :], mask=smask[:, None], other=0).to(ctype)
        c2 = tl.load(q_ptr + idx[:, None] * D + D // 2 + half[None, :], mask=smask[:, None], other=0).to(ctype)
    else:
        byte = tl.load(q_ptr + idx[:, None] * (D // 2) + half[None, :], mask=smask[:, None], other=0).to(ctype)
        c1 = byte & 15
        c2 = (byte >> 4) & 15
    return c1, c2


@triton.jit
def _dequant_block(q_ptr, s_ptr, z_ptr, idx, smask, half, D: tl.constexpr, BITS: tl.constexpr,
                   dtype: tl.constexpr):
    scale = tl.load(s_ptr + idx, mask=smask, other=0.0)[:, None]
    zero = tl.load(z_ptr + idx, mask=smask, other=0).to(tl.float32)[:, None]
    c1, c2 = _load_codes(q_ptr, idx, smask, half, D, BITS, tl.int32)
    x1 = ((c1.to(tl.float32) - zero) * scale).to(dtype)
    x2 = ((c2.to(tl.float32) - zero) * scale).to(dtype)
    return x1, x2


@triton.jit
def _codes_f16(q_ptr, idx, smask, half, D: tl.constexpr, BITS: tl.constexpr):
    """Codes of one block as fp16 ``1024 + code`` (0x6400 | code reads as 1024 + code exactly: no conversion)."""
    c1, c2 = _load_codes(q_ptr, idx, smask, half, D, BITS, tl.int16)
    return (c1 | 0x6400).to(tl.float16, bitcast=True), (c2 | 0x6400).to(tl.float16, bitcast=True)


@triton.jit
def _attend_codes(q1, q2, qsum, qsc, kq_ptr, ks_ptr, kz, vq_ptr, vs_ptr, vz, idx, smask, half, m_i, l_i,
                  acc1, acc2, D: tl.constexpr, BITS: tl.constexpr, QK_I8: tl.constexpr):
    """A quantized block without dequantizing it: the dots run on the codes and scale/zero act per token on the
    scores (``s = ks * (q.c_k - kz * sum q)``) and on the probabilities (``p.v = (p*vs).c_v - sum p*vs*vz``).

    ``QK_I8``: q arrives as int8 (``q ~ qsc * q_i8`` per row, ``qsum`` = sum of q_i8) and Q.K runs on int8 tensor
    cores, the key codes fed as they are (8-bit codes shifted by -128 to fit int8, the zero point with them), so
    the score is ``qsc * ks * (q_i8.c_k - kz * sum q_i8)`` with the integer part exact.

    ``kz``/``vz``: the block's zero points (float32, [BLOCK_S]), loaded by the caller a block ahead."""
    ks = tl.load(ks_ptr + idx, mask=smask, other=0.0)
    if QK_I8:
        k1, k2 = _load_codes(kq_ptr, idx, smask, half, D, BITS, tl.int8)
        if BITS == 8:  # (c ^ 0x80) read as int8 is c - 128
            k1 = k1 ^ -128
            k2 = k2 ^ -128
            kz = kz - 128.0
        raw = (tl.dot(q1, tl.trans(k1), out_dtype=tl.int32) + tl.dot(q2, tl.trans(k2), out_dtype=tl.int32))
        s = (qsc[:, None] * ks[None, :]) * (raw.to(tl.float32) - qsum[:, None] * kz[None, :])
    else:
        k1, k2 = _codes_f16(kq_ptr, idx, smask, half, D, BITS)
        kz = kz + 1024.0
        raw = tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))
        s = ks[None, :] * (raw - qsum[:, None] * kz[None, :])
    s = tl.where(smask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v1, v2 = _codes_f16(vq_ptr, idx, smask, half, D, BITS)
    vs = tl.load(vs_ptr + idx, mask=smask, other=0.0)
    vz = vz + 1024.0
    pv = (p * vs[None, :]).to(tl.float16)
    corr = tl.sum(pv.to(tl.float32) * vz[None, :], axis=1)[:, None]
    acc1 = acc1 * alpha[:, None] + (tl.dot(pv, v1) - corr)
    acc2 = acc2 * alpha[:, None] + (tl.dot(pv, v2) - corr)
    return m_new, l_i, acc1, acc2


@triton.jit
def _decode_kernel(q_ptr, kf_ptr, vf_ptr, kq_ptr, vq_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, lens_ptr, prefix_ptr,
                   po_ptr, pm_ptr, pl_ptr, qk_scale, PCAP, SMAX, WINDOW, NUM_SPLITS,
                   NKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, KV_BITS: tl.constexpr,
                   BLOCK_S: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr, ON_CODES: tl.constexpr,
                   QK_I8: tl.constexpr = False, PDL: tl.constexpr = False):
    H2: tl.constexpr = D // 2
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // NKV
    slot = bh  # = b * NKV + kv head
    if PDL:  # launched as a programmatic dependent too: q, the cache and lens are the previous kernels' writes,
        gdc_wait()  # visible only after this (a no-op when the kernel before has long finished)
    length = tl.load(lens_ptr + b)
    prefix = tl.minimum(tl.load(prefix_ptr + b), length)
    if KV_BITS == 16:
        prefix = length
    start = tl.maximum(length - WINDOW, 0)  # WINDOW = 2^30 when there is none
    chunk = tl.cdiv(tl.cdiv(length - start, NUM_SPLITS), BLOCK_S) * BLOCK_S
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, length)
    g = tl.arange(0, GP)
    gmask = g < G
    half = tl.arange(0, H2)
    qrow = slot * G + g  # query head kvh * G + g of sequence b, rows of [B * Hq, D]
    dtype = kf_ptr.dtype.element_ty
    q1 = (tl.load(q_ptr + qrow[:, None] * D + half[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
          * qk_scale).to(dtype)
    q2 = (tl.load(q_ptr + qrow[:, None] * D + H2 + half[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
          * qk_scale).to(dtype)
    m_i = tl.full((GP,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GP,), dtype=tl.float32)
    acc1 = tl.zeros((GP, H2), dtype=tl.float32)
    acc2 = tl.zeros((GP, H2), dtype=tl.float32)
    f_hi = tl.minimum(hi, prefix)
    for s0 in range(lo, f_hi, BLOCK_S):  # float prefix
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < f_hi
        fk = (slot * PCAP + s)[:, None] * D + half[None, :]
        k1 = tl.load(kf_ptr + fk, mask=smask[:, None], other=0.0)
        k2 = tl.load(kf_ptr + fk + H2, mask=smask[:, None], other=0.0)
        v1 = tl.load(vf_ptr + fk, mask=smask[:, None], other=0.0)
        v2 = tl.load(vf_ptr + fk + H2, mask=smask[:, None], other=0.0)
        m_i, l_i, acc1, acc2 = _attend(q1, q2, k1, k2, v1, v2, smask, m_i, l_i, acc1, acc2, USE_DOT, IEEE)
    if KV_BITS != 16:
        if ON_CODES:
            if QK_I8:  # q per row to int8 (symmetric, max |q| -> 127), once per program
                qa = tl.maximum(tl.max(tl.abs(q1.to(tl.float32)), axis=1), tl.max(tl.abs(q2.to(tl.float32)), axis=1))
                qsc = tl.maximum(qa / 127.0, MIN_SCALE)  # the per-token quantizers' floor: a zero row stays zero
                qk1 = round_half_even(q1.to(tl.float32) / qsc[:, None]).to(tl.int8)
                qk2 = round_half_even(q2.to(tl.float32) / qsc[:, None]).to(tl.int8)
                qsum = (tl.sum(qk1.to(tl.int32), axis=1) + tl.sum(qk2.to(tl.int32), axis=1)).to(tl.float32)
            else:  # sum over D of q as the tensor cores see it (fp16), for the keys' zero points
                qk1 = q1
                qk2 = q2
                qsc = tl.full((GP,), 1.0, tl.float32)
                qsum = tl.sum(q1.to(tl.float32), axis=1) + tl.sum(q2.to(tl.float32), axis=1)
        q_lo = tl.maximum(lo, prefix)
        if ON_CODES:  # the first block's zero points (one byte a token: too narrow for the pipeliner's cp.async,
            # which takes 4 bytes and more, so each block loads the next block's itself, a step ahead)
            s = q_lo + tl.arange(0, BLOCK_S)
            kz_next = tl.load(kz_ptr + slot * SMAX + s, mask=s < hi, other=0)
            vz_next = tl.load(vz_ptr + slot * SMAX + s, mask=s < hi, other=0)
        for s0 in range(q_lo, hi, BLOCK_S):  # quantized rest
            s = s0 + tl.arange(0, BLOCK_S)
            smask = s < hi
            idx = slot * SMAX + s
            if ON_CODES:
                kz = kz_next.to(tl.float32)
                vz = vz_next.to(tl.float32)
                s_next = s + BLOCK_S
                kz_next = tl.load(kz_ptr + idx + BLOCK_S, mask=s_next < hi, other=0)
                vz_next = tl.load(vz_ptr + idx + BLOCK_S, mask=s_next < hi, other=0)
                m_i, l_i, acc1, acc2 = _attend_codes(qk1, qk2, qsum, qsc, kq_ptr, ks_ptr, kz, vq_ptr, vs_ptr,
                                                     vz, idx, smask, half, m_i, l_i, acc1, acc2, D, KV_BITS,
                                                     QK_I8)
            else:
                k1, k2 = _dequant_block(kq_ptr, ks_ptr, kz_ptr, idx, smask, half, D, KV_BITS, dtype)
                v1, v2 = _dequant_block(vq_ptr, vs_ptr, vz_ptr, idx, smask, half, D, KV_BITS, dtype)
                m_i, l_i, acc1, acc2 = _attend(q1, q2, k1, k2, v1, v2, smask, m_i, l_i, acc1, acc2, USE_DOT, IEEE)
    if PDL:  # the combine kernel may start launching now; its gdc_wait still waits for these stores
        gdc_launch_dependents()
    prow = qrow * NUM_SPLITS + split
    tl.store(po_ptr + prow[:, None] * D + half[None, :], acc1, mask=gmask[:, None])
    tl.store(po_ptr + prow[:, None] * D + H2 + half[None, :], acc2, mask=gmask[:, None])
    tl.store(pm_ptr + prow, m_i, mask=gmask)
    tl.store(pl_ptr + prow, l_i, mask=gmask)


@triton.jit
def _combine_kernel(po_ptr, pm_ptr, pl_ptr, out_ptr, p_ptr, NUM_SPLITS, SP: tl.constexpr, D: tl.constexpr,
                    DC: tl.constexpr, PDL: tl.constexpr = False, PLANES: tl.constexpr = False):
    """One query row's ``DC`` output columns (``program_id(1)``-th chunk of D) from the splits' partials;
    ``PLANES``: also their digit planes into ``p_ptr`` [8, rows x D] (one sequence: ``gemv_digits``' input)."""
    row = tl.program_id(0)
    if PDL:  # launched early (programmatic dependent launch): let the next kernel (o's GEMV) launch and read its
        gdc_launch_dependents()  # first weights now (its own wait still waits for this grid), then wait for the
        gdc_wait()  # decode kernel's partials
    s = tl.arange(0, SP)
    smask = s < NUM_SPLITS
    d = tl.program_id(1) * DC + tl.arange(0, DC)
    m = tl.load(pm_ptr + row * NUM_SPLITS + s, mask=smask, other=float("-inf"))
    l_s = tl.load(pl_ptr + row * NUM_SPLITS + s, mask=smask, other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))
    w = tl.where(smask & (l_s > 0), w, 0.0)
    o = tl.load(po_ptr + (row * NUM_SPLITS + s)[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
    y = tl.sum(w[:, None] * o, axis=0) / tl.sum(w * l_s, axis=0)
    y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * D + d, y)
    if PLANES:
        store_digit_planes(p_ptr, row * D + d, y, d < D, tl.num_programs(0) * D)


# -- entry points --------------------------------------------------------------------------------------------


def rope_store(qkv: torch.Tensor, positions: torch.Tensor, tokens_per_seq: int, cos: torch.Tensor,
               sin: torch.Tensor, cache: KVCache, prefix: torch.Tensor, num_heads: int, num_kv_heads: int, *,
               q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6,
               out_kv: bool = False, store: bool = True, pdl: bool = False):
    """qkv [B*T, (Hq + 2 Hkv) * D] (rows b*T + t) at ``positions`` [B*T] int32 -> q [B*T, Hq, D] after (q-norm and)
    RoPE; k/v are written into ``cache`` (float below ``prefix[b]``, quantized from there). With ``out_kv`` also
    returns the float k (after RoPE) and v [B*T, Hkv, D], what prefill attention reads. ``store=False`` leaves the
    cache alone (with ``out_kv``: RoPE only, for a transform such as R3 before ``store_kv``). ``pdl``: launched as
    a programmatic dependent (sm_90+; a plain launch under the interpreter)."""
    rows = qkv.shape[0]
    d = cache.head_dim
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * d or qkv.stride(1) != 1:
        raise ValueError(f"qkv must be [rows, {(num_heads + 2 * num_kv_heads) * d}] with unit column stride")
    q = torch.empty((rows, num_heads, d), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((rows, num_kv_heads, d), dtype=qkv.dtype, device=qkv.device) if out_kv else q
    v = torch.empty((rows, num_kv_heads, d), dtype=qkv.dtype, device=qkv.device) if out_kv else q
    opts = {} if interpreting() else {"num_warps": 1 if d <= 64 else 2}
    pdl, launch = pdl_flag(pdl, qkv.device)
    _rope_store_kernel[(rows, num_heads + num_kv_heads)](
        qkv, positions, cos, sin, q_norm if q_norm is not None else cos, k_norm if k_norm is not None else cos,
        q, k, v, cache.k_float, cache.v_float, cache.k_q, cache.v_q, cache.k_scale, cache.k_zero, cache.v_scale,
        cache.v_zero, prefix, tokens_per_seq, qkv.stride(0), float(eps), cache.prefix_capacity, cache.max_len,
        cache.clip_ratio, NH=num_heads, NKV=num_kv_heads, D=d, KV_BITS=cache.bits, KV_SYM=cache.symmetric,
        QK_NORM=q_norm is not None, OUT_KV=out_kv, STORE=store, PDL=pdl, **opts, **launch)
    return (q, k, v) if out_kv else q


def store_kv(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, tokens_per_seq: int, cache: KVCache,
             prefix: torch.Tensor) -> None:
    """Write keys and values that are ready as they are (after RoPE and any online rotation such as R3) into
    ``cache``: k/v [B*T, Hkv, D] at ``positions`` [B*T] int32, float below ``prefix[b]``, quantized from there
    (``rope_store``'s store, without the rotation)."""
    rows, hkv, d = k.shape
    if v.shape != k.shape or d != cache.head_dim or hkv != cache.kv_heads:
        raise ValueError(f"k/v {tuple(k.shape)}, {tuple(v.shape)} do not fit a cache of {cache.kv_heads} heads of "
                         f"{cache.head_dim}")
    kv = torch.cat([k.reshape(rows, hkv * d), v.reshape(rows, hkv * d)], 1)
    opts = {} if interpreting() else {"num_warps": 1 if d <= 64 else 2}
    _rope_store_kernel[(rows, hkv)](
        kv, positions, kv, kv, kv, kv, kv, kv, kv, cache.k_float, cache.v_float, cache.k_q, cache.v_q,
        cache.k_scale, cache.k_zero, cache.v_scale, cache.v_zero, prefix, tokens_per_seq, kv.stride(0), 0.0,
        cache.prefix_capacity, cache.max_len, cache.clip_ratio, NH=0, NKV=hkv, D=d, KV_BITS=cache.bits,
        KV_SYM=cache.symmetric, QK_NORM=False, OUT_KV=False, ROPE=False, STORE=True, **opts)


def decode_warps(head_dim: int, fp32: bool) -> int:
    """fp32 (FMA dots) at head_dim 128 needs 8 warps to keep its tiles in registers."""
    return 8 if fp32 and head_dim >= 128 else 4


def default_splits(batch: int, kv_heads: int, max_len: int, device, block: int = 64) -> int:
    """Enough splits for about four programs per SM at the longest context (a memory-bound kernel needs many loads
    in flight), never more than the blocks there."""
    from qcompile.runtime.triton._tune import num_sms

    want = max(1, -(-4 * num_sms(device) // (batch * kv_heads)))
    return max(1, min(want, -(-max_len // block), 128))


_DECODE = Tuner("decode_attention")


def attends_on_codes(use_dot: bool, fp16: bool, bits: int) -> bool:
    """Whether the decode kernel attends on the codes (``_attend_codes``): tensor-core dots, fp16 (1024 + code is
    exact in fp16, not in bf16), and a quantized cache."""
    return use_dot and fp16 and bits != 16


def decode_candidates(batch: int, kv_heads: int, max_len: int, device, fp32: bool, head_dim: int, *,
                      group: int = 0, on_codes: bool = False) -> list[dict]:
    """Block sizes x split counts x warps/stages, the default guess first (fp32 keeps its one register-safe
    configuration). Where the attention runs on the codes (``on_codes``) and the ``group`` of query heads per KV
    head is below the 16 rows the dots are padded to, five launch variants follow (timed on the H100,
    docs/BENCHMARKS.md: 30.3-30.5 against 32.0 us at 32k int4): the query rows unpadded (``GP``, the group rounded
    up to a power of two, at least 4: fewer accumulator registers, more programs per SM), an 8-warp combine (4
    warps spill registers at 256 split rows) over chunks of 32 columns (``COMBINE_DC``: D / 32 combine programs a
    query row instead of one; 3-4 % off the 32k pick on the H200, bench/triton_sweep.py's attention_focus) and, on
    sm_90+, both kernels as programmatic dependent launches (``PDL``), also at 2.75x the splits (about 11 one-warp
    programs per SM) and at 2x rounded down to a power of two. ``QK_I8`` (Q.K on int8 tensor cores) is never a
    candidate: it rounds the queries to int8, so it changes the result, not just the speed."""
    if interpreting():
        return [dict(BLOCK_S=16, SPLITS=default_splits(batch, kv_heads, max_len, device, 16))]
    base = default_splits(batch, kv_heads, max_len, device, 64)
    if fp32:
        return [dict(BLOCK_S=64, SPLITS=base, num_warps=decode_warps(head_dim, True), num_stages=2)]

    def splits(block, mult):
        return max(1, min(int(base * mult), -(-max_len // block), 256))

    # two warps a program first: the best configuration at 8k and 32k, int8 and int4, on the H200
    # (bench/triton_sweep.py: 1.05-1.19x SDPA against 0.76-1.05x for four or eight warps)
    out = []
    for block in (64, 32, 128):
        for mult in (1, 2):
            for warps, stages in ((2, 2), (1, 2), (2, 3), (4, 2)):
                cfg = dict(BLOCK_S=block, SPLITS=splits(block, mult), num_warps=warps, num_stages=stages)
                if cfg not in out:
                    out.append(cfg)
    rows = max(4, triton.next_power_of_2(max(1, group)))
    if on_codes and head_dim // 2 >= 16 and rows < 16:
        pdl = supports_pdl(device)
        twice = splits(32, 2)
        # the last: twice the default splits rounded down to a power of two (132 -> 128 on 132 SMs at 8 KV heads):
        # still one wave, and the combine's split axis is not padded (0.3 us off the 32k pick on the H100,
        # bench/results/device_2026-12-05_s8/call3_h100/focus.json)
        for block, warps, n_splits, extra in ((32, 1, twice, {}), (64, 2, splits(64, 1), {}),
                                              (32, 1, twice, dict(PDL=True)), (32, 1, splits(32, 2.75), dict(PDL=True)),
                                              (32, 1, 1 << (twice.bit_length() - 1), dict(PDL=True))):
            if extra.get("PDL") and not pdl:
                continue
            cfg = dict(BLOCK_S=block, SPLITS=n_splits, num_warps=warps, num_stages=2, GP=rows,
                       COMBINE_WARPS=8, COMBINE_DC=32, **extra)
            if cfg not in out:
                out.append(cfg)
    return out


def decode_attention(q: torch.Tensor, cache: KVCache, lens: torch.Tensor, prefix: torch.Tensor, *,
                     num_splits: int | None = None, window: int = 0, sm_scale: float | None = None,
                     block_s: int | None = None, config: dict | None = None, pdl: bool = False,
                     planes: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence: q [B, Hq, D] against ``cache`` holding ``lens[b]`` positions (int32 device
    tensors ``lens`` and ``prefix``, [B]); a sliding ``window`` > 0 keeps only the last ``window`` positions.
    The split count, block size, warps, stages and launch variants (``decode_candidates``) are tuned once per
    shape on the GPU (``num_splits``/``block_s`` or ``config`` force them). fp16 caches with quantized parts attend
    on the codes directly (``_attend_codes``). ``pdl``: both kernels launched as programmatic dependents whatever
    the tuner picks (sm_90+; a plain launch under the interpreter). ``planes``: int8 [8, Hq x D] that also receives
    the fp16 output's digit planes (one sequence; ``gemv_digits``, the o projection's input)."""
    b, hq, d = q.shape
    if planes is not None:
        if q.dtype != torch.float16 or b != 1:
            raise ValueError(f"decode_attention: digit planes are written for one fp16 sequence, got q {q.dtype} "
                             f"{tuple(q.shape)}")
        check_planes(planes, hq * d, q.device, "decode_attention")
    hkv = cache.kv_heads
    if hq % hkv or d != cache.head_dim:
        raise ValueError(f"q [{b}, {hq}, {d}] does not fit a cache of {hkv} heads of {cache.head_dim}")
    g = hq // hkv
    use_dot = d // 2 >= 16
    gp = max(16, triton.next_power_of_2(g)) if use_dot else triton.next_power_of_2(g)
    fp32 = q.dtype == torch.float32
    on_codes = attends_on_codes(use_dot, q.dtype == torch.float16, cache.bits)
    if config is None and (num_splits is not None or block_s is not None):
        bs = block_s or (16 if interpreting() else 64)
        config = dict(BLOCK_S=bs, SPLITS=num_splits or default_splits(b, hkv, cache.max_len, q.device, bs))
        if not interpreting():
            config.update(num_warps=decode_warps(d, fp32), num_stages=2)
    scale = (1.0 / math.sqrt(d) if sm_scale is None else sm_scale) * LOG2E
    q = q.contiguous()
    out = torch.empty_like(q)
    win = int(window) if window and window > 0 else 2**30

    def launch(cfg):
        meta, opts = launch_opts(cfg)
        splits = meta["SPLITS"]
        # GP: query rows of the dots (the group padded to 16 by default, or the group rounded up to a power of two:
        # fewer accumulator registers); COMBINE_WARPS: the split combine's warps
        rows = meta.get("GP", gp)
        if rows < g or rows & (rows - 1):
            raise ValueError(f"GP={rows} must be a power of two >= the {g} query heads per kv head")
        # QK_I8: Q.K on int8 tensor cores (q rounded to int8 per row; a bench variant, never a tuner candidate);
        # PDL: both kernels launched as programmatic dependents of the kernel before (each waits in-kernel)
        qk_i8 = bool(meta.get("QK_I8", False))
        if qk_i8 and not on_codes:
            raise ValueError("QK_I8 needs the attention on codes: fp16 queries, a quantized cache, head_dim >= 32")
        # COMBINE_DC: output columns per combine program (a power of two dividing D; D by default): chunks spread
        # the combine's partial reads over more programs than the B * Hq rows
        dc = meta.get("COMBINE_DC", d)
        if not 0 < dc <= d or d % dc or dc & (dc - 1):
            raise ValueError(f"COMBINE_DC={dc} must be a power of two dividing head_dim {d}")
        as_dependents, popts = pdl_flag(pdl or meta.get("PDL", False), q.device)
        po = torch.empty((b * hq, splits, d), dtype=torch.float32, device=q.device)
        pm = torch.empty((b * hq, splits), dtype=torch.float32, device=q.device)
        pl = torch.empty((b * hq, splits), dtype=torch.float32, device=q.device)
        _decode_kernel[(b * hkv, splits)](
            q, cache.k_float, cache.v_float, cache.k_q, cache.v_q, cache.k_scale, cache.k_zero, cache.v_scale,
            cache.v_zero, lens, prefix, po, pm, pl, scale, cache.prefix_capacity, cache.max_len, win, splits,
            NKV=hkv, G=g, GP=rows, D=d, KV_BITS=cache.bits, BLOCK_S=meta["BLOCK_S"], USE_DOT=use_dot, IEEE=fp32,
            ON_CODES=on_codes, QK_I8=qk_i8, PDL=as_dependents, **opts, **popts)
        copts = {} if interpreting() else {"num_warps": meta.get("COMBINE_WARPS", 4)}
        _combine_kernel[(b * hq, d // dc)](po, pm, pl, out, planes if planes is not None else out, splits,
                                           SP=triton.next_power_of_2(splits), D=d, DC=dc, PDL=as_dependents,
                                           PLANES=planes is not None, **copts, **popts)

    key = (b, hq, hkv, d, cache.bits, cache.max_len, q.dtype, win < 2**30)
    _DECODE.run(key, decode_candidates(b, hkv, cache.max_len, q.device, fp32, d, group=g, on_codes=on_codes), launch,
                config)
    return out
