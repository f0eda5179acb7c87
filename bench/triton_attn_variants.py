"""Candidate inner loops for the quantized part of decode attention (batch 1, fp16), against ``_decode_kernel``.

``kv_attention._decode_kernel`` attends on the codes (``_attend_codes``). Its SASS at BLOCK_S=32, one warp, shows
that Triton's pipeliner already prefetches the code bytes with cp.async (LDGSTS) into shared memory, but then
reads them back one byte per LDS.U8, in the dot-operand layout, and builds each fp16 ``1024 + code`` with its own
PRMT/LOP3: about 40 instructions per token per thread, at 237-255 registers (so at most eight one-warp programs
per SM). The variants here keep the cache layout of ``KVCache`` (no transform at setup; ``rope_store`` writes
exactly what it writes now) and reuse ``_combine_kernel``:

* ``bytes``: the existing arithmetic restructured into four quarter-width parts of D (the control for the others);
* ``bytes_pf`` (A): ``bytes`` with explicit software prefetch: the loop carries the NEXT block's raw code bytes and
  scales/zeros in registers (loaded before block i is computed);
* ``half2`` (B): codes read as int32 words (the uint8 cache viewed as int32) and turned into two fp16 at a time:
  ``(w & 0x00FF00FF) | 0x64006400`` (8-bit) or ``(w >> {0,4,8,12}) & 0x000F000F | 0x64006400`` (4-bit, packed
  ``byte[j] = c[j] | c[j + D/2] << 4``) is the half2 ``(1024 + c[4j], 1024 + c[4j+2])``; the parts are the even
  and odd codes of each half of D, so q is loaded permuted to match (a dot over D is permutation invariant) and
  the output is stored back to the permuted columns;
* ``half2_pf`` (A+B): ``half2`` with the prefetch of ``bytes_pf``;
* ``half2x`` / ``half2x_pf``: ``half2`` with one instruction per fp16 pair (inline PTX: one ``prmt`` for 8-bit, one
  ``lop3`` per nibble pair for 4-bit, the high nibbles read as ``1024 + 16 code``), the zero-point correction once
  after the loop; the PTX cannot run in the interpreter, so ``--check`` runs an equivalent pure-Triton path.

Measured on an H200 (2026-12-04, docs/BENCHMARKS.md): none beats the existing kernel, although half2x issues
15-29 % fewer instructions per token; the loop is not bound by its instruction count alone.

Modes (run from the repository root):

    TRITON_INTERPRET=1 python bench/triton_attn_variants.py --check   # CPU: outputs vs decode_attention and fp64
    python bench/triton_attn_variants.py --sass                       # CPU: sm_90 regs/spills/SASS per token
    python bench/triton_attn_variants.py --out bench/results/triton_attn_variants.json   # GPU timing

The GPU mode times fp16 SDPA (GQA), the existing ``decode_attention`` (its tuner's pick, and a few fixed configs),
and every variant over a small grid (BLOCK_S, warps, stages; SPLITS = 1, 2, 4 x ``default_splits``) at 8k and 32k,
int8 and int4, with CUDA graphs over several layers' caches (``bench/triton_kernels.py``: ``attention_setup``,
``graph_time``), and the max abs difference of each variant's output from the existing kernel's.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# a benchmark times the tuner's own picks, not those an earlier run left in the disk cache (_tune.TuningCache)
os.environ.setdefault("QCOMPILE_TUNE_CACHE", "0")

import torch  # noqa: E402

from qcompile.runtime.triton._env import interpreting, require_triton  # noqa: E402

triton = require_triton()
import triton.language as tl  # noqa: E402

from qcompile.runtime.triton.kv_attention import (  # noqa: E402
    LOG2E,
    KVCache,
    _combine_kernel,
    _decode_kernel,
    decode_attention,
    default_splits,
)

# name -> (UNPACK, PREFETCH): UNPACK 0 = byte codes (as _attend_codes), 1 = int32 words -> half2
VARIANTS = {"bytes": (0, False), "bytes_pf": (0, True), "half2": (1, False), "half2_pf": (1, True),
            "half2x": (2, False), "half2x_pf": (2, True)}


def multipliers(unpack: int, bits: int) -> dict:
    """UNPACK 2, 4-bit: parts 2 and 3 (the high nibbles) are decoded as 1024 + 16c (MUL2; MUL1, part 1's, is 1)."""
    return dict(MUL1=1.0, MUL2=16.0) if unpack == 2 and bits == 4 else dict(MUL1=1.0, MUL2=1.0)


# -- kernels ---------------------------------------------------------------------------------------------------


@triton.jit
def _cols(p: tl.constexpr, D: tl.constexpr, UNPACK: tl.constexpr):
    """Columns of D that part ``p`` (of four, D/4 wide) holds: quarters for byte codes; for half2 the even (p = 0,
    2) and odd (p = 1, 3) codes of the first (p < 2) and second half of D."""
    i = tl.arange(0, D // 4)
    if UNPACK >= 1:
        return (p // 2) * (D // 2) + 2 * i + (p % 2)
    else:
        return p * (D // 4) + i


@triton.jit
def _raw(c_ptr, idx, smask, D: tl.constexpr, BITS: tl.constexpr, UNPACK: tl.constexpr):
    """One block's raw codes as loaded (what the prefetch carries), four tensors (repeats where fewer are needed).
    UNPACK 0: uint8 [BS, D/4] per part (4-bit: the bytes of the first and second quarter, nibbles split later);
    UNPACK 1: int32 words [BS, D/8] (8-bit: the words of the first and of the second half of D; 4-bit: one)."""
    m = smask[:, None]
    if UNPACK >= 1:
        W: tl.constexpr = D // 4 if BITS == 8 else D // 8  # int32 words per token
        j = tl.arange(0, D // 8)
        base = c_ptr + idx[:, None] * W + j[None, :]
        r0 = tl.load(base, mask=m, other=0)
        if BITS == 8:
            r1 = tl.load(base + D // 8, mask=m, other=0)
        else:
            r1 = r0
        return r0, r1, r0, r1
    else:
        Q: tl.constexpr = D // 4
        i = tl.arange(0, Q)
        if BITS == 8:
            base = c_ptr + idx[:, None] * D + i[None, :]
            return (tl.load(base, mask=m, other=0), tl.load(base + Q, mask=m, other=0),
                    tl.load(base + 2 * Q, mask=m, other=0), tl.load(base + 3 * Q, mask=m, other=0))
        else:
            base = c_ptr + idx[:, None] * (D // 2) + i[None, :]
            r0 = tl.load(base, mask=m, other=0)
            r1 = tl.load(base + Q, mask=m, other=0)
            return r0, r1, r0, r1


@triton.jit
def _raw_side(q_ptr, s_ptr, z_ptr, idx, smask, D: tl.constexpr, BITS: tl.constexpr, UNPACK: tl.constexpr):
    """One block of the keys (or of the values): its raw codes (``_raw``) and its per-token scales and zeros."""
    c0, c1, c2, c3 = _raw(q_ptr, idx, smask, D, BITS, UNPACK)
    return (c0, c1, c2, c3, tl.load(s_ptr + idx, mask=smask, other=0.0),
            tl.load(z_ptr + idx, mask=smask, other=0).to(tl.float32))  # zero points: uint8 in the cache


@triton.jit
def _magic(w, MASK: tl.constexpr, SEL: tl.constexpr, ASM: tl.constexpr):
    """int32 words -> half2 bit patterns ``0x6400 | field``, one instruction: ``lop3 (w & MASK) | 0x64006400``
    (MASK != 0), or ``prmt`` picking bytes 0/2 (SEL 0x4240) or 1/3 (SEL 0x4341) of ``w`` with 0x64 above each."""
    if ASM:  # immediates in the instruction (a register operand would be rematerialized per use)
        if MASK == 0x000F000F:
            asm: tl.constexpr = "lop3.b32 $0, $1, 0x000F000F, 0x64006400, 0xEA;"
        elif MASK == 0x00F000F0:
            asm: tl.constexpr = "lop3.b32 $0, $1, 0x00F000F0, 0x64006400, 0xEA;"
        elif SEL == 0x4240:
            asm: tl.constexpr = "prmt.b32 $0, $1, 0x64646464, 0x4240;"
        else:
            asm: tl.constexpr = "prmt.b32 $0, $1, 0x64646464, 0x4341;"
        return tl.inline_asm_elementwise(asm=asm, constraints="=r,r", args=[w], dtype=tl.int32, is_pure=True,
                                         pack=1)
    else:
        if MASK != 0:
            return (w & MASK) | 0x64006400
        elif SEL == 0x4240:
            return (w & 0x00FF00FF) | 0x64006400
        else:
            return ((w >> 8) & 0x00FF00FF) | 0x64006400


@triton.jit
def _h2(x, BS: tl.constexpr, N: tl.constexpr, ASM: tl.constexpr):
    """int32 [BS, N/2] of half2 bit patterns (lo, hi) -> fp16 [BS, N], lo and hi adjacent."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(asm="mov.b32 {$0, $1}, $2;", constraints="=h,=h,r", args=[x],
                                           dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        lo = (x & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        hi = (x >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return tl.reshape(tl.join(lo, hi), (BS, N))


@triton.jit
def _unpack(r0, r1, r2, r3, BS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, UNPACK: tl.constexpr,
            ASM: tl.constexpr):
    """Raw codes -> the four parts as fp16 ``1024 + code`` [BS, D/4] (columns: ``_cols``)."""
    Q: tl.constexpr = D // 4
    if UNPACK == 2:  # one PRMT (8-bit) or LOP3 (4-bit; one shift per word) per half2; 4-bit parts 2/3 (the high
        # nibbles) come out as 1024 + 16c (mantissa bits 4-7; bits 8+ would reach the exponent)
        if BITS == 8:
            p0 = _h2(_magic(r0, 0, 0x4240, ASM), BS, Q, ASM)
            p1 = _h2(_magic(r0, 0, 0x4341, ASM), BS, Q, ASM)
            p2 = _h2(_magic(r1, 0, 0x4240, ASM), BS, Q, ASM)
            p3 = _h2(_magic(r1, 0, 0x4341, ASM), BS, Q, ASM)
        else:
            t = r0 >> 8
            p0 = _h2(_magic(r0, 0x000F000F, 0, ASM), BS, Q, ASM)
            p1 = _h2(_magic(t, 0x000F000F, 0, ASM), BS, Q, ASM)
            p2 = _h2(_magic(r0, 0x00F000F0, 0, ASM), BS, Q, ASM)
            p3 = _h2(_magic(t, 0x00F000F0, 0, ASM), BS, Q, ASM)
    elif UNPACK == 1:
        if BITS == 8:
            M: tl.constexpr = 0x00FF00FF
            p0 = _h2((r0 & M) | 0x64006400, BS, Q, ASM)
            p1 = _h2(((r0 >> 8) & M) | 0x64006400, BS, Q, ASM)
            p2 = _h2((r1 & M) | 0x64006400, BS, Q, ASM)
            p3 = _h2(((r1 >> 8) & M) | 0x64006400, BS, Q, ASM)
        else:
            M4: tl.constexpr = 0x000F000F
            p0 = _h2((r0 & M4) | 0x64006400, BS, Q, ASM)
            p1 = _h2(((r0 >> 8) & M4) | 0x64006400, BS, Q, ASM)
            p2 = _h2(((r0 >> 4) & M4) | 0x64006400, BS, Q, ASM)
            p3 = _h2(((r0 >> 12) & M4) | 0x64006400, BS, Q, ASM)
    else:
        if BITS == 8:
            c0 = r0.to(tl.int16)
            c1 = r1.to(tl.int16)
            c2 = r2.to(tl.int16)
            c3 = r3.to(tl.int16)
        else:
            b0 = r0.to(tl.int16)
            b1 = r1.to(tl.int16)
            c0 = b0 & 15
            c1 = b1 & 15
            c2 = (b0 >> 4) & 15
            c3 = (b1 >> 4) & 15
        p0 = (c0 | 0x6400).to(tl.float16, bitcast=True)
        p1 = (c1 | 0x6400).to(tl.float16, bitcast=True)
        p2 = (c2 | 0x6400).to(tl.float16, bitcast=True)
        p3 = (c3 | 0x6400).to(tl.float16, bitcast=True)
    return p0, p1, p2, p3


@triton.jit
def _softmax_step(s, m_i, l_i):
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _attend_raw(q0, q1, q2, q3, qsum, k0, k1, k2, k3, ks, kz, v0, v1, v2, v3, vs, vz, smask, m_i, l_i,
                a0, a1, a2, a3, BS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, UNPACK: tl.constexpr,
                ASM: tl.constexpr):
    """``_attend_codes`` on raw codes in four parts: ``s = ks * (q.c_k - (1024 + kz) * sum q)``,
    ``p.v = (p*vs).c_v - sum p*vs*(1024 + vz)``."""
    e0, e1, e2, e3 = _unpack(k0, k1, k2, k3, BS, D, BITS, UNPACK, ASM)
    raw = (tl.dot(q0, tl.trans(e0)) + tl.dot(q1, tl.trans(e1)) + tl.dot(q2, tl.trans(e2))
           + tl.dot(q3, tl.trans(e3)))
    s = ks[None, :] * (raw - qsum[:, None] * (kz + 1024.0)[None, :])
    s = tl.where(smask[None, :], s, float("-inf"))
    m_new, alpha, p, l_i = _softmax_step(s, m_i, l_i)
    f0, f1, f2, f3 = _unpack(v0, v1, v2, v3, BS, D, BITS, UNPACK, ASM)
    pv = (p * vs[None, :]).to(tl.float16)
    corr = tl.sum(pv.to(tl.float32) * (vz + 1024.0)[None, :], axis=1)[:, None]
    a0 = a0 * alpha[:, None] + (tl.dot(pv, f0) - corr)
    a1 = a1 * alpha[:, None] + (tl.dot(pv, f1) - corr)
    a2 = a2 * alpha[:, None] + (tl.dot(pv, f2) - corr)
    a3 = a3 * alpha[:, None] + (tl.dot(pv, f3) - corr)
    return m_new, l_i, a0, a1, a2, a3


@triton.jit
def _attend_lean(q0, q1, q2, q3, qa, qb, k0, k1, k2, k3, ks, kz, v0, v1, v2, v3, vs, vz, smask, m_i, l_i,
                 a0, a1, a2, a3, sp, sz, BS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr,
                 MUL1: tl.constexpr, MUL2: tl.constexpr):
    """UNPACK 2: parts hold ``1024 + m_p c`` (m_p = 1, MUL1, MUL2, MUL2);
    ``s = ks * (sum_p q_p.e_p / m_p - qa - kz qb)`` with ``qa = 1024 sum_p sum(q_p) / m_p``, ``qb = sum q``. The value
    dots accumulate in the tensor cores (``tl.dot(pv, e, acc * alpha)``) and their offsets are kept per row
    (``sp = sum p*vs``, ``sz = sum p*vs*vz``, both rescaled like the accumulators) and taken off once after the loop."""
    e0, e1, e2, e3 = _unpack(k0, k1, k2, k3, BS, D, BITS, 2, ASM)
    raw = tl.dot(q1, tl.trans(e1), tl.dot(q0, tl.trans(e0)))
    if MUL2 == 1.0:
        raw = tl.dot(q3, tl.trans(e3), tl.dot(q2, tl.trans(e2), raw))
    else:
        raw = raw + tl.dot(q3, tl.trans(e3), tl.dot(q2, tl.trans(e2))) * (1.0 / MUL2)
    s = ks[None, :] * ((raw - qa[:, None]) - qb[:, None] * kz[None, :])
    s = tl.where(smask[None, :], s, float("-inf"))
    m_new, alpha, p, l_i = _softmax_step(s, m_i, l_i)
    f0, f1, f2, f3 = _unpack(v0, v1, v2, v3, BS, D, BITS, 2, ASM)
    pv = (p * vs[None, :]).to(tl.float16)
    pvf = pv.to(tl.float32)
    sp = sp * alpha + tl.sum(pvf, axis=1)
    sz = sz * alpha + tl.sum(pvf * vz[None, :], axis=1)
    a0 = tl.dot(pv, f0, a0 * alpha[:, None])
    a1 = tl.dot(pv, f1, a1 * alpha[:, None])
    a2 = tl.dot(pv, f2, a2 * alpha[:, None])
    a3 = tl.dot(pv, f3, a3 * alpha[:, None])
    return m_new, l_i, a0, a1, a2, a3, sp, sz


@triton.jit
def _attend_any(q0, q1, q2, q3, qsum, qa, k0, k1, k2, k3, ks, kz, v0, v1, v2, v3, vs, vz, smask, m_i, l_i,
                a0, a1, a2, a3, sp, sz, BS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                UNPACK: tl.constexpr, ASM: tl.constexpr, MUL1: tl.constexpr, MUL2: tl.constexpr):
    if UNPACK == 2:
        return _attend_lean(q0, q1, q2, q3, qa, qsum, k0, k1, k2, k3, ks, kz, v0, v1, v2, v3, vs, vz, smask, m_i,
                            l_i, a0, a1, a2, a3, sp, sz, BS, D, BITS, ASM, MUL1, MUL2)
    else:
        m_i, l_i, a0, a1, a2, a3 = _attend_raw(q0, q1, q2, q3, qsum, k0, k1, k2, k3, ks, kz, v0, v1, v2, v3, vs,
                                               vz, smask, m_i, l_i, a0, a1, a2, a3, BS, D, BITS, UNPACK, ASM)
        return m_i, l_i, a0, a1, a2, a3, sp, sz


@triton.jit
def _variant_kernel(q_ptr, kf_ptr, vf_ptr, kq_ptr, vq_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, lens_ptr, prefix_ptr,
                    po_ptr, pm_ptr, pl_ptr, qk_scale, PCAP, SMAX, WINDOW, NUM_SPLITS,
                    NKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, KV_BITS: tl.constexpr,
                    BLOCK_S: tl.constexpr, UNPACK: tl.constexpr, PREFETCH: tl.constexpr, ASM: tl.constexpr,
                    MUL1: tl.constexpr = 1.0, MUL2: tl.constexpr = 1.0):
    """``_decode_kernel`` (fp16, tensor-core dots, quantized cache) with the quantized loop of the variant
    (UNPACK, PREFETCH); same grid, same partial outputs for ``_combine_kernel``. ``kq_ptr/vq_ptr``: the uint8
    codes (UNPACK 0) or the same memory viewed as int32 (UNPACK 1)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // NKV
    slot = bh
    length = tl.load(lens_ptr + b)
    prefix = tl.minimum(tl.load(prefix_ptr + b), length)
    start = tl.maximum(length - WINDOW, 0)
    chunk = tl.cdiv(tl.cdiv(length - start, NUM_SPLITS), BLOCK_S) * BLOCK_S
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, length)
    g = tl.arange(0, GP)
    gmask = g < G
    qrow = slot * G + g
    c0 = _cols(0, D, UNPACK)
    c1 = _cols(1, D, UNPACK)
    c2 = _cols(2, D, UNPACK)
    c3 = _cols(3, D, UNPACK)
    qb = q_ptr + qrow[:, None] * D
    q0 = (tl.load(qb + c0[None, :], mask=gmask[:, None], other=0.0).to(tl.float32) * qk_scale).to(tl.float16)
    q1 = (tl.load(qb + c1[None, :], mask=gmask[:, None], other=0.0).to(tl.float32) * qk_scale).to(tl.float16)
    q2 = (tl.load(qb + c2[None, :], mask=gmask[:, None], other=0.0).to(tl.float32) * qk_scale).to(tl.float16)
    q3 = (tl.load(qb + c3[None, :], mask=gmask[:, None], other=0.0).to(tl.float32) * qk_scale).to(tl.float16)
    m_i = tl.full((GP,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GP,), dtype=tl.float32)
    a0 = tl.zeros((GP, D // 4), dtype=tl.float32)
    a1 = tl.zeros((GP, D // 4), dtype=tl.float32)
    a2 = tl.zeros((GP, D // 4), dtype=tl.float32)
    a3 = tl.zeros((GP, D // 4), dtype=tl.float32)
    ar = tl.arange(0, BLOCK_S)
    f_hi = tl.minimum(hi, prefix)
    for s0 in range(lo, f_hi, BLOCK_S):  # float prefix (columns permuted like q)
        s = s0 + ar
        smask = s < f_hi
        m2 = smask[:, None]
        fk = (slot * PCAP + s)[:, None] * D
        sc = (tl.dot(q0, tl.trans(tl.load(kf_ptr + fk + c0[None, :], mask=m2, other=0.0)))
              + tl.dot(q1, tl.trans(tl.load(kf_ptr + fk + c1[None, :], mask=m2, other=0.0)))
              + tl.dot(q2, tl.trans(tl.load(kf_ptr + fk + c2[None, :], mask=m2, other=0.0)))
              + tl.dot(q3, tl.trans(tl.load(kf_ptr + fk + c3[None, :], mask=m2, other=0.0))))
        sc = tl.where(smask[None, :], sc, float("-inf"))
        m_i, alpha, p, l_i = _softmax_step(sc, m_i, l_i)
        pv = p.to(tl.float16)
        a0 = a0 * alpha[:, None] + tl.dot(pv, tl.load(vf_ptr + fk + c0[None, :], mask=m2, other=0.0))
        a1 = a1 * alpha[:, None] + tl.dot(pv, tl.load(vf_ptr + fk + c1[None, :], mask=m2, other=0.0)) * MUL1
        a2 = a2 * alpha[:, None] + tl.dot(pv, tl.load(vf_ptr + fk + c2[None, :], mask=m2, other=0.0)) * MUL2
        a3 = a3 * alpha[:, None] + tl.dot(pv, tl.load(vf_ptr + fk + c3[None, :], mask=m2, other=0.0)) * MUL2
    qsum = (tl.sum(q0.to(tl.float32), axis=1) + tl.sum(q1.to(tl.float32), axis=1)
            + tl.sum(q2.to(tl.float32), axis=1) + tl.sum(q3.to(tl.float32), axis=1))
    qa = 1024.0 * (tl.sum(q0.to(tl.float32), axis=1) + tl.sum(q1.to(tl.float32), axis=1) / MUL1
                   + (tl.sum(q2.to(tl.float32), axis=1) + tl.sum(q3.to(tl.float32), axis=1)) / MUL2)
    sp = tl.zeros((GP,), dtype=tl.float32)
    sz = tl.zeros((GP,), dtype=tl.float32)
    q_lo = tl.maximum(lo, prefix)
    if PREFETCH:
        s = q_lo + ar
        smask = s < hi
        idx = slot * SMAX + s
        k0, k1, k2, k3, ks, kz = _raw_side(kq_ptr, ks_ptr, kz_ptr, idx, smask, D, KV_BITS, UNPACK)
        v0, v1, v2, v3, vs, vz = _raw_side(vq_ptr, vs_ptr, vz_ptr, idx, smask, D, KV_BITS, UNPACK)
        for s0 in range(q_lo, hi, BLOCK_S):
            sn = s0 + BLOCK_S + ar
            nmask = sn < hi
            nidx = slot * SMAX + sn
            nk0, nk1, nk2, nk3, nks, nkz = _raw_side(kq_ptr, ks_ptr, kz_ptr, nidx, nmask, D, KV_BITS, UNPACK)
            nv0, nv1, nv2, nv3, nvs, nvz = _raw_side(vq_ptr, vs_ptr, vz_ptr, nidx, nmask, D, KV_BITS, UNPACK)
            m_i, l_i, a0, a1, a2, a3, sp, sz = _attend_any(
                q0, q1, q2, q3, qsum, qa, k0, k1, k2, k3, ks, kz, v0, v1, v2, v3, vs, vz, (s0 + ar) < hi, m_i, l_i,
                a0, a1, a2, a3, sp, sz, BLOCK_S, D, KV_BITS, UNPACK, ASM, MUL1, MUL2)
            k0, k1, k2, k3, ks, kz = nk0, nk1, nk2, nk3, nks, nkz
            v0, v1, v2, v3, vs, vz = nv0, nv1, nv2, nv3, nvs, nvz
    else:
        for s0 in range(q_lo, hi, BLOCK_S):
            s = s0 + ar
            smask = s < hi
            idx = slot * SMAX + s
            k0, k1, k2, k3, ks, kz = _raw_side(kq_ptr, ks_ptr, kz_ptr, idx, smask, D, KV_BITS, UNPACK)
            v0, v1, v2, v3, vs, vz = _raw_side(vq_ptr, vs_ptr, vz_ptr, idx, smask, D, KV_BITS, UNPACK)
            m_i, l_i, a0, a1, a2, a3, sp, sz = _attend_any(
                q0, q1, q2, q3, qsum, qa, k0, k1, k2, k3, ks, kz, v0, v1, v2, v3, vs, vz, smask, m_i, l_i,
                a0, a1, a2, a3, sp, sz, BLOCK_S, D, KV_BITS, UNPACK, ASM, MUL1, MUL2)
    if UNPACK == 2:  # the value offsets kept out of the loop, and the 4-bit parts' multipliers
        a0 = a0 - (1024.0 * sp + sz)[:, None]
        a1 = (a1 - (1024.0 * sp + MUL1 * sz)[:, None]) * (1.0 / MUL1)
        a2 = (a2 - (1024.0 * sp + MUL2 * sz)[:, None]) * (1.0 / MUL2)
        a3 = (a3 - (1024.0 * sp + MUL2 * sz)[:, None]) * (1.0 / MUL2)
    prow = qrow * NUM_SPLITS + split
    ob = po_ptr + prow[:, None] * D
    om = gmask[:, None]
    tl.store(ob + c0[None, :], a0, mask=om)
    tl.store(ob + c1[None, :], a1, mask=om)
    tl.store(ob + c2[None, :], a2, mask=om)
    tl.store(ob + c3[None, :], a3, mask=om)
    tl.store(pm_ptr + prow, m_i, mask=gmask)
    tl.store(pl_ptr + prow, l_i, mask=gmask)


# -- host side -------------------------------------------------------------------------------------------------


def variant_attention(q: torch.Tensor, cache: KVCache, lens: torch.Tensor, prefix: torch.Tensor, variant: str,
                      cfg: dict, window: int = 0, sm_scale: float | None = None) -> torch.Tensor:
    """``decode_attention`` with the quantized loop of ``variant`` (fp16, quantized cache) at config ``cfg``
    (BLOCK_S, SPLITS, num_warps, num_stages)."""
    unpack, prefetch = VARIANTS[variant]
    b, hq, d = q.shape
    hkv = cache.kv_heads
    if q.dtype != torch.float16 or cache.bits == 16 or d < 64:
        raise ValueError("variants: fp16 queries, a quantized cache, head_dim >= 64")
    g = hq // hkv
    gp = max(16, triton.next_power_of_2(g))
    scale = (1.0 / math.sqrt(d) if sm_scale is None else sm_scale) * LOG2E
    q = q.contiguous()
    splits = cfg["SPLITS"]
    po = torch.empty((b * hq, splits, d), dtype=torch.float32, device=q.device)
    pm = torch.empty((b * hq, splits), dtype=torch.float32, device=q.device)
    pl = torch.empty((b * hq, splits), dtype=torch.float32, device=q.device)
    kq, vq = (cache.k_q.view(torch.int32), cache.v_q.view(torch.int32)) if unpack else (cache.k_q, cache.v_q)
    opts = {} if interpreting() else {"num_warps": cfg.get("num_warps", 1), "num_stages": cfg.get("num_stages", 2)}
    win = int(window) if window and window > 0 else 2**30
    _variant_kernel[(b * hkv, splits)](
        q, cache.k_float, cache.v_float, kq, vq, cache.k_scale, cache.k_zero, cache.v_scale, cache.v_zero, lens,
        prefix, po, pm, pl, scale, cache.prefix_capacity, cache.max_len, win, splits, NKV=hkv, G=g, GP=gp, D=d,
        KV_BITS=cache.bits, BLOCK_S=cfg["BLOCK_S"], UNPACK=unpack, PREFETCH=prefetch, ASM=not interpreting(),
        **multipliers(unpack, cache.bits), **opts)
    out = torch.empty_like(q)
    _combine_kernel[(b * hq, 1)](po, pm, pl, out, out, splits, SP=triton.next_power_of_2(splits), D=d, DC=d,
                                  **({} if interpreting() else {"num_warps": 4}))
    return out


def reference(q: torch.Tensor, cache: KVCache, length: int, prefix: int) -> torch.Tensor:
    """fp64 softmax attention over the dequantized cache (float below ``prefix``, ``(c - z) * s`` from there)."""
    b, hq, d = q.shape
    hkv = cache.kv_heads

    def deq(codes, s, z):
        c = codes[0, :, :length].long()
        if cache.bits == 4:
            c = torch.cat([c & 15, c >> 4], -1)
        return (c.double() - z[0, :, :length, None].double()) * s[0, :, :length, None].double()

    k = deq(cache.k_q, cache.k_scale, cache.k_zero)
    v = deq(cache.v_q, cache.v_scale, cache.v_zero)
    if prefix:
        k[:, :prefix] = cache.k_float[0, :, :prefix].double()
        v[:, :prefix] = cache.v_float[0, :, :prefix].double()
    k = k.repeat_interleave(hq // hkv, 0)
    v = v.repeat_interleave(hq // hkv, 0)
    att = torch.softmax(q[0].double()[:, None] @ k.transpose(1, 2) / math.sqrt(d), -1)
    return (att @ v)[:, 0][None]


def _tables(length: int, d: int, device):
    inv = 1.0 / (500000 ** (torch.arange(0, d, 2, device=device).float() / d))
    ang = torch.arange(length, device=device).float()[:, None] * inv[None]
    return ang.cos().contiguous(), ang.sin().contiguous()


def check(args) -> int:
    """CPU (interpreter): every variant vs ``decode_attention`` and vs the fp64 reference."""
    if not interpreting():
        sys.exit("--check runs under the interpreter: TRITON_INTERPRET=1 python bench/triton_attn_variants.py --check")
    from qcompile.runtime.triton.kv_attention import rope_store

    torch.manual_seed(0)
    length, nh, nkv = args.context, 8, 2
    bad = []
    for d in (64, 128):
        cos, sin = _tables(length, d, "cpu")
        qkv = torch.randn(length, (nh + 2 * nkv) * d, dtype=torch.float16)
        pos = torch.arange(length, dtype=torch.int32)
        q = torch.randn(1, nh, d, dtype=torch.float16)
        lens = torch.tensor([length], dtype=torch.int32)
        for bits in (8, 4):
            for pfx in (0, 37):
                prefix = torch.tensor([pfx], dtype=torch.int32)
                cache = KVCache.allocate(1, nkv, d, length, bits, prefix_capacity=64, dtype=torch.float16,
                                         device="cpu")
                rope_store(qkv, pos, length, cos, sin, cache, prefix, nh, nkv)
                ref = reference(q, cache, length, pfx)
                base = decode_attention(q, cache, lens, prefix)
                e_base = (base.double() - ref).abs().max().item()
                tol = max(3 * e_base, 2e-3)
                line = f"D={d} int{bits} P={pfx}: decode_attention vs fp64 {e_base:.2e}"
                for bs in (16, 32):
                    cfg = dict(BLOCK_S=bs, SPLITS=default_splits(1, nkv, length, "cpu", bs))
                    for name in VARIANTS:
                        out = variant_attention(q, cache, lens, prefix, name, cfg)
                        e_ref = (out.double() - ref).abs().max().item()
                        e_old = (out.double() - base.double()).abs().max().item()
                        ok = e_ref <= tol and math.isfinite(e_ref)
                        line += f"\n   {name:9s} BS={bs}: vs fp64 {e_ref:.2e}, vs decode_attention {e_old:.2e}" + (
                            "" if ok else f"  FAIL (> {tol:.1e})")
                        if not ok:
                            bad.append((d, bits, pfx, bs, name))
                print(line, flush=True)
    print("check:", "all variants within tolerance" if not bad else f"FAILED {bad}")
    return 1 if bad else 0


# -- SASS --------------------------------------------------------------------------------------------------------


def _types(code_ty: str) -> dict:
    return dict(q_ptr="*fp16", kf_ptr="*fp16", vf_ptr="*fp16", kq_ptr=code_ty, vq_ptr=code_ty, ks_ptr="*fp32",
                kz_ptr="*u8", vs_ptr="*fp32", vz_ptr="*u8", lens_ptr="*i32", prefix_ptr="*i32", po_ptr="*fp32",
                pm_ptr="*fp32", pl_ptr="*fp32", qk_scale="fp32", PCAP="i32", SMAX="i32", WINDOW="i32",
                NUM_SPLITS="i32")


def quant_loop(cubin: bytes) -> tuple[int, collections.Counter]:
    """The quantized loop's instruction mix: ``loop_mix``'s parsing, but of the LAST loop (backward branch) holding
    HMMA, since in these kernels the float-prefix loop comes first and, with permuted (gathered) columns, can be
    the longer one."""
    from qcompile.runtime.triton.aot_check import sass_text

    text = sass_text(cubin)
    ins = [(int(m.group(1), 16), m.group(2)) for m in
           re.finditer(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\d\s+)?([A-Z0-9_.]+)([^;]*);", text)]
    best = None
    for (addr, op), rest in zip(ins, re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\d\s+)?[A-Z0-9_.]+([^;]*);", text)):
        t = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if t and int(t.group(1), 16) < addr:
            body = [o.split(".")[0] for a, o in ins if int(t.group(1), 16) <= a <= addr]
            if "HMMA" in body and (best is None or addr > best[0]):
                best = (addr, body)
    body = best[1] if best else []
    return len(body), collections.Counter(body)


def sass(args) -> int:
    """Compile every variant (and ``_decode_kernel``) for sm_90 at D=128, G=4 (padded to 16): registers, spills,
    and the quantized loop's instruction mix (bench/triton_gemv_sass.py ``loop_mix``: the longest backward branch;
    in these kernels that is the quantized loop)."""
    if interpreting():
        sys.exit("--sass must not run under TRITON_INTERPRET")
    from bench.triton_gemv_sass import loop_mix
    from qcompile.runtime.triton.aot_check import compile_one

    rows = []
    combos = [(bs, w, st) for bs in (32, 64) for w in (1, 2, 4) for st in (2,)] + [(32, 1, 1), (64, 2, 1)]
    for bits in (8, 4):
        for bs, warps, stages in combos:
            kernels = [("existing", _decode_kernel, "*u8", dict(USE_DOT=True, IEEE=False, ON_CODES=True))]
            if (bs, warps, stages) == (32, 1, 2):  # the tuner's 32k pick on the H100 (unpadded rows, PDL)
                kernels.append(("pick", _decode_kernel, "*u8", dict(USE_DOT=True, IEEE=False, ON_CODES=True, GP=4,
                                                                    PDL=True)))
            kernels += [(n, _variant_kernel, "*i32" if u else "*u8",
                         dict(UNPACK=u, PREFETCH=pf, ASM=True, **multipliers(u, bits)))
                        for n, (u, pf) in VARIANTS.items()]
            for name, fn, cty, extra in kernels:
                consts = {**dict(NKV=8, G=4, GP=16, D=128, KV_BITS=bits, BLOCK_S=bs), **extra}
                try:
                    st = compile_one(fn, _types(cty), consts, {}, warps, stages, keep_cubin=True)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"int{bits} BS={bs} w={warps} st={stages} {name}: compile failed: {str(e)[:200]}")
                    continue
                n, mix = quant_loop(st["cubin"])
                longest = loop_mix(st["cubin"])[0]
                row = dict(longest_loop=longest, bits=bits, BLOCK_S=bs, num_warps=warps, num_stages=stages, kernel=name,
                           regs=st["regs"], spills=st["spills"], shared=st["shared"], loop_instructions=n,
                           per_token_per_thread=n / bs, per_token_warp_instr=n * warps / bs,
                           ldgsts=mix.get("LDGSTS", 0), ldg=mix.get("LDG", 0), lds=mix.get("LDS", 0),
                           ldsm=mix.get("LDSM", 0), sts=mix.get("STS", 0), prmt=mix.get("PRMT", 0),
                           hmma=mix.get("HMMA", 0), top=mix.most_common(8))
                rows.append(row)
                print(f"int{bits} BS={bs:3d} w={warps} st={stages} {name:9s}: regs {row['regs']:3d} spills "
                      f"{row['spills']:4d} smem {row['shared']:6d}  loop {n:5d} = {n / bs:5.1f}/token/thread "
                      f"({n * warps / bs:5.1f} warp-instr/token)  LDGSTS {row['ldgsts']:3d} LDG {row['ldg']:3d} "
                      f"LDS {row['lds']:3d} LDSM {row['ldsm']:3d} STS {row['sts']:3d} PRMT {row['prmt']:3d} "
                      f"HMMA {row['hmma']:3d}", flush=True)
    if args.sass_out:
        Path(args.sass_out).write_text(json.dumps(rows, indent=1))
    return 0


# -- GPU timing ----------------------------------------------------------------------------------------------


def gpu(args) -> int:
    if not torch.cuda.is_available():
        sys.exit("triton_attn_variants: the timing mode needs a CUDA GPU (--check / --sass run on CPU)")
    import torch.nn.functional as F

    from bench.triton_kernels import attention_setup, graph_time
    from qcompile.runtime.triton.kv_attention import _DECODE as DECODE_TUNER

    nh, nkv, d = 32, 8, 128
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rows": []}

    def save():
        res["seconds"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(res, indent=1, default=str))

    def timed(calls):
        try:
            return graph_time(calls), None
        except Exception as e:  # noqa: BLE001 - a configuration the compiler or device rejects
            torch.cuda.synchronize()
            return None, f"{type(e).__name__}: {str(e)[:160]}"

    shapes = [(32, 1, 2), (32, 2, 2), (64, 2, 2), (32, 1, 1)]  # BLOCK_S, warps, stages
    mults = (1, 2, 4)
    lengths = [int(v) for v in args.contexts.split(",")]
    for length in lengths:
        q, lens, prefix, caches = attention_setup(length, nh, nkv, d)
        ks = [c.k_float for c in caches[16]]
        vs = [c.v_float for c in caches[16]]
        q4 = q[:, :, None]
        sdpa, _ = timed([lambda k=k, v=v: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
                         for k, v in zip(ks, vs)])
        print(f"context {length} ({len(ks)} layers): SDPA fp16 (GQA) {sdpa * 1e6:.1f} us", flush=True)
        base = default_splits(1, nkv, length, "cuda", 64)
        for bits in (8, 4):
            cs = caches[bits]
            DECODE_TUNER.best.clear()
            ref = decode_attention(q, cs[0], lens, prefix)
            pick = DECODE_TUNER.best.get((1, nh, nkv, d, bits, length, torch.float16, False))
            t, _ = timed([lambda c=c: decode_attention(q, c, lens, prefix) for c in cs])
            row = dict(context=length, bits=bits, kernel="existing_tuned", config=pick, us=t * 1e6,
                       speedup_vs_sdpa=sdpa / t, sdpa_us=sdpa * 1e6, max_abs_diff_vs_existing=0.0)
            res["rows"].append(row)
            print(f"  int{bits} existing tuner pick {pick}: {t * 1e6:.1f} us ({sdpa / t:.2f}x SDPA)", flush=True)
            kernels = ["existing"] + list(VARIANTS)
            for name in kernels:
                best = None
                for bs, warps, stages in shapes:
                    if name == "existing" and stages == 1:
                        continue
                    for mult in mults:
                        cfg = dict(BLOCK_S=bs, SPLITS=max(1, min(base * mult, -(-length // bs), 1024)),
                                   num_warps=warps, num_stages=stages)
                        if name == "existing":
                            def fn(c, cfg=cfg):
                                return decode_attention(q, c, lens, prefix, config=cfg)
                        else:
                            def fn(c, cfg=cfg, name=name):
                                return variant_attention(q, c, lens, prefix, name, cfg)
                        t, err = timed([lambda c=c, fn=fn: fn(c) for c in cs])
                        diff = None
                        if t:
                            diff = (fn(cs[0]).float() - ref.float()).abs().max().item()
                        row = dict(context=length, bits=bits, kernel=name, config=cfg, error=err,
                                   max_abs_diff_vs_existing=diff, sdpa_us=sdpa * 1e6,
                                   **({"us": t * 1e6, "speedup_vs_sdpa": sdpa / t} if t else {}))
                        res["rows"].append(row)
                        if t and (best is None or t < best[0]):
                            best = (t, cfg, diff)
                        if args.verbose:
                            print(f"    {name} {cfg}: " + (f"{t * 1e6:.1f} us {sdpa / t:.2f}x diff {diff:.1e}"
                                                            if t else err), flush=True)
                if best:
                    print(f"  int{bits} {name:9s} best {best[1]}: {best[0] * 1e6:.1f} us ({sdpa / best[0]:.2f}x "
                          f"SDPA), max |diff| vs existing {best[2]:.1e}", flush=True)
                else:
                    print(f"  int{bits} {name:9s}: every config failed", flush=True)
            save()
        del caches, ks, vs
        torch.cuda.empty_cache()
    # summary table: best per (context, bits, kernel)
    print("\ncontext bits kernel     best_us  x_sdpa  config")
    summary = {}
    for r in res["rows"]:
        if r.get("us") is None:
            continue
        key = (r["context"], r["bits"], r["kernel"])
        if key not in summary or r["us"] < summary[key]["us"]:
            summary[key] = r
    for (length, bits, name), r in sorted(summary.items()):
        print(f"{length:7d} {bits:4d} {name:14s} {r['us']:7.1f} {r['speedup_vs_sdpa']:6.2f}  {r['config']}")
    res["best"] = [dict(context=k[0], bits=k[1], kernel=k[2], us=v["us"], speedup_vs_sdpa=v["speedup_vs_sdpa"],
                        config=v["config"], max_abs_diff_vs_existing=v.get("max_abs_diff_vs_existing"))
                   for k, v in sorted(summary.items())]
    save()
    print(f"saved {out} ({res['seconds']} s)")
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="CPU interpreter correctness (set TRITON_INTERPRET=1)")
    mode.add_argument("--sass", action="store_true", help="CPU sm_90 compile: regs, spills, SASS per token")
    ap.add_argument("--out", default="bench/results/triton_attn_variants.json", help="GPU mode: JSON results")
    ap.add_argument("--sass-out", default="", help="--sass: also write the rows as JSON here")
    ap.add_argument("--context", type=int, default=200, help="--check: context length")
    ap.add_argument("--contexts", default="8192,32768", help="GPU mode: context lengths")
    ap.add_argument("--verbose", action="store_true", help="GPU mode: print every config")
    args = ap.parse_args()
    if args.check:
        sys.exit(check(args))
    if args.sass:
        sys.exit(sass(args))
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("the timing mode needs compiled kernels: unset TRITON_INTERPRET")
    sys.exit(gpu(args))


if __name__ == "__main__":
    main()
