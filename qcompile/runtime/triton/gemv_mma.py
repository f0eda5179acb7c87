"""The batch-1 int4 GEMV on tensor cores (``mma.sync.m16n8k16`` in inline PTX; Gluon, sm_90): a candidate of the
GEMV's tuner for weights that carry its words (``attach``; the runner's ``mma_gemv``, ``qcompile run --mma-gemv``).

The pointer GEMV (``wq_matmul._gemv_kernel``) spends 21-27 SASS instructions a word. Here the weights are the A
operand (16 output features x 16 K per mma), the activations column 0 of B, and each lane's word decodes straight
into its A fragment (one SHF, four LOP3, two HSUB2, two HFMA2: codes minus zero point, exact in fp16; then one
HMMA): 15-25 instructions a word for sm_90. The scale is applied per group to the fp32 accumulators. Gluon does not
pipeline loops, so every load a group needs (words, zero points, scales, activations) is issued ``AHEAD`` groups
before its decode, in registers: loaded in the iteration that decodes them, each group cost a memory round trip
(about 1 µs on the H100, docs/BENCHMARKS.md, seventeenth session).

Layout ``pack_mma``: int32 ``[N / 16, K / G, 32, G / 16]`` (groups G of 64 or 128); word ``[rb, grp, lane, ks]``
for lane ``(g, t) = (lane // 4, lane % 4)``: rows ``16 rb + g`` and ``16 rb + g + 8``, and within group ``grp``
the K positions ``G grp + (G / 4) t + 4 ks + (0, 1, 2, 3)`` (K permuted inside the group so that a lane's
activations are one contiguous run). Nibbles: (row g, +0) (row g+8, +0) (row g, +2) (row g+8, +2) (row g, +1)
(row g+8, +1) (row g, +3) (row g+8, +3), so that mask 0x000F000F, mask 0x00F000F0 and the same after a shift by 8
give the A fragment's four registers. A lane's words of a group are contiguous, a warp's 32 lanes one run. Lanes
(0, t) feed B's column 0 (the pairs of its run), the only column read out (c0, c2 of lanes t = 0); the other lanes
load the same runs, which B's other columns carry into C's other columns only. It stores the weight a second time
(the prefill GEMM reads the row-major words).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from qcompile.runtime.triton._env import interpreting, require_triton

triton = require_triton()
from qcompile.runtime.triton._gluon import (  # noqa: E402
    _gdc_launch_dependents, _gdc_wait, as_numpy, emulates, from_numpy, gl, gluon, halves, lane_registers,
    mma_m16n8k16_f16_f32, pack_halves)

# nibble j of a word: (row offset 0 or 8, K offset within the lane's four) of its code
_NIBBLE = ((0, 0), (8, 0), (0, 2), (8, 2), (0, 1), (8, 1), (0, 3), (8, 3))


def pack_mma(codes: torch.Tensor, group: int = 128) -> torch.Tensor:
    """Codes ``[K, N]`` (0..15) -> words ``[N / 16, K / G, 32, G / 16]`` int32 in the layout above (groups of G =
    64 or 128)."""
    k, n = codes.shape
    if group not in (64, 128) or k % group or n % 16:
        raise ValueError(f"needs groups of 64 or 128 dividing K ({k}, group {group}) and N ({n}) a multiple of 16")
    steps = group // 16
    dev = codes.device  # index tensors beside the codes (the runner packs CUDA weights)
    lane = torch.arange(32, device=dev)
    t, g = lane % 4, lane // 4
    grp = torch.arange(k // group, device=dev)
    ks = torch.arange(steps, device=dev)
    rb = torch.arange(n // 16, device=dev)
    words = torch.zeros(n // 16, k // group, 32, steps, dtype=torch.int64, device=dev)
    base = (group * grp)[None, :, None, None] + (group // 4 * t)[None, None, :, None] + (4 * ks)[None, None, None, :]
    row = (16 * rb)[:, None, None, None] + g[None, None, :, None]
    for j, (dr, dk) in enumerate(_NIBBLE):
        words |= codes.to(torch.int64)[base + dk, row + dr] << (4 * j)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # as signed 32-bit


def emulate(x: torch.Tensor, wm: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int = 128):
    """What the kernel computes, in torch, from the mma fragments' definitions (PTX ISA, m16n8k16 .f16): lane
    (g, t) holds A rows g and g + 8 at columns 2t + (0, 1) and 2t + 8 + (0, 1), and B column g at rows 2t + (0, 1)
    and 2t + 8 + (0, 1); C row g and g + 8 at columns 2t, 2t + 1. Each k16 step's A tile is decoded from the lanes'
    words (codes minus zero point, fp16), its B column 0 from x at the permuted K; the group's products summed in
    fp32, times its scale. ``x`` [K] fp16."""
    rbs, groups, _, steps = wm.shape
    w = wm.to(torch.int64) & 0xFFFFFFFF
    # A register (a0a1, a2a3, a4a5, a6a7) = (row g, k 2t..), (row g+8, k 2t..), (row g, k 2t+8..), (g+8, 2t+8..)
    # <- the decode's pairs (nibbles 0/4, 1/5, 2/6, 3/7): nibble j is A element (row, col) below
    a_pos = {0: (0, 0), 4: (0, 1), 1: (8, 0), 5: (8, 1), 2: (0, 8), 6: (0, 9), 3: (8, 8), 7: (8, 9)}
    y = torch.zeros(rbs * 16, dtype=torch.float32)
    for rb in range(rbs):
        for grp in range(groups):
            c = torch.zeros(16, dtype=torch.float32)  # C column 0
            for ks in range(steps):
                a = torch.zeros(16, 16, dtype=torch.float32)
                bcol = torch.zeros(16, dtype=torch.float32)
                for lane in range(32):
                    g, t = lane // 4, lane % 4
                    for j in range(8):
                        dr, dc = a_pos[j]
                        rrow = 16 * rb + g + dr
                        q = float((w[rb, grp, lane, ks] >> (4 * j)) & 15)
                        a[g + dr, 2 * t + dc] = torch.tensor(q - float(zero[grp, rrow])).half().float()
                    if g == 0:  # B column 0: rows 2t + (0, 1) <- pair r = 0, rows 2t + 8 + (0, 1) <- pair r = 1
                        for r in range(2):
                            for h in range(2):
                                bcol[2 * t + 8 * r + h] = x[group * grp + group // 4 * t + 4 * ks + 2 * r + h].float()
                c += a @ bcol
            y[16 * rb: 16 * rb + 16] += c * scale[grp, 16 * rb: 16 * rb + 16].float()
    return y


def _step(ks: int, steps: int) -> str:
    """k16 step ``ks`` of a group of ``steps``: word ``$(4 + ks)`` decoded into the A registers, the activation pair
    registers ``$(4 + steps + 2 ks)`` and the next as B, accumulated into C (``$0``-``$3``); the zero-point terms
    (1024 + z of row g, twice; -(64 + z) of row g + 8, twice) follow the activations."""
    w, x, zz = 4 + ks, 4 + steps + 2 * ks, 4 + 3 * steps
    cin = "{zr, zr, zr, zr}" if ks == 0 else "{$0, $1, $2, $3}"
    return f"""
    lop3.b32 a0, ${w}, 0x000F000F, 0x64006400, 0xEA;
    sub.rn.f16x2 a0, a0, ${zz};
    lop3.b32 a1, ${w}, 0x00F000F0, 0x64006400, 0xEA;
    fma.rn.f16x2 a1, a1, k16, ${zz + 1};
    shr.b32 q, ${w}, 8;
    lop3.b32 a2, q, 0x000F000F, 0x64006400, 0xEA;
    sub.rn.f16x2 a2, a2, ${zz};
    lop3.b32 a3, q, 0x00F000F0, 0x64006400, 0xEA;
    fma.rn.f16x2 a3, a3, k16, ${zz + 1};
    mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{$0, $1, $2, $3}}, {{a0, a1, a2, a3}}, {{${x}, ${x + 1}}},
        {cin};"""


def _group_ptx(steps: int) -> str:
    return """
    {
    .reg .b32 a0, a1, a2, a3, q, zr, k16;
    mov.b32 zr, 0;
    mov.b32 k16, 0x2C002C00;""" + "".join(_step(ks, steps) for ks in range(steps)) + """
    }
"""


_MMA_PTX8 = gl.constexpr(_group_ptx(8))  # groups of 128; constexprs: jitted code may read a global only as one
_MMA_PTX4 = gl.constexpr(_group_ptx(4))  # groups of 64


def _group_ptx_emulated(*operands):
    """``_group_ptx(steps)`` under Triton's interpreter, instruction by instruction, on operands laid out
    [W, E, 32] (lane last, ``gemv_mma_kernel``'s ``L3``): words ``steps``, activation pairs ``2 steps``, zz, mz."""
    regs, shape = lane_registers([as_numpy(r) for r in operands])
    steps = (len(regs) - 2) // 3
    words, x, (zz, mz) = regs[:steps], regs[steps: 3 * steps], regs[3 * steps:]
    zz_h, mz_h = halves(zz), halves(mz)

    def lop3(v, mask):  # lop3.b32 d, v, mask, 0x64006400, 0xEA: (v & mask) | 0x64006400
        return (v & mask) | 0x64006400

    def sub(v):  # sub.rn.f16x2 d, v, zz
        return pack_halves(*[(h.astype("float64") - z).astype("float16") for h, z in zip(halves(v), zz_h)])

    def fma(v):  # fma.rn.f16x2 d, v, k16 (1/16), mz: one rounding of the exact value
        return pack_halves(*[(h.astype("float64") * 0.0625 + z).astype("float16") for h, z in zip(halves(v), mz_h)])

    c = None
    for ks in range(steps):
        w, q = words[ks], words[ks] >> 8  # shr.b32: logical
        a = [sub(lop3(w, 0x000F000F)), fma(lop3(w, 0x00F000F0)), sub(lop3(q, 0x000F000F)), fma(lop3(q, 0x00F000F0))]
        c = mma_m16n8k16_f16_f32(a, x[2 * ks: 2 * ks + 2], c)
    return tuple(from_numpy(v, gl.float32, shape) for v in c)


emulates(_MMA_PTX8)(_group_ptx_emulated)
emulates(_MMA_PTX4)(_group_ptx_emulated)


@gluon.jit
def _mma_group8(w, x, zz, mz):
    """One lane's eight words of a group of 128 (one 16-row block) and its sixteen activation pairs: eight
    mma.sync chained from zero, the group's C fragment (c0..c3)."""
    return gl.inline_asm_elementwise(
        asm=_MMA_PTX8, constraints="=f,=f,=f,=f" + ",r" * 26,
        args=[w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], x[8],
              x[9], x[10], x[11], x[12], x[13], x[14], x[15], zz, mz],
        dtype=(gl.float32, gl.float32, gl.float32, gl.float32), is_pure=True, pack=1)


@gluon.jit
def _mma_group4(w, x, zz, mz):
    """As ``_mma_group8`` for groups of 64: four words, eight activation pairs, four mma.sync."""
    return gl.inline_asm_elementwise(
        asm=_MMA_PTX4, constraints="=f,=f,=f,=f" + ",r" * 14,
        args=[w[0], w[1], w[2], w[3], x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], zz, mz],
        dtype=(gl.float32, gl.float32, gl.float32, gl.float32), is_pure=True, pack=1)


@gluon.jit
def _split4(v, L3: gl.constexpr):
    """[.., 4] -> four [..] tensors in layout L3, element i = v[.., i] (a relabelling of each lane's registers; any
    rank: ``gemv_digits`` uses it too)."""
    a, b = gl.split(gl.reshape(v, v.shape[:-1] + [2, 2]))  # i = 2 m + d
    e0, e2 = gl.split(a)
    e1, e3 = gl.split(b)
    return (gl.convert_layout(e0, L3), gl.convert_layout(e1, L3), gl.convert_layout(e2, L3),
            gl.convert_layout(e3, L3))


@gluon.jit
def _split8(v, L3: gl.constexpr):
    """[.., 8] -> eight [..] tensors in layout L3, element i = v[.., i]."""
    a, b = gl.split(gl.reshape(v, v.shape[:-1] + [4, 2]))  # i = 2 m + d
    a0, a1 = gl.split(gl.reshape(a, v.shape[:-1] + [2, 2]))  # m = 2 u + c
    b0, b1 = gl.split(gl.reshape(b, v.shape[:-1] + [2, 2]))
    e0, e4 = gl.split(a0)
    e2, e6 = gl.split(a1)
    e1, e5 = gl.split(b0)
    e3, e7 = gl.split(b1)
    return (gl.convert_layout(e0, L3), gl.convert_layout(e1, L3), gl.convert_layout(e2, L3),
            gl.convert_layout(e3, L3), gl.convert_layout(e4, L3), gl.convert_layout(e5, L3),
            gl.convert_layout(e6, L3), gl.convert_layout(e7, L3))


@gluon.jit
def _pack_pairs(h, XP: gl.constexpr):
    """fp16 [1, 1, 32, 2 XP] -> int32 [1, 1, 32, XP]: element 2m in the low half of pair m, 2m + 1 in the high."""
    lo, hi = gl.split(gl.reshape(h, [1, 1, 32, XP, 2]))
    return ((lo.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF)
            | (hi.to(gl.int16, bitcast=True).to(gl.int32) << 16))


@gluon.jit
def _fetch_w(w_ptr, s_ptr, z_ptr, w_off, w_mask, row, rb_ok, t0, N, grp, ok, STEPS: gl.constexpr):
    """Group ``grp``'s words, zero points and scales (masked off past the program's last group)."""
    words = gl.load(w_ptr + w_off + grp * (32 * STEPS), mask=w_mask & ok, other=0)
    za = gl.load(z_ptr + grp * N + row, mask=rb_ok & ok, other=0)
    zb = gl.load(z_ptr + grp * N + row + 8, mask=rb_ok & ok, other=0)
    sa = gl.load(s_ptr + grp * N + row, mask=rb_ok & t0 & ok, other=0.0)
    sb = gl.load(s_ptr + grp * N + row + 8, mask=rb_ok & t0 & ok, other=0.0)
    return words, za, zb, sa, sb


@gluon.jit
def _fetch_x(xw_ptr, x_ptr, p_off, s_off, K, grp, ok, GROUP: gl.constexpr, XP: gl.constexpr,
             ACT_SILU_MUL: gl.constexpr):
    """Group ``grp``'s activations: each lane's run as int32 pairs (and 0), or gate and up spread over the lanes."""
    if ACT_SILU_MUL:
        gate = gl.load(x_ptr + grp * GROUP + s_off, mask=ok & (s_off >= 0), other=0.0)
        up = gl.load(x_ptr + K + grp * GROUP + s_off, mask=ok & (s_off >= 0), other=0.0)
    else:
        gate = gl.load(xw_ptr + grp * XP * 4 + p_off, mask=ok & (p_off >= 0), other=0)
        up = 0
    return gate, up


@gluon.jit
def _finish(y, b_ptr, r_ptr, out_ptr, rows, mask, HAS_BIAS: gl.constexpr, HAS_RES: gl.constexpr):
    if HAS_BIAS:
        y += gl.load(b_ptr + rows, mask=mask, other=0.0).to(gl.float32)
    if HAS_RES:
        y += gl.load(r_ptr + rows, mask=mask, other=0.0).to(gl.float32)
    gl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def gemv_mma_kernel(xw_ptr, x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, r_ptr, out_ptr, part_ptr, lock_ptr, N, K,
                    GROUP: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_RES: gl.constexpr,
                    ACT_SILU_MUL: gl.constexpr, E: gl.constexpr, SPLIT_K: gl.constexpr,
                    num_warps: gl.constexpr, PDL: gl.constexpr = False, AHEAD: gl.constexpr = 2):
    """``act(x) @ W (+ bias) (+ residual)``, one fp16 row. xw: x [K] viewed as int32 pairs (``ACT_SILU_MUL``: x
    [2K] = gate | up, read as fp16 through ``x_ptr``); words ``pack_mma``; scale [K/G, N] fp16, zero [K/G, N]
    uint8; out [N] fp16. Each warp owns E blocks of 16 rows; programs split K by groups, the last to arrive (an
    arrival counter per program column) summing the fp32 partials in split order: deterministic, one launch.
    Everything a group reads is loaded ``AHEAD`` (1 or 2) groups before its decode, in registers; with ``PDL`` the
    first ``AHEAD`` groups' words, zero points and scales are loaded, and the next kernel released, before waiting
    for the kernel before (whose output x is)."""
    STEPS: gl.constexpr = GROUP // 16  # k16 steps (words) per lane per group
    XP: gl.constexpr = GROUP // 8  # activation pairs per lane per group (lanes 0-3)
    L: gl.constexpr = gl.BlockedLayout([1, 1, 1, STEPS], [1, 1, 32, 1], [num_warps, 1, 1, 1], [3, 2, 1, 0])
    L3: gl.constexpr = gl.SliceLayout(3, L)
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n_groups = K // GROUP
    per = gl.cdiv(n_groups, SPLIT_K)
    g_lo = pid_k * per
    g_hi = gl.minimum(g_lo + per, n_groups)
    w_i = gl.arange(0, num_warps, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
    e_i = gl.arange(0, E, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))
    lane = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
    ks = gl.arange(0, STEPS, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L))))
    rb = pid_n * (num_warps * E) + w_i[:, None, None] * E + e_i[None, :, None]  # [W, E, 1]
    t = lane % 4
    g = lane // 4
    row = rb * 16 + g[None, None, :]  # rows g and g + 8 of the lane's block
    rb_ok = rb * 16 < N
    t0 = (t == 0)[None, None, :]
    w_off = (rb * n_groups * (32 * STEPS) + lane[None, None, :] * STEPS)[:, :, :, None] + ks[None, None, None, :]
    # a lane's activations for a group: K positions G grp + (G / 4) t + [0, G / 4), as int32 pairs. Only lanes
    # 0-3 feed B's column 0, the one read out; the other lanes load their t's run too (B column j only reaches C
    # column j), which saves zeroing them
    LP: gl.constexpr = gl.BlockedLayout([1, 1, 1, XP], [1, 1, 32, 1], [num_warps, 1, 1, 1], [3, 2, 1, 0])
    lane_p = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, LP))))
    m_p = gl.arange(0, XP, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LP))))
    p_off = (XP * (lane_p % 4))[None, None, :, None] + m_p[None, None, None, :]
    # SwiGLU: computed spread over the lanes (LA: G / 32 values each), then gathered so that lane l holds run l % 4
    LA: gl.constexpr = gl.BlockedLayout([1, GROUP // 32], [1, 32], [num_warps, 1], [1, 0])
    LB: gl.constexpr = gl.BlockedLayout([1, 1, GROUP // 4], [8, 4, 1], [1, 1, num_warps], [2, 1, 0])
    s_off = gl.arange(0, GROUP, layout=gl.SliceLayout(0, LA))[None, :]
    acc_a = gl.zeros([num_warps, E, 32], gl.float32, L3)
    acc_b = gl.zeros([num_warps, E, 32], gl.float32, L3)
    w_mask = rb_ok[:, :, :, None]
    # every load a group needs is issued AHEAD groups before its decode (registers; Gluon does not pipeline
    # loops): loads issued inside the loop for the group being decoded cost a memory round trip a group
    w0, za0, zb0, sa0, sb0 = _fetch_w(w_ptr, s_ptr, z_ptr, w_off, w_mask, row, rb_ok, t0, N, g_lo, g_lo < g_hi,
                                      STEPS)
    if AHEAD == 2:
        w1, za1, zb1, sa1, sb1 = _fetch_w(w_ptr, s_ptr, z_ptr, w_off, w_mask, row, rb_ok, t0, N, g_lo + 1,
                                          g_lo + 1 < g_hi, STEPS)
    if PDL:  # weights, scales and zero points are constants, not the kernel before's output; x is its output
        _gdc_launch_dependents()
        _gdc_wait()
    x0, u0 = _fetch_x(xw_ptr, x_ptr, p_off, s_off, K, g_lo, g_lo < g_hi, GROUP, XP, ACT_SILU_MUL)
    if AHEAD == 2:
        x1, u1 = _fetch_x(xw_ptr, x_ptr, p_off, s_off, K, g_lo + 1, g_lo + 1 < g_hi, GROUP, XP, ACT_SILU_MUL)
    for grp in range(g_lo, g_hi):
        words, za, zb, sa, sb, xs, us = w0, za0, zb0, sa0, sb0, x0, u0
        if AHEAD == 2:
            w0, za0, zb0, sa0, sb0, x0, u0 = w1, za1, zb1, sa1, sb1, x1, u1
            w1, za1, zb1, sa1, sb1 = _fetch_w(w_ptr, s_ptr, z_ptr, w_off, w_mask, row, rb_ok, t0, N, grp + 2,
                                              grp + 2 < g_hi, STEPS)
            x1, u1 = _fetch_x(xw_ptr, x_ptr, p_off, s_off, K, grp + 2, grp + 2 < g_hi, GROUP, XP, ACT_SILU_MUL)
        else:
            w0, za0, zb0, sa0, sb0 = _fetch_w(w_ptr, s_ptr, z_ptr, w_off, w_mask, row, rb_ok, t0, N, grp + 1,
                                              grp + 1 < g_hi, STEPS)
            x0, u0 = _fetch_x(xw_ptr, x_ptr, p_off, s_off, K, grp + 1, grp + 1 < g_hi, GROUP, XP, ACT_SILU_MUL)
        if ACT_SILU_MUL:  # SwiGLU once per value (G / 32 a lane), then each lane's run gathered to it
            gate = xs.to(gl.float32)
            h = (gate / (1.0 + gl.exp(-gate)) * us.to(gl.float32)).to(gl.float16)  # [1, G]
            h = gl.convert_layout(gl.reshape(h, [1, 4, GROUP // 4]), LB)  # lane l: run l % 4
            h = gl.broadcast(h, gl.zeros([8, 4, GROUP // 4], gl.float16, LB))[0]
            xs = _pack_pairs(gl.reshape(h, [1, 1, 32, GROUP // 4]), XP)
        xa, xb = gl.split(gl.reshape(xs, [1, 1, 32, STEPS, 2]))  # pair 2 ks + r
        za = 0x6400 + za.to(gl.int32)  # 1024 + z of row g as fp16 bits (the mantissa's unit at 1024 is 1)
        zb = 0xD400 + 16 * zb.to(gl.int32)  # -(64 + z) of row g + 8 (sign bit; the unit at 64 is 1/16)
        zz = za | (za << 16)  # both fp16 halves (shifts, not a multiply past 2^31)
        mz = zb | (zb << 16)
        if STEPS == 8:
            x_r0 = _split8(xa, L3)
            x_r1 = _split8(xb, L3)
            c0, c1, c2, c3 = _mma_group8(
                _split8(words, L3),
                (x_r0[0], x_r1[0], x_r0[1], x_r1[1], x_r0[2], x_r1[2], x_r0[3], x_r1[3], x_r0[4], x_r1[4], x_r0[5],
                 x_r1[5], x_r0[6], x_r1[6], x_r0[7], x_r1[7]), zz, mz)
        else:
            x_r0 = _split4(xa, L3)
            x_r1 = _split4(xb, L3)
            c0, c1, c2, c3 = _mma_group4(
                _split4(words, L3), (x_r0[0], x_r1[0], x_r0[1], x_r1[1], x_r0[2], x_r1[2], x_r0[3], x_r1[3]), zz, mz)
        acc_a += c0 * sa.to(gl.float32)
        acc_b += c2 * sb.to(gl.float32)
    ok = rb_ok & t0 & (row < N)
    if SPLIT_K == 1:
        _finish(acc_a, b_ptr, r_ptr, out_ptr, row, ok, HAS_BIAS, HAS_RES)
        _finish(acc_b, b_ptr, r_ptr, out_ptr, row + 8, ok, HAS_BIAS, HAS_RES)
    else:
        gl.store(part_ptr + pid_k * N + row, acc_a, mask=ok)
        gl.store(part_ptr + pid_k * N + row + 8, acc_b, mask=ok)
        gl.thread_barrier()  # every thread's partial is written before the (release) arrival below
        arrived = gl.atomic_add(lock_ptr + pid_n, 1)
        if arrived == SPLIT_K - 1:  # last to arrive: sum the partials in split order (deterministic)
            ya = gl.zeros([num_warps, E, 32], gl.float32, L3)
            yb = gl.zeros([num_warps, E, 32], gl.float32, L3)
            for sp in gl.static_range(SPLIT_K):  # unrolled: the loads go out together, not one round trip each
                ya += gl.load(part_ptr + sp * N + row, mask=ok, other=0.0, cache_modifier=".cg")
                yb += gl.load(part_ptr + sp * N + row + 8, mask=ok, other=0.0, cache_modifier=".cg")
            _finish(ya, b_ptr, r_ptr, out_ptr, row, ok, HAS_BIAS, HAS_RES)
            _finish(yb, b_ptr, r_ptr, out_ptr, row + 8, ok, HAS_BIAS, HAS_RES)
            gl.atomic_xchg(lock_ptr + pid_n, 0)  # ready for the next launch (and CUDA-graph replays)




@dataclass
class MmaWeight:
    """A PackedWeight's words in ``pack_mma``'s layout, with zero points for every group (8 for symmetric
    weights: the implicit zero point)."""

    words: torch.Tensor
    zero: torch.Tensor


def eligible(pw, device) -> bool:
    """int4 codes in groups of 64 or 128, N a multiple of 16, on a compiled sm_90+ device."""
    dev = torch.device(device)
    return (pw.bits == 4 and pw.group_size in (64, 128) and pw.out_features % 16 == 0 and not interpreting()
            and dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9)


def mma_weight(pw) -> MmaWeight:
    """``pw``'s codes re-packed for this kernel (on ``pw``'s device)."""
    from qcompile.runtime.triton.reference import unpack_codes

    zero = pw.zero if pw.zero is not None else torch.full_like(pw.scale, 8, dtype=torch.uint8)
    return MmaWeight(pack_mma(unpack_codes(pw), pw.group_size).to(pw.qweight.device), zero.contiguous())


def attach(pw):
    """``pw`` with its ``mma`` words where eligible (``pw`` unchanged otherwise): the GEMV's tuner then times this
    kernel beside the pointer GEMV at batch 1 and keeps the faster per shape."""
    if not eligible(pw, pw.qweight.device):
        return pw
    return replace(pw, mma=mma_weight(pw))


def candidates(n: int, sms: int) -> list[dict]:
    """Warps x row blocks a warp x groups loaded ahead x K splits: each with the split whose program count is
    nearest four per multiprocessor, and its neighbours (the loop is latency-bound: a warp's groups cost a memory
    round trip per AHEAD + 1 of them, so short slices over many programs win)."""
    out = []
    for warps, e, ahead in ((4, 1, 2), (4, 2, 2), (8, 1, 2), (8, 2, 2), (4, 4, 1), (4, 2, 1)):
        programs = -(-(n // 16) // (warps * e))
        split = min((1, 2, 4, 8, 16), key=lambda s: abs(programs * s - 4 * sms))
        for sp in dict.fromkeys((split, max(1, split // 2), min(16, 2 * split))):
            out.append(dict(MMA=True, E=e, num_warps=warps, SPLIT_K=sp, AHEAD=ahead))
    return out


def launch(x, pw, res, act, out, cfg: dict, pdl: bool = False):
    """One launch on ``x`` [1, K] (or [1, 2K] gate | up with ``act="silu_mul"``) fp16 into ``out`` [1, N], its
    split-K workspace the pointer GEMV's (``wq_matmul._Workspace``)."""
    from qcompile.runtime.triton.wq_matmul import _Workspace

    mw = pw.mma
    n, k = pw.out_features, pw.in_features
    programs = -(-(n // 16) // (cfg["num_warps"] * cfg["E"]))
    part, lock = _Workspace.get(x.device, cfg["SPLIT_K"] * n, programs)
    xv = x.view(-1)
    gemv_mma_kernel[(programs, cfg["SPLIT_K"])](
        xv.view(torch.int32) if act is None else xv[:2].view(torch.int32), xv, mw.words, pw.scale, mw.zero,
        pw.bias if pw.bias is not None else out, res if res is not None else out, out, part, lock, n, k,
        GROUP=pw.group_size, HAS_BIAS=pw.bias is not None, HAS_RES=res is not None,
        ACT_SILU_MUL=act == "silu_mul", E=cfg["E"], SPLIT_K=cfg["SPLIT_K"], num_warps=cfg["num_warps"], PDL=pdl,
        AHEAD=cfg["AHEAD"],
        **({"launch_pdl": True} if pdl else {}))
