"""Weight-only int4/int8 matmul on ``PackedWeight``: a split-K GEMV for decode (M <= 8) and a tiled GEMM (prefill).

GEMV (decode is memory bound: the kernel must stream the packed weight once at close to peak bandwidth):

* the grid is (N tiles) x (K splits); each program reads a ``[BLOCK_R words, BLOCK_N]`` tile per step, i.e.
  ``BLOCK_R * pack`` K-rows of ``BLOCK_N`` columns, rows contiguous along N (coalesced 16-byte loads); at batch 1
  every tile stays 2-D in the load's layout (about 48 registers a thread, no shared-memory shuffles: checked with
  ``aot_check``); batches of 2..8 rows use [M, R, N] products, correct but not tuned (decode runs batch 1);
* codes become floats without int->float conversions: a code shifted into the top mantissa bits of 1.0f reads
  as ``1 + code / 2^bits``; the kernel sums ``x * (1 + code / 2^bits)`` and ``x`` per word-row and recovers
  ``sum x * (code - zero)`` once per word-row and column, so the inner loop is shift, and/or, fma per code
  (the zero point costs nothing per code); int4 at batch 1 on fp16 activations (compiled kernels, activations
  4-byte aligned) decodes two codes per instruction in half2 registers instead (``_dot8_half2``, inline PTX; the
  interpreter and fp32 activations take the float path);
* ``PAIRS`` (the default where it applies; ``QCOMPILE_GEMV_PAIRS=0`` turns it off): the half2 path two words of a
  column at a time, the scale per group in fp32 (``_pairs_step``): 4-9 % faster on the H100; rounded differently
  from a fp16 DequantizeLinear, and on SmolLM2 as close to ORT's greedy tokens as the per-word decode
  (docs/BENCHMARKS.md, fifteenth session);
* split-K partials go to an fp32 workspace; the last program to finish a column tile (an arrival counter per tile,
  acquire/release atomics) sums the partials in split order and writes the output, so the result is deterministic
  and one launch does it all (a second reduction kernel would cost as much as the GEMV itself at 4096x4096);
  wide programs (8-16 warps over a 32-64-column band and a long run of K) need few splits or none, and where they
  win the tuner picks them: their warps' sums meet in shared memory, with no workspace and no last-program tail;
* ``MMA``: a weight that also carries the tensor-core GEMV's words (``gemv_mma.attach``, the runner's
  ``mma_gemv``) adds that kernel's configurations to the batch-1 fp16 candidates, under a key of its own; the tuner
  keeps the faster per shape (``gemv_mma``: products on ``mma.sync``, words pre-permuted into its operand layout);
* ``BAND`` (a bench variant) reads the words from column bands ``[N / BAND, K / pack, BAND]`` instead, so that a
  program's slice is one contiguous run; ``packing.column_bands`` writes it, for bench/triton_sweep.py only (the
  runner packs row-major);
* the epilogue adds bias and a residual, and the prologue can compute SwiGLU's ``silu(gate) * up`` on the fly
  (``act="silu_mul"``), so down_proj reads the gate|up output directly.

GEMM: a grouped-ordering tiled matmul; the weight tile is unpacked and dequantized in registers and fed to
``tl.dot`` in the activations' dtype (fp16 on tensor cores; fp32 with IEEE precision for the exact path).
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import torch

from qcompile.runtime.triton._env import interpreting, require_triton
from qcompile.runtime.triton._tune import Tuner, launch_opts, num_sms, pdl_flag
from qcompile.runtime.triton.packing import PackedWeight

triton = require_triton()
import triton.language as tl  # noqa: E402

from qcompile.runtime.triton._jit import grouped_tile, tile_rows  # noqa: E402
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: E402

GEMV_MAX_M = 8


@triton.jit
def _finish(y, b_ptr, r_ptr, out_ptr, m0, offs_m, offs_n, m_mask, n_mask, stride_rm, stride_om,
            HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    """Bias, residual, store of the rows ``offs_m`` (the tile's first is ``m0``; ``tile_rows``: M x N may pass
    2^31)."""
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        y += tl.load(tile_rows(r_ptr, m0, offs_m, stride_rm) + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(tile_rows(out_ptr, m0, offs_m, stride_om) + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_act(x_ptr, off, mask, K, ACT_SILU_MUL: tl.constexpr):
    """Activations as float32; with ACT_SILU_MUL, ``silu(gate) * up`` from a row holding gate | up (K each)."""
    if ACT_SILU_MUL:
        g = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + off + K, mask=mask, other=0.0).to(tl.float32)
        return g * tl.sigmoid(g) * u
    else:
        return tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _pack_half2(lo, hi):
    """Two fp16 tensors -> int32 tensor holding the half2 (lo, hi)."""
    return (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _dot8_half2(words, x04, x15, x26, x37, s2, zz, mz):
    """Per int32 word of eight 4-bit codes c_0..c_7 (c_j in bits 4j..4j+3): ``sum_j x_j * (c_j - z) * s`` (fp32).

    The inner loop of the batch-1 GEMV is instruction bound at int4 (two codes per byte), so each word is decoded
    two codes at a time in packed half2 registers, the trick Marlin-style kernels use: one ``lop3``
    ``(w & 0x000F000F) | 0x6400_6400`` makes the half2 (1024 + c_0, 1024 + c_4) (the code lands in the low
    mantissa bits of 1024.0); the mask 0x00F000F0 gives (1024 + 16 c_1, 1024 + 16 c_5); a shift by 8 repeats it
    for c_2/c_6 and c_3/c_7. The codes are centred exactly (``v - (1024 + z)``, ``v / 16 - (64 + z)``), scaled
    in fp16 (the rounding a fp16 DequantizeLinear does), and multiplied into a half2 sum of four products per
    lane, which is widened to fp32 once per word: about 20 instructions per 8 codes instead of 4 per code.
    Whole loop, from the SASS (bench/triton_gemv_sass.py): 4.1 instructions per code against 6.1 at 64 x 16
    tiles, 4.6 against 7.1 at 64 x 8 (the layout conversion of these narrow tiles stays; ``_half2_consts`` took
    the first figures from 4.6 and 5.6); on the H200 the half2 path made the int4 GEMV 15-23 % faster at the
    Llama-3-8B shapes (bench/triton_sweep.py).
    ``x04`` ... ``x37``: the activations as half2 pairs (x_0, x_4), ...; ``s2``: (s, s); ``zz``: (1024 + z,
    1024 + z); ``mz``: (-(64 + z), -(64 + z)) -- all int32 bit patterns.
    """
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 a, q, acc;
        .reg .b16 h0, h1;
        .reg .f32 f0, f1;
        lop3.b32 a, $1, 0x000F000F, 0x64006400, 0xEA;
        sub.rn.f16x2 a, a, $7;
        mul.rn.f16x2 a, a, $6;
        mul.rn.f16x2 acc, a, $2;
        lop3.b32 a, $1, 0x00F000F0, 0x64006400, 0xEA;
        fma.rn.f16x2 a, a, $9, $8;
        mul.rn.f16x2 a, a, $6;
        fma.rn.f16x2 acc, a, $3, acc;
        shr.b32 q, $1, 8;
        lop3.b32 a, q, 0x000F000F, 0x64006400, 0xEA;
        sub.rn.f16x2 a, a, $7;
        mul.rn.f16x2 a, a, $6;
        fma.rn.f16x2 acc, a, $4, acc;
        lop3.b32 a, q, 0x00F000F0, 0x64006400, 0xEA;
        fma.rn.f16x2 a, a, $9, $8;
        mul.rn.f16x2 a, a, $6;
        fma.rn.f16x2 acc, a, $5, acc;
        mov.b32 {h0, h1}, acc;
        cvt.f32.f16 f0, h0;
        cvt.f32.f16 f1, h1;
        add.rn.f32 f0, f0, f1;
        mov.b32 $0, f0;
        }
        """,
        constraints="=r,r,r,r,r,r,r,r,r,r",
        args=[words, x04, x15, x26, x37, s2, zz, mz, tl.full(words.shape, 0x2C002C00, tl.int32)],  # (1/16, 1/16)
        dtype=tl.int32, is_pure=True, pack=1,
    ).to(tl.float32, bitcast=True)


@triton.jit
def _half2_consts(scale, z):
    """``_dot8_half2``'s per-column constants from a scale (fp16) and a zero point (0..15): (s, s), (1024 + z,
    1024 + z) and (-(64 + z), -(64 + z)) as half2 bit patterns, three instructions a column: the zero point's byte
    placed under 0x64 reads as 1024 + z (one ``prmt``), and -(64 + z) = 960 - (1024 + z) exactly."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 m1, c960;
        mov.b32 $0, {$3, $3};
        prmt.b32 $1, $4, 0x64006400, 0x7050;
        mov.b32 m1, 0xBC00BC00;
        mov.b32 c960, 0x63806380;
        fma.rn.f16x2 $2, $1, m1, c960;
        }
        """,
        constraints="=r,=r,=r,h,r", args=[scale.to(tl.float16), z.to(tl.int32)],
        dtype=(tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _act_pair_half2(x_ptr, offs_r, j: tl.constexpr, r_mask, K):
    """The half2 (x_j, x_{j+4}) of each word row's eight SwiGLU activations ``silu(gate) * up``."""
    lo = _load_act(x_ptr, offs_r * 8 + j, r_mask, K, True).to(tl.float16)
    hi = _load_act(x_ptr, offs_r * 8 + j + 4, r_mask, K, True).to(tl.float16)
    return _pack_half2(lo, hi)


@triton.jit
def _x_pairs_half2(x_ptr, offs_r, r_mask, K, ACT_SILU_MUL: tl.constexpr):
    """The half2 activation pairs (x0,x4) (x1,x5) (x2,x6) (x3,x7) of each word row ``offs_r``."""
    if ACT_SILU_MUL:  # silu(gate) * up computed per value, then paired
        x04 = _act_pair_half2(x_ptr, offs_r, 0, r_mask, K)
        x15 = _act_pair_half2(x_ptr, offs_r, 1, r_mask, K)
        x26 = _act_pair_half2(x_ptr, offs_r, 2, r_mask, K)
        x37 = _act_pair_half2(x_ptr, offs_r, 3, r_mask, K)
    else:  # the row's eight fp16 activations as four int32 words (x0,x1) (x2,x3) (x4,x5) (x6,x7), re-paired
        xw = x_ptr.to(tl.pointer_type(tl.int32)) + offs_r * 4
        a = tl.load(xw, mask=r_mask, other=0)
        b = tl.load(xw + 1, mask=r_mask, other=0)
        c = tl.load(xw + 2, mask=r_mask, other=0)
        d = tl.load(xw + 3, mask=r_mask, other=0)
        x04, x15, x26, x37 = tl.inline_asm_elementwise(
            asm="""
            prmt.b32 $0, $4, $6, 0x5410;
            prmt.b32 $1, $4, $6, 0x7632;
            prmt.b32 $2, $5, $7, 0x5410;
            prmt.b32 $3, $5, $7, 0x7632;
            """,
            constraints="=r,=r,=r,=r,r,r,r,r", args=[a, b, c, d], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True, pack=1)
    return x04, x15, x26, x37


@triton.jit
def _half2_step(x_ptr, s_ptr, z_ptr, words, r0, offs_r, offs_n, r_mask, n_mask, w_mask, N, K,
                GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, ACT_SILU_MUL: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """One [BLOCK_R words, BLOCK_N] step of the batch-1 int4 GEMV on fp16 activations (``_dot8_half2``)."""
    shape: tl.constexpr = (BLOCK_R, BLOCK_N)
    x04, x15, x26, x37 = _x_pairs_half2(x_ptr, offs_r, r_mask, K, ACT_SILU_MUL)
    x04 = tl.broadcast_to(x04[:, None], shape)
    x15 = tl.broadcast_to(x15[:, None], shape)
    x26 = tl.broadcast_to(x26[:, None], shape)
    x37 = tl.broadcast_to(x37[:, None], shape)
    if GROUP % (BLOCK_R * 8) == 0:  # the whole step lies in one group (steps start at multiples of BLOCK_R)
        sn = (r0 // (GROUP // 8)) * N + offs_n[None, :]
        s_mask = n_mask[None, :]
    else:
        sn = (offs_r // (GROUP // 8))[:, None] * N + offs_n[None, :]
        s_mask = w_mask
    scale = tl.load(s_ptr + sn, mask=s_mask, other=0.0)
    if HAS_ZERO:
        z = tl.load(z_ptr + sn, mask=s_mask, other=0)
    else:
        z = tl.full(sn.shape, 8, tl.uint8)
    # the constants per scale element (once per column when the step lies in one group), then broadcast
    s2, zz, mz = _half2_consts(scale, z)
    return _dot8_half2(words, x04, x15, x26, x37, tl.broadcast_to(s2, shape), tl.broadcast_to(zz, shape),
                       tl.broadcast_to(mz, shape))


def _pair_word_ptx(w: int, x: int, first: bool) -> str:
    """PTX of one word (operand ``$w``) in ``_dot16_half2``: its activation pairs are ``$x`` .. ``$x+3``; the zero
    terms are ``$11`` (1024 + z) and ``$12`` (-(64 + z)), ``$13`` is (1/16, 1/16)."""
    start = f"mul.rn.f16x2 acc, a, ${x};" if first else f"fma.rn.f16x2 acc, a, ${x}, acc;"
    return f"""
        lop3.b32 a, ${w}, 0x000F000F, 0x64006400, 0xEA;
        sub.rn.f16x2 a, a, $11;
        {start}
        lop3.b32 a, ${w}, 0x00F000F0, 0x64006400, 0xEA;
        fma.rn.f16x2 a, a, $13, $12;
        fma.rn.f16x2 acc, a, ${x + 1}, acc;
        shr.b32 q, ${w}, 8;
        lop3.b32 a, q, 0x000F000F, 0x64006400, 0xEA;
        sub.rn.f16x2 a, a, $11;
        fma.rn.f16x2 acc, a, ${x + 2}, acc;
        lop3.b32 a, q, 0x00F000F0, 0x64006400, 0xEA;
        fma.rn.f16x2 a, a, $13, $12;
        fma.rn.f16x2 acc, a, ${x + 3}, acc;"""


_DOT16_PTX = tl.constexpr("""
        {
        .reg .b32 a, q, acc;
        .reg .b16 h0, h1;
        .reg .f32 f0, f1;""" + _pair_word_ptx(1, 3, True) + _pair_word_ptx(2, 7, False) + """
        mov.b32 {h0, h1}, acc;
        cvt.f32.f16 f0, h0;
        cvt.f32.f16 f1, h1;
        add.rn.f32 f0, f0, f1;
        mov.b32 $0, f0;
        }
        """)  # a constexpr: jitted code may read a global only as one


@triton.jit
def _dot16_half2(we, wo, xe04, xe15, xe26, xe37, xo04, xo15, xo26, xo37, zz, mz):
    """Two words of one column in word rows 2i and 2i + 1 of one group (16 codes): ``sum_j x_j * (c_j - z)`` in
    fp32, the scale left out (``_pairs_step`` applies it per group in fp32). As ``_dot8_half2`` without the four
    per-word scale products, and one fp32 conversion per two words: 15 instructions a word instead of 21. The
    activations come pre-scaled by 1/32, so a half2 lane sums eight products of at most 15/32 |x| each and stays
    finite wherever |x| < 17000."""
    return tl.inline_asm_elementwise(
        asm=_DOT16_PTX,
        constraints="=r,r,r,r,r,r,r,r,r,r,r,r,r,r",
        args=[we, wo, xe04, xe15, xe26, xe37, xo04, xo15, xo26, xo37, zz, mz,
              tl.full(we.shape, 0x2C002C00, tl.int32)],  # (1/16, 1/16)
        dtype=tl.int32, is_pure=True, pack=1,
    ).to(tl.float32, bitcast=True)


@triton.jit
def _x_pairs_scaled(x_ptr, offs_r, r_mask, K, ACT_SILU_MUL: tl.constexpr):
    """``_x_pairs_half2`` times 1/32 (exact: a power of two, down to fp16's subnormals)."""
    x04, x15, x26, x37 = _x_pairs_half2(x_ptr, offs_r, r_mask, K, ACT_SILU_MUL)
    return _scale_pairs_32(x04, x15, x26, x37)


# a half2 word times 1/32 (exact): the activations as ``_dot16_half2`` takes them (also gemv_chain_staged's Gluon)
_TIMES_1_32_PTX = tl.constexpr("{ .reg .b32 k; mov.b32 k, 0x28002800; mul.rn.f16x2 $0, $1, k; }")


@triton.jit
def _times_1_32(pair):
    return tl.inline_asm_elementwise(asm=_TIMES_1_32_PTX, constraints="=r,r", args=[pair], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _scale_pairs_32(x04, x15, x26, x37):
    """Four half2 activation pairs times 1/32 (``_dot16_half2``'s input)."""
    return _times_1_32(x04), _times_1_32(x15), _times_1_32(x26), _times_1_32(x37)


@triton.jit
def _pairs_step(x_ptr, s_ptr, z_ptr, we, wo, r0, offs_p, offs_n, p_mask, n_mask, wp_mask, N, K,
                GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, ACT_SILU_MUL: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """One step of the batch-1 int4 GEMV with row pairs (``PAIRS``): ``we``/``wo`` are the words of rows
    ``offs_p`` (even) and ``offs_p + 1``; returns the step's [BLOCK_R / 2, BLOCK_N] increment, in units of 1/32."""
    shape: tl.constexpr = (BLOCK_R // 2, BLOCK_N)
    xe04, xe15, xe26, xe37 = _x_pairs_scaled(x_ptr, offs_p, p_mask, K, ACT_SILU_MUL)
    xo04, xo15, xo26, xo37 = _x_pairs_scaled(x_ptr, offs_p + 1, p_mask, K, ACT_SILU_MUL)
    if GROUP % (BLOCK_R * 8) == 0:  # the whole step lies in one group
        sn = (r0 // (GROUP // 8)) * N + offs_n[None, :]
        s_mask = n_mask[None, :]
    else:
        sn = (offs_p // (GROUP // 8))[:, None] * N + offs_n[None, :]
        s_mask = wp_mask
    scale = tl.load(s_ptr + sn, mask=s_mask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(z_ptr + sn, mask=s_mask, other=0)
    else:
        z = tl.full(sn.shape, 8, tl.uint8)
    _s2, zz, mz = _half2_consts(tl.zeros(sn.shape, tl.float16), z)
    part = _dot16_half2(we, wo, tl.broadcast_to(xe04[:, None], shape), tl.broadcast_to(xe15[:, None], shape),
                        tl.broadcast_to(xe26[:, None], shape), tl.broadcast_to(xe37[:, None], shape),
                        tl.broadcast_to(xo04[:, None], shape), tl.broadcast_to(xo15[:, None], shape),
                        tl.broadcast_to(xo26[:, None], shape), tl.broadcast_to(xo37[:, None], shape),
                        tl.broadcast_to(zz, shape), tl.broadcast_to(mz, shape))
    return part * scale


@triton.jit
def _gemv_step(x_ptr, s_ptr, z_ptr, words, r0, offs_r, offs_n, offs_m, r_mask, n_mask, m_mask, w_mask, N, K,
               stride_xm, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
               ACT_SILU_MUL: tl.constexpr, HALF2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """One ``[BLOCK_R words, BLOCK_N]`` weight tile (``words``, already loaded) against the activations: the
    accumulator's increment, ``[BLOCK_R, BLOCK_N]`` at batch 1, ``[BLOCK_M, BLOCK_R, BLOCK_N]`` above."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    ROWS_PER_GROUP: tl.constexpr = GROUP // PACK
    # a code c placed in the top BITS mantissa bits of 1.0f reads as f = 1 + c / 2^BITS (one shift and one
    # and/or per code, no conversion); sum_k x_k (c_k - z) = 2^BITS * sum_k x_k f_k - (2^BITS + z) * sum_k x_k
    HI: tl.constexpr = 23 - BITS
    CMASK: tl.constexpr = MASK << HI
    ONE: tl.constexpr = 0x3F800000
    TWO_B: tl.constexpr = float(1 << BITS)
    SYM_ZZ: tl.constexpr = float((1 << BITS) + (1 << (BITS - 1)))
    if HALF2:  # batch 1, int4 codes, fp16 activations: see _dot8_half2
        return _half2_step(x_ptr, s_ptr, z_ptr, words, r0, offs_r, offs_n, r_mask, n_mask, w_mask, N, K,
                           GROUP, HAS_ZERO, ACT_SILU_MUL, BLOCK_R, BLOCK_N)
    else:
        sn = (offs_r // ROWS_PER_GROUP)[:, None] * N + offs_n[None, :]
        scale = tl.load(s_ptr + sn, mask=w_mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zz = tl.load(z_ptr + sn, mask=w_mask, other=0).to(tl.float32) + TWO_B
        else:
            zz = SYM_ZZ
        if BLOCK_M == 1:
            part2 = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
            xs2 = tl.zeros((BLOCK_R,), dtype=tl.float32)
        else:
            part3 = tl.zeros((BLOCK_M, BLOCK_R, BLOCK_N), dtype=tl.float32)
            xs3 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for j in tl.static_range(PACK):
            if j * BITS <= HI:
                placed = words << (HI - j * BITS)
            else:
                placed = words >> (j * BITS - HI)
            f = ((placed & CMASK) | ONE).to(tl.float32, bitcast=True)
            if BLOCK_M == 1:
                xk = _load_act(x_ptr, offs_r * PACK + j, r_mask, K, ACT_SILU_MUL)
                part2 += xk[:, None] * f
                xs2 += xk
            else:
                x_off = offs_m[:, None] * stride_xm + (offs_r * PACK + j)[None, :]
                xk = _load_act(x_ptr, x_off, m_mask[:, None] & r_mask[None, :], K, ACT_SILU_MUL)
                part3 += xk[:, :, None] * f[None, :, :]
                xs3 += xk
        if BLOCK_M == 1:
            return scale * (part2 * TWO_B - zz * xs2[:, None])
        else:
            return scale[None, :, :] * (part3 * TWO_B - zz * xs3[:, :, None])


@triton.jit
def _load_tile(w_ptr, r0, r_hi, offs_n, n_mask, N, n_rows, BLOCK_R: tl.constexpr, BAND: tl.constexpr):
    """The ``[BLOCK_R words, BLOCK_N]`` weight tile at word row ``r0`` (rows from ``r_hi`` on masked to 0), with
    its row offsets and masks. ``BAND`` > 0: the words are stored in column bands, ``[N / BAND, K / pack, BAND]``."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < r_hi
    w_mask = r_mask[:, None] & n_mask[None, :]
    if BAND:
        off = offs_r[:, None] * BAND + ((offs_n // BAND) * n_rows * BAND + offs_n % BAND)[None, :]
    else:
        off = offs_r[:, None] * N + offs_n[None, :]
    words = tl.load(w_ptr + off, mask=w_mask, other=0)
    return words, offs_r, r_mask, w_mask


@triton.jit
def _load_pair_tiles(w_ptr, r0, r_hi, offs_n, n_mask, N, BLOCK_R: tl.constexpr):
    """The step at word row ``r0`` as two ``[BLOCK_R / 2, BLOCK_N]`` tiles: the even rows and the odd rows (each
    row still one coalesced run along N); steps and splits start on even rows, and K / 8 is even (groups of 16+)."""
    offs_p = r0 + 2 * tl.arange(0, BLOCK_R // 2)
    p_mask = offs_p < r_hi
    wp_mask = p_mask[:, None] & n_mask[None, :]
    off = offs_p[:, None] * N + offs_n[None, :]
    we = tl.load(w_ptr + off, mask=wp_mask, other=0)
    wo = tl.load(w_ptr + off + N, mask=wp_mask, other=0)
    return we, wo, offs_p, p_mask, wp_mask


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, r_ptr, out_ptr, part_ptr, lock_ptr,
                 M, N, K, stride_xm, stride_rm, stride_om,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_RES: tl.constexpr, ACT_SILU_MUL: tl.constexpr, HALF2: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr,
                 PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False, BAND: tl.constexpr = 0,
                 PAIRS: tl.constexpr = False):
    PACK: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_rows = K // PACK
    per_split = tl.cdiv(tl.cdiv(n_rows, SPLIT_K), BLOCK_R) * BLOCK_R
    r_lo = pid_k * per_split
    r_hi = tl.minimum(r_lo + per_split, n_rows)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    # batch 1 (decode) keeps every tile 2-D in the weight's own layout: a 3-D [M, R, N] product would make the
    # compiler shuffle each dequantized tile through shared memory to broadcast it over M
    if PAIRS:
        acc = tl.zeros((BLOCK_R // 2, BLOCK_N), dtype=tl.float32)
    elif BLOCK_M == 1:
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_R, BLOCK_N), dtype=tl.float32)
    r_start = r_lo
    if PAIRS:  # batch 1, int4, fp16 activations, row-major words: see _pairs_step
        if PREFETCH:
            if PDL:
                gdc_launch_dependents()
            we, wo, offs_p, p_mask, wp_mask = _load_pair_tiles(w_ptr, r_lo, r_hi, offs_n, n_mask, N, BLOCK_R)
            if PDL:
                gdc_wait()
            acc += _pairs_step(x_ptr, s_ptr, z_ptr, we, wo, tl.minimum(r_lo, n_rows - 2), offs_p, offs_n, p_mask,
                               n_mask, wp_mask, N, K, GROUP, HAS_ZERO, ACT_SILU_MUL, BLOCK_R, BLOCK_N)
            r_start = r_lo + BLOCK_R
        elif PDL:
            gdc_wait()
        for r0 in range(r_start, r_hi, BLOCK_R):
            we, wo, offs_p, p_mask, wp_mask = _load_pair_tiles(w_ptr, r0, r_hi, offs_n, n_mask, N, BLOCK_R)
            acc += _pairs_step(x_ptr, s_ptr, z_ptr, we, wo, r0, offs_p, offs_n, p_mask, n_mask, wp_mask, N, K,
                               GROUP, HAS_ZERO, ACT_SILU_MUL, BLOCK_R, BLOCK_N)
    elif PREFETCH:  # the first weight tile is read before waiting (PDL): weights are constants, not the kernel before's
        # output, so their stream overlaps that kernel's tail instead of starting after it; and the next kernel may
        # launch at once (its gdc_wait still waits for all of this one)
        if PDL:
            gdc_launch_dependents()
        words, offs_r, r_mask, w_mask = _load_tile(w_ptr, r_lo, r_hi, offs_n, n_mask, N, n_rows, BLOCK_R, BAND)
        if PDL:
            gdc_wait()
        # an empty split (r_lo >= r_hi) still takes this step, its codes and activations masked to 0: the half2
        # path reads one scale row per step from r0 alone, so r0 is kept on a real row
        r_first = tl.minimum(r_lo, n_rows - 1)
        acc += _gemv_step(x_ptr, s_ptr, z_ptr, words, r_first, offs_r, offs_n, offs_m, r_mask, n_mask, m_mask,
                          w_mask, N, K, stride_xm, BITS, GROUP, HAS_ZERO, ACT_SILU_MUL, HALF2, BLOCK_M, BLOCK_R,
                          BLOCK_N)
        r_start = r_lo + BLOCK_R
    elif PDL:  # launched as a programmatic dependent: x and the workspace are the previous kernel's until it is done
        gdc_wait()
    if not PAIRS:
        for r0 in range(r_start, r_hi, BLOCK_R):
            words, offs_r, r_mask, w_mask = _load_tile(w_ptr, r0, r_hi, offs_n, n_mask, N, n_rows, BLOCK_R, BAND)
            acc += _gemv_step(x_ptr, s_ptr, z_ptr, words, r0, offs_r, offs_n, offs_m, r_mask, n_mask, m_mask, w_mask,
                              N, K, stride_xm, BITS, GROUP, HAS_ZERO, ACT_SILU_MUL, HALF2, BLOCK_M, BLOCK_R, BLOCK_N)
    if PDL and not PREFETCH:  # every weight is read: the next kernel may start launching
        gdc_launch_dependents()
    if PAIRS:
        y = tl.sum(acc, axis=0)[None, :] * 32.0  # the activations' 1/32
    elif BLOCK_M == 1:
        y = tl.sum(acc, axis=0)[None, :]
    else:
        y = tl.sum(acc, axis=1)
    o_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        _finish(y, b_ptr, r_ptr, out_ptr, 0, offs_m, offs_n, m_mask, n_mask, stride_rm, stride_om, HAS_BIAS,
                HAS_RES)
    else:
        tl.store(part_ptr + (pid_k * BLOCK_M + offs_m[:, None]) * N + offs_n[None, :], y, mask=o_mask)
        tl.debug_barrier()  # every thread's partial is written before the (release) arrival below
        arrived = tl.atomic_add(lock_ptr + pid_n, 1)
        if arrived == SPLIT_K - 1:  # last to arrive: sum the partials in split order (deterministic)
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(part_ptr + (s * BLOCK_M + offs_m[:, None]) * N + offs_n[None, :], mask=o_mask,
                                 other=0.0, cache_modifier=".cg")
            _finish(total, b_ptr, r_ptr, out_ptr, 0, offs_m, offs_n, m_mask, n_mask, stride_rm, stride_om, HAS_BIAS,
                    HAS_RES)
            tl.atomic_xchg(lock_ptr + pid_n, 0)  # ready for the next launch (and for CUDA-graph replays)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, r_ptr, out_ptr,
                 M, N, K, stride_xm, stride_rm, stride_om,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_RES: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    BLOCK_R: tl.constexpr = BLOCK_K // PACK
    SYM_ZERO: tl.constexpr = 1 << (BITS - 1)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    shifts = tl.arange(0, PACK) * BITS
    n_rows = K // PACK
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = tile_rows(x_ptr, pid_m * BLOCK_M, offs_m, stride_xm)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & (kk < K)[None, :], other=0.0)
        rr = k0 // PACK + offs_r
        words = tl.load(w_ptr + rr[:, None] * N + offs_n[None, :], mask=(rr < n_rows)[:, None] & n_mask[None, :],
                        other=0)
        codes = (words[:, None, :] >> shifts[None, :, None]) & MASK  # [BLOCK_R, PACK, BLOCK_N]: k = PACK*r + j
        codes = tl.reshape(codes, (BLOCK_K, BLOCK_N)).to(tl.float32)
        if GROUP % BLOCK_K == 0:  # the whole K-tile is one group: one scale row
            sn = (k0 // GROUP) * N + offs_n
            scale = tl.load(s_ptr + sn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_ZERO:
                zero = tl.load(z_ptr + sn, mask=n_mask, other=0).to(tl.float32)[None, :]
        else:
            sn = (kk // GROUP)[:, None] * N + offs_n[None, :]
            s_mask = (kk < K)[:, None] & n_mask[None, :]
            scale = tl.load(s_ptr + sn, mask=s_mask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                zero = tl.load(z_ptr + sn, mask=s_mask, other=0).to(tl.float32)
        if HAS_ZERO:
            w = (codes - zero) * scale
        else:
            w = (codes - SYM_ZERO) * scale
        w = w.to(x_ptr.dtype.element_ty)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    _finish(acc, b_ptr, r_ptr, out_ptr, pid_m * BLOCK_M, offs_m, offs_n, m_mask, n_mask, stride_rm, stride_om,
            HAS_BIAS, HAS_RES)


# -- configurations ------------------------------------------------------------------------------------------

_GEMV = Tuner("wq_gemv")
_GEMM = Tuner("wq_gemm")


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def gemv_candidates(m: int, n: int, k: int, bits: int, sms: int) -> list[dict]:
    """Tile shapes, each with the split factor that puts about eight programs on each of ``sms`` multiprocessors,
    best guess first. The same tiles serve the half2 path (``_dot8_half2``): tiles of 128 columns per warp, which
    avoid Triton's layout conversion of the weight tile, measured slower on the H200 (fewer column tiles need more
    K splits, and the split-K reduction costs more than the conversion; bench/triton_sweep.py)."""
    pack = 32 // bits
    rows = k // pack
    bm = _pow2(m)
    if interpreting():  # few, large programs: the interpreter's cost is per operation, not per element
        return [dict(BLOCK_M=bm, BLOCK_N=min(512, _pow2(n)), BLOCK_R=min(64, _pow2(rows)), SPLIT_K=1)]
    short, long, longer = 64 // pack, 128 // pack, 256 // pack  # word rows per step: 64, 128 or 256 K-rows
    out = []
    for bn, br, warps in ((128, short, 4), (256, short, 8), (128, long, 4), (64, long, 4), (256, long, 8),
                          (64, short, 4), (32, short, 4), (64, longer, 4), (128, longer, 8)):
        # batch 1: 2-D tiles, a few dozen registers; batch > 1: [M, R, N] products, keep them <= 32 per thread
        if bm > 1 and bm * br * bn > 32 * 32 * warps or bm == 1 and bn == 32:
            continue
        tiles = -(-n // bn)
        # one split per tile shape (every candidate is compiled when a shape is first tuned): the one whose
        # program count is closest to eight per multiprocessor (what tuning over all splits picked on the H100),
        # within the K-rows available
        splits = [sp for sp in (1, 2, 4, 8, 16, 32) if sp == 1 or rows // sp >= 2 * br]
        split = min(splits, key=lambda sp: abs(math.log2(tiles * sp / (8 * sms))))
        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, SPLIT_K=split, num_warps=warps, num_stages=2))
    if bm == 1 and bits == 4:  # (8-bit codes: these tiles spill registers on the float path, aot_check --all)
        # wide programs: 8-16 warps on a band of 32-64 columns and a long run of K rows, with few or no K splits:
        # the warps' sums meet in shared memory rather than in the split-K workspace, so the last program's
        # reduction shrinks or goes. Each is offered at the split that runs about 16 warps per multiprocessor (one
        # wave) and at twice that: on the H100 the first won at 4096 x 4096 (no split) and the second at
        # 4096 x 14336 (bench/triton_sweep.py, 2026-12-06). 32 x 4096 holds a whole 4096-deep slice in one step,
        # so a PDL launch reads all its words before waiting on the kernel before (PREFETCH peels one step); the
        # per-word tuner did not pick it on the H100 (docs/BENCHMARKS.md, fifteenth session)
        for bn, br_k, warps in ((32, 1024, 16), (32, 512, 8), (64, 1024, 8), (32, 2048, 16), (32, 4096, 16)):
            br = br_k // pack
            if br > 2 * rows:  # a step mostly past K (tiny models)
                continue
            tiles = -(-n // bn)
            splits = [sp for sp in (1, 2, 4, 8, 16) if sp == 1 or rows // sp >= br]
            split = min(splits, key=lambda sp: abs(math.log2(tiles * sp * warps / (16 * sms))))
            for sp in dict.fromkeys((split, min(2 * split, splits[-1]))):
                out.append(dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_R=br, SPLIT_K=sp, num_warps=warps, num_stages=2))
    return out


def gemm_candidates(m: int, n: int, k: int, group: int, is_fp32: bool, bits: int = 4) -> list[dict]:
    """Tiles x pipeline depth for the prefill GEMM, Hopper-sized tiles first. 128-deep K tiles of 8-bit codes in
    groups smaller than the tile pipeline three stages, not four: four outgrow Hopper's 227 KiB of shared memory
    there (242-254 KB at groups of 32, ``aot_check --all``; 64-deep tiles fit)."""
    if interpreting():
        return [dict(BLOCK_M=16, BLOCK_N=min(128, max(16, _pow2(n))), BLOCK_K=64 if k >= 64 else 32, GROUP_M=4)]
    if is_fp32:  # the exact path: FMA dots, smaller tiles
        return [dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2),
                dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)]
    tiles = [  # (BM, BN, BK, warps, stages): Hopper-sized tiles first for large M
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3), (64, 128, 64, 4, 4),
        (32, 128, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 128, 4, 4), (32, 64, 64, 4, 4),
    ]
    out = []
    for bm, bn, bk, warps, stages in tiles:
        if bm > max(16, _pow2(m)) or bk > max(32, _pow2(k)):
            continue
        if bits == 8 and group < bk and bk >= 128:
            stages = min(stages, 3)
        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages))
    return out


class _Workspace:
    """Split-K partials and per-tile arrival counters, one pair per device, grown before (never during) capture.
    Outgrown pairs stay allocated: a CUDA graph captured on one keeps its addresses, and if the caching allocator
    handed that memory to another tensor, the graph's replays would count arrivals in it and read back garbage
    (seen on the H100: NaN logits from a captured decode step after a prefill grew the workspace). They are kept for
    the life of the process: a few split-K partials of one output row each.

    One pair serves every split-K GEMV (this module's, ``gemv_mma``'s and ``gemv_digits``'), also next to each other
    in a decode step. That is safe because each kernel touches the partials and the counters only after its PDL wait
    (a plain launch: after the kernel before has ended), i.e. once the kernel before has finished, and its last
    arriving program sets its counter back to zero."""

    buffers: dict = {}
    retired: list = []

    @classmethod
    def get(cls, device, part_numel: int, lock_numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        part, lock = cls.buffers.get(key, (None, None))
        if part is None or part.numel() < part_numel or lock.numel() < lock_numel:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("split-K workspace must be sized before CUDA-graph capture (run once eagerly)")
            part_numel = max(part_numel, 0 if part is None else part.numel())
            lock_numel = max(lock_numel, 0 if lock is None else lock.numel())
            if part is not None:
                cls.retired.append((part, lock))
            part = torch.empty(part_numel, dtype=torch.float32, device=device)
            lock = torch.zeros(lock_numel, dtype=torch.int32, device=device)
            cls.buffers[key] = (part, lock)
        return part, lock


# -- entry points --------------------------------------------------------------------------------------------


def wq_linear(x: torch.Tensor, pw: PackedWeight, *, residual: torch.Tensor | None = None, act: str | None = None,
              out: torch.Tensor | None = None, config: dict | None = None, pdl: bool = False) -> torch.Tensor:
    """``act(x) @ W (+ bias) (+ residual)`` with W dequantized on the fly; x [.., K] ([.., 2K] gate|up with
    ``act="silu_mul"``, GEMV only), result [.., N] in x's dtype. M <= 8 rows take the GEMV, more the GEMM.
    ``pdl``: the GEMV is launched as a programmatic dependent that reads its first weight tile before waiting for
    the kernel before (``PDL`` + ``PREFETCH``; sm_90+, a plain launch under the interpreter), with tiles tuned for
    chains of such launches."""
    k, n = pw.in_features, pw.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if act not in (None, "silu_mul"):
        raise ValueError(f"act must be None or 'silu_mul', got {act!r}")
    if x2.shape[1] != (2 * k if act else k):
        raise ValueError(f"x has {x2.shape[1]} features, the weight expects {2 * k if act else k}")
    if pw.scale.dtype != x.dtype:
        raise ValueError(f"weight scales are {pw.scale.dtype}, activations {x.dtype}: move the weight with "
                         f".to(dtype={x.dtype})")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res = None
    if residual is not None:
        res = residual.reshape(m, n)
        if res.stride(-1) != 1:
            res = res.contiguous()
    if m <= GEMV_MAX_M:
        _gemv(x2, pw, res, act, out, config, pdl)
    else:
        if act:
            x2 = _silu_mul_torch(x2)
        _gemm(x2, pw, res, out, config)
    return out.reshape(*lead, n)


def _silu_mul_torch(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, -1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def half2_gemv(bits: int, m: int, dtype: torch.dtype) -> bool:
    """Whether the GEMV takes the half2 path (``_dot8_half2``): int4 codes, one fp16 row, compiled kernels."""
    return bits == 4 and m == 1 and dtype == torch.float16 and not interpreting()


def gemv_row_pairs(pw: PackedWeight, half2: bool) -> bool:
    """Whether the tuner's candidates decode row pairs (``PAIRS``): on the half2 path, groups of a multiple of 16,
    unless ``QCOMPILE_GEMV_PAIRS=0``. Pairs are 4-9 % faster on the H100 and round differently (the scale applied
    per group in fp32, not a fp16 DequantizeLinear per code); on SmolLM2 they keep ORT's greedy tokens as often as
    the per-word decode (bench/triton_e2e.py --smollm2)."""
    return half2 and pw.group_size % 16 == 0 and os.environ.get("QCOMPILE_GEMV_PAIRS", "1") != "0"


def gemv_tuning_key(x: torch.Tensor, pw: PackedWeight, act: str | None = None, pdl: bool = False) -> tuple:
    """The GEMV tuner's key for these operands (``x`` as passed to ``wq_linear``, 2-D). PDL launches are tuned
    apart, as chains (what they change is how a launch overlaps the one before); row-pair candidates apart from
    per-word ones (the switch may change within a process); weights that carry the tensor-core GEMV's words
    (``gemv_mma``) apart, their candidates including that kernel's."""
    half2 = _gemv_half2(x, pw)
    return _gemv_key(x, pw, act, pdl, gemv_row_pairs(pw, half2), _gemv_mma_ready(pw, half2))


def _gemv_key(x: torch.Tensor, pw: PackedWeight, act: str | None, pdl: bool, pairs: bool, mma: bool) -> tuple:
    return ((x.shape[0], pw.out_features, pw.in_features, pw.bits, pw.group_size, x.dtype, act)
            + (("pdl",) if pdl else ()) + (("pairs",) if pairs else ()) + (("mma",) if mma else ()))


def _gemv_half2(x: torch.Tensor, pw: PackedWeight) -> bool:
    """The half2 path for these operands: ``half2_gemv``, and activations 4-byte aligned (read as int32 pairs)."""
    return half2_gemv(pw.bits, x.shape[0], x.dtype) and x.data_ptr() % 4 == 0


def _gemv_mma_ready(pw: PackedWeight, half2: bool) -> bool:
    """Whether the tensor-core GEMV (``gemv_mma``) can run: the weight carries its words (``gemv_mma.attach``),
    on the half2 path (one fp16 row, int4)."""
    return pw.mma is not None and half2


def _gemv(x, pw: PackedWeight, res, act, out, config, pdl: bool = False):
    m, n, k = x.shape[0], pw.out_features, pw.in_features
    dummy = out
    # int4 codes at batch 1 on fp16 activations decode in half2 registers (inline PTX: compiled kernels only);
    # a config may set HALF2 explicitly (the benchmark times both paths)
    half2 = _gemv_half2(x, pw)
    pairs = gemv_row_pairs(pw, half2)
    mma = _gemv_mma_ready(pw, half2)
    candidates = gemv_candidates(m, n, k, pw.bits, num_sms(x.device))
    if pairs:
        candidates = [dict(c, PAIRS=True) for c in candidates]
    if mma:  # the tensor-core GEMV competes per shape (the tuner keeps whichever is faster)
        from qcompile.runtime.triton import gemv_mma

        candidates = candidates + gemv_mma.candidates(n, num_sms(x.device))
    key = _gemv_key(x, pw, act, pdl, pairs, mma)  # as gemv_tuning_key, without deciding the paths again

    def launch(cfg, pw=pw, out=out):
        if cfg.get("MMA"):
            if not mma:  # (a copy of the weight for the PDL chain carries the words exactly when pw does)
                raise ValueError("MMA needs a weight that carries the tensor-core GEMV's words (gemv_mma.attach) "
                                 "and one fp16 activation row")
            from qcompile.runtime.triton import gemv_mma

            gemv_mma.launch(x, pw, res, act, out, cfg, pdl=pdl_flag(pdl, x.device)[0])
            return
        meta, opts = launch_opts(cfg)
        if pdl:
            meta.update(PDL=True, PREFETCH=True)
        meta.setdefault("HALF2", half2)
        if meta["HALF2"] and not half2:
            raise ValueError("HALF2 needs int4 codes, one fp16 activation row and a compiled (not interpreted) kernel")
        if meta.get("PAIRS") and not (meta["HALF2"] and pw.group_size % 16 == 0 and not meta.get("BAND")):
            raise ValueError("PAIRS needs the half2 path (int4, one fp16 row, compiled), groups of a multiple of 16 "
                             "and row-major words")
        # PDL: launched as a programmatic dependent of the kernel before it, so its launch overlaps that kernel's
        # tail; PREFETCH peels the first weight tile off the loop, and with PDL reads it (and releases the next
        # kernel) before waiting for the kernel before. ``pdl`` adds both to every candidate, tuned as a chain
        # (``pdl_chain``) under a key of its own
        meta["PDL"], launch_pdl = pdl_flag(meta.get("PDL", False), x.device)
        if meta.get("BAND") and n % meta["BAND"]:
            raise ValueError(f"BAND={meta['BAND']} needs N ({n}) to be a multiple of it")
        opts.update(launch_pdl)
        part, lock = _Workspace.get(x.device, meta["SPLIT_K"] * meta["BLOCK_M"] * n, -(-n // meta["BLOCK_N"]))
        grid = (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
        _gemv_kernel[grid](
            x, pw.qweight, pw.scale, pw.zero if pw.zero is not None else dummy,
            pw.bias if pw.bias is not None else dummy, res if res is not None else dummy, out, part, lock,
            m, n, k, x.stride(0), res.stride(0) if res is not None else 0, out.stride(0),
            BITS=pw.bits, GROUP=pw.group_size, HAS_ZERO=pw.zero is not None, HAS_BIAS=pw.bias is not None,
            HAS_RES=res is not None, ACT_SILU_MUL=act == "silu_mul", **meta, **opts)

    def pdl_chain():
        """The candidates of a PDL launch are timed as a chain of launches over copies of the weight, enough to
        stream from HBM rather than L2, as a decode step runs its layers: a single launch has no kernel before it
        to overlap with, so it would time every candidate as a plain launch (bench/triton_sweep.py: the best PDL
        tiles differ from the best plain ones)."""
        l2 = torch.cuda.get_device_properties(x.device).L2_cache_size if x.device.type == "cuda" else 0
        copies = [pw] + [copy_weight(pw) for _ in range(max(1, min(15, math.ceil(2 * l2 / pw.nbytes))))]
        outs = [torch.empty_like(out) for _ in copies]
        return lambda cfg: [launch(cfg, p, o) for p, o in zip(copies, outs)]

    return _GEMV.run(key, candidates, launch, config, timing=pdl_chain if pdl else None)


def copy_weight(pw: PackedWeight) -> PackedWeight:
    """``pw`` with every tensor a kernel reads cloned (the tensor-core GEMV's words too): chains of launches over
    such copies stream their weights from HBM, not L2."""
    mma = pw.mma and type(pw.mma)(pw.mma.words.clone(), pw.mma.zero.clone())
    return replace(pw, qweight=pw.qweight.clone(), scale=pw.scale.clone(),
                   zero=None if pw.zero is None else pw.zero.clone(), mma=mma)


def _gemm(x, pw: PackedWeight, res, out, config):
    m, n, k = x.shape[0], pw.out_features, pw.in_features
    dummy = out
    is_fp32 = x.dtype == torch.float32
    candidates = gemm_candidates(m, n, k, pw.group_size, is_fp32, pw.bits)
    key = (_pow2(m), n, k, pw.bits, pw.group_size, x.dtype)

    def launch(cfg):
        meta, opts = launch_opts(cfg)
        grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _gemm_kernel[grid](
            x, pw.qweight, pw.scale, pw.zero if pw.zero is not None else dummy,
            pw.bias if pw.bias is not None else dummy, res if res is not None else dummy, out,
            m, n, k, x.stride(0), res.stride(0) if res is not None else 0, out.stride(0),
            BITS=pw.bits, GROUP=pw.group_size, HAS_ZERO=pw.zero is not None, HAS_BIAS=pw.bias is not None,
            HAS_RES=res is not None, IEEE=is_fp32, **meta, **opts)

    return _GEMM.run(key, candidates, launch, config)
