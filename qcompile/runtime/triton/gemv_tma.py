"""The batch-1 int4 GEMV with its weights streamed through TMA (Gluon, sm_90+).

``wq_matmul._gemv_kernel`` reads its weight tiles with per-thread loads straight into registers, and its loop
spends about 33 instructions per 32-bit word (8 codes) of which ``_dot8_half2`` is 20: addresses, masks, the
activations' re-pairing and the per-column constants are the rest. At the H100's copy bandwidth a multiprocessor
must take about 2.9 words a cycle, so that loop would need ~3 of the 4 warp-instructions a cycle the SM can issue:
the kernel is nearly issue bound before it is bandwidth bound.

Here each program owns a band of ``BN`` columns and a run of K, cut in tiles of ``GT`` quantization groups: the
tile's words ``[GT, GR, BN]`` (GR = group / 8 word rows), its scales and its zero points ``[GT, BN]`` come in one
TMA transaction per array on one mbarrier, ``STAGES`` tiles ahead. Threads read the tile from shared memory in a
layout where each thread's rows lie in one group and its columns repeat along the band, so per word there is one
16-byte shared load per four words, the half2 decode, and the per-row activations and per-column constants spread
over many words. The descriptors zero-fill past K and N, so no masks are needed on the weights. With ``PDL``
the first ``STAGES`` tiles are requested before waiting for the kernel before (weights are constants).

K splits meet as in ``_gemv_kernel``: partials in an fp32 workspace, the last program to arrive (an arrival
counter per column band) sums them in split order: deterministic, one launch.
"""

from __future__ import annotations

import torch

from qcompile.runtime.triton._env import require_triton

triton = require_triton()
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma  # noqa: E402
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor  # noqa: E402


@gluon.jit
def _gdc_wait():
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _gdc_launch_dependents():
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _dot8(words, x04, x15, x26, x37, s2, zz, mz):
    """``wq_matmul._dot8_half2`` (same PTX): sum_j x_j * (c_j - z) * s over a word's eight codes, in fp32."""
    return gl.inline_asm_elementwise(
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
        args=[words, x04, x15, x26, x37, s2, zz, mz, gl.full(words.shape, 0x2C002C00, gl.int32, words.type.layout)],
        dtype=gl.int32, is_pure=True, pack=1,
    ).to(gl.float32, bitcast=True)


@gluon.jit
def _consts(scale, z):
    """``wq_matmul._half2_consts``: (s, s), (1024 + z, 1024 + z), (-(64 + z), -(64 + z)) as half2 bit patterns."""
    return gl.inline_asm_elementwise(
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
        constraints="=r,=r,=r,h,r", args=[scale, z.to(gl.int32)],
        dtype=(gl.int32, gl.int32, gl.int32), is_pure=True, pack=1)


@gluon.jit
def _dot16(we, wo, xe04, xe15, xe26, xe37, xo04, xo15, xo26, xo37, zz, mz):
    """Two words of one column in adjacent rows of one group (16 codes): ``sum_j x_j * (c_j - z)`` in fp32, the
    scale left out (it is applied per group in fp32). The activations come pre-scaled by 1/32, so a half2 lane
    sums eight products of at most 15/32 |x| each and cannot overflow where |x| itself fits fp16 with room
    (|x| < 17000); 8 half2 instructions per word for the codes plus one conversion per two words."""
    return gl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 a, q, acc;
        .reg .b16 h0, h1;
        .reg .f32 f0, f1;
        lop3.b32 a, $1, 0x000F000F, 0x64006400, 0xEA;
        sub.rn.f16x2 a, a, $11;
        mul.rn.f16x2 acc, a, $3;
        lop3.b32 a, $1, 0x00F000F0, 0x64006400, 0xEA;
        fma.rn.f16x2 a, a, $13, $12;
        fma.rn.f16x2 acc, a, $4, acc;
        shr.b32 q, $1, 8;
        lop3.b32 a, q, 0x000F000F, 0x64006400, 0xEA;
        sub.rn.f16x2 a, a, $11;
        fma.rn.f16x2 acc, a, $5, acc;
        lop3.b32 a, q, 0x00F000F0, 0x64006400, 0xEA;
        fma.rn.f16x2 a, a, $13, $12;
        fma.rn.f16x2 acc, a, $6, acc;
        lop3.b32 a, $2, 0x000F000F, 0x64006400, 0xEA;
        sub.rn.f16x2 a, a, $11;
        fma.rn.f16x2 acc, a, $7, acc;
        lop3.b32 a, $2, 0x00F000F0, 0x64006400, 0xEA;
        fma.rn.f16x2 a, a, $13, $12;
        fma.rn.f16x2 acc, a, $8, acc;
        shr.b32 q, $2, 8;
        lop3.b32 a, q, 0x000F000F, 0x64006400, 0xEA;
        sub.rn.f16x2 a, a, $11;
        fma.rn.f16x2 acc, a, $9, acc;
        lop3.b32 a, q, 0x00F000F0, 0x64006400, 0xEA;
        fma.rn.f16x2 a, a, $13, $12;
        fma.rn.f16x2 acc, a, $10, acc;
        mov.b32 {h0, h1}, acc;
        cvt.f32.f16 f0, h0;
        cvt.f32.f16 f1, h1;
        add.rn.f32 f0, f0, f1;
        mov.b32 $0, f0;
        }
        """,
        constraints="=r,r,r,r,r,r,r,r,r,r,r,r,r,r",
        args=[we, wo, xe04, xe15, xe26, xe37, xo04, xo15, xo26, xo37, zz, mz,
              gl.full(we.shape, 0x2C002C00, gl.int32, we.type.layout)],  # (1/16, 1/16)
        dtype=gl.int32, is_pure=True, pack=1,
    ).to(gl.float32, bitcast=True)


@gluon.jit
def _zconsts(z):
    """(1024 + z, 1024 + z) and (-(64 + z), -(64 + z)) as half2 bit patterns (``_consts`` without the scale)."""
    return gl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 m1, c960;
        prmt.b32 $0, $2, 0x64006400, 0x7050;
        mov.b32 m1, 0xBC00BC00;
        mov.b32 c960, 0x63806380;
        fma.rn.f16x2 $1, $0, m1, c960;
        }
        """,
        constraints="=r,=r,r", args=[z.to(gl.int32)], dtype=(gl.int32, gl.int32), is_pure=True, pack=1)


@gluon.jit
def _x_pairs(x_ptr, row, mask, K, ACT_SILU_MUL: gl.constexpr, PRESCALE: gl.constexpr):
    """The half2 activation pairs (x0,x4) (x1,x5) (x2,x6) (x3,x7) of the word rows ``row``; PRESCALE: times 1/32."""
    if ACT_SILU_MUL:
        x04 = _silu_mul_pair(x_ptr, row * 8, 0, mask, K)
        x15 = _silu_mul_pair(x_ptr, row * 8, 1, mask, K)
        x26 = _silu_mul_pair(x_ptr, row * 8, 2, mask, K)
        x37 = _silu_mul_pair(x_ptr, row * 8, 3, mask, K)
    else:
        xw = x_ptr.to(gl.pointer_type(gl.int32)) + row * 4
        a = gl.load(xw, mask=mask, other=0)
        b = gl.load(xw + 1, mask=mask, other=0)
        c = gl.load(xw + 2, mask=mask, other=0)
        d = gl.load(xw + 3, mask=mask, other=0)
        x04, x15, x26, x37 = _pair(a, b, c, d)
    if PRESCALE:
        x04, x15, x26, x37 = _scale4(x04, x15, x26, x37)
    return x04, x15, x26, x37


@gluon.jit
def _scale4(a, b, c, d):
    """Four half2 words times (1/32, 1/32): exact (a power of two) down to fp16's subnormals."""
    return gl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 k;
        mov.b32 k, 0x28002800;
        mul.rn.f16x2 $0, $4, k;
        mul.rn.f16x2 $1, $5, k;
        mul.rn.f16x2 $2, $6, k;
        mul.rn.f16x2 $3, $7, k;
        }
        """,
        constraints="=r,=r,=r,=r,r,r,r,r", args=[a, b, c, d], dtype=(gl.int32, gl.int32, gl.int32, gl.int32),
        is_pure=True, pack=1)


@gluon.jit
def _pair(a, b, c, d):
    """Four int32 words (x0,x1) (x2,x3) (x4,x5) (x6,x7) -> the half2 pairs (x0,x4) (x1,x5) (x2,x6) (x3,x7)."""
    return gl.inline_asm_elementwise(
        asm="""
        prmt.b32 $0, $4, $6, 0x5410;
        prmt.b32 $1, $4, $6, 0x7632;
        prmt.b32 $2, $5, $7, 0x5410;
        prmt.b32 $3, $5, $7, 0x7632;
        """,
        constraints="=r,=r,=r,=r,r,r,r,r", args=[a, b, c, d], dtype=(gl.int32, gl.int32, gl.int32, gl.int32),
        is_pure=True, pack=1)


@gluon.jit
def _silu_mul_pair(x_ptr, row8, j: gl.constexpr, mask, K):
    """half2 (a_j, a_{j+4}) of ``a = silu(gate) * up`` for the word rows ``row8 = 8 * row``."""
    g0 = gl.load(x_ptr + row8 + j, mask=mask, other=0.0).to(gl.float32)
    u0 = gl.load(x_ptr + row8 + j + K, mask=mask, other=0.0).to(gl.float32)
    g1 = gl.load(x_ptr + row8 + j + 4, mask=mask, other=0.0).to(gl.float32)
    u1 = gl.load(x_ptr + row8 + j + 4 + K, mask=mask, other=0.0).to(gl.float32)
    lo = (g0 / (1.0 + gl.exp(-g0)) * u0).to(gl.float16)
    hi = (g1 / (1.0 + gl.exp(-g1)) * u1).to(gl.float16)
    return (lo.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF) | (hi.to(gl.int16, bitcast=True).to(gl.int32) << 16)


@gluon.jit
def _issue(w_desc, s_desc, z_desc, w_bufs, s_bufs, z_bufs, bar, slot, g, n0, N, ok, nbytes: gl.constexpr,
           HAS_ZERO: gl.constexpr, PAIRS: gl.constexpr):
    """Request tile ``g`` (its first group) of the band at ``n0`` into stage ``slot``."""
    mbarrier.expect(bar, nbytes, pred=ok)
    if PAIRS:  # even word rows at columns [n0, n0 + BN) of the [groups, rows / 2, 2N] view, odd ones at N + n0
        tma.async_copy_global_to_shared(w_desc, [g, 0, n0], bar, w_bufs.index(2 * slot), pred=ok)
        tma.async_copy_global_to_shared(w_desc, [g, 0, N + n0], bar, w_bufs.index(2 * slot + 1), pred=ok)
    else:
        tma.async_copy_global_to_shared(w_desc, [g, 0, n0], bar, w_bufs.index(slot), pred=ok)
    tma.async_copy_global_to_shared(s_desc, [g, n0], bar, s_bufs.index(slot), pred=ok)
    if HAS_ZERO:
        tma.async_copy_global_to_shared(z_desc, [g, n0], bar, z_bufs.index(slot), pred=ok)


@gluon.jit
def _gemv_tma_kernel(w_desc, s_desc, z_desc, x_ptr, b_ptr, r_ptr, out_ptr, part_ptr, lock_ptr, N, K,
                     HAS_ZERO: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_RES: gl.constexpr,
                     ACT_SILU_MUL: gl.constexpr, PAIRS: gl.constexpr, SPLIT_K: gl.constexpr, STAGES: gl.constexpr,
                     WARPS_G: gl.constexpr, PDL: gl.constexpr, num_warps: gl.constexpr, XTILES: gl.constexpr = 0):
    GT: gl.constexpr = w_desc.block_type.shape[0]  # groups per tile
    ROWS: gl.constexpr = w_desc.block_type.shape[1]  # word rows per group in one buffer (half of them with PAIRS)
    BN: gl.constexpr = w_desc.block_type.shape[2]  # columns per band
    GROUP_ROWS: gl.constexpr = 2 * ROWS if PAIRS else ROWS
    # each thread: 4 adjacent words of a row (one 16-byte shared load), rows of one group, the pattern repeated
    # along the band (8 threads span 32 columns, one 128-byte row of shared memory: no bank conflicts)
    TR: gl.constexpr = 4
    L: gl.constexpr = gl.BlockedLayout([1, ROWS // TR, 4], [1, TR, 8], [WARPS_G, 1, num_warps // WARPS_G], [2, 1, 0])
    LGR: gl.constexpr = gl.SliceLayout(2, L)  # [GT, ROWS]: per-row values (activations)
    LGN: gl.constexpr = gl.SliceLayout(1, L)  # [GT, BN]: per-group, per-column values (scales, zero points)
    LN: gl.constexpr = gl.SliceLayout(0, LGN)  # [BN]

    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n0 = pid_n * BN
    n_groups = K // (8 * GROUP_ROWS)
    per_split = gl.cdiv(gl.cdiv(n_groups, SPLIT_K), GT) * GT
    g_lo = pid_k * per_split
    g_hi = gl.minimum(g_lo + per_split, n_groups)
    tiles = gl.maximum(gl.cdiv(g_hi - g_lo, GT), 0)

    W_BUFS: gl.constexpr = 2 * STAGES if PAIRS else STAGES
    w_bufs = gl.allocate_shared_memory(gl.int32, [W_BUFS, GT, ROWS, BN], w_desc.layout)
    s_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, GT, BN], s_desc.layout)
    z_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES if HAS_ZERO else 1, GT, BN], z_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    W_BYTES: gl.constexpr = w_desc.block_type.nbytes * (2 if PAIRS else 1) + s_desc.block_type.nbytes
    NBYTES: gl.constexpr = W_BYTES + z_desc.block_type.nbytes if HAS_ZERO else W_BYTES
    # weights are constants, not the kernel before's output: request the first tiles before waiting for it
    for i in gl.static_range(STAGES):
        _issue(w_desc, s_desc, z_desc, w_bufs, s_bufs, z_bufs, bars.index(i), i, g_lo + i * GT, n0, N, i < tiles,
               NBYTES, HAS_ZERO, PAIRS)
    if PDL:
        _gdc_launch_dependents()
        _gdc_wait()

    offs_g = gl.arange(0, GT, layout=gl.SliceLayout(1, LGR))
    offs_r = gl.arange(0, ROWS, layout=gl.SliceLayout(0, LGR))
    if XTILES:  # the split's activations, paired (and pre-scaled) once into shared memory: planes (x0,x4)
        # (x1,x5) (x2,x6) (x3,x7), each [XTILES, GT, ROWS]; with PAIRS, planes 0-3 hold the even rows, 4-7 the odd
        NP: gl.constexpr = 8 if PAIRS else 4
        x_smem = gl.allocate_shared_memory(gl.int32, [NP * XTILES, GT, ROWS],
                                           gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        for t in range(XTILES):
            grp = g_lo + t * GT + offs_g
            ok = (grp < g_hi)[:, None] & (offs_r >= 0)[None, :]
            if PAIRS:
                row = grp[:, None] * GROUP_ROWS + 2 * offs_r[None, :]
            else:
                row = grp[:, None] * GROUP_ROWS + offs_r[None, :]
            p0, p1, p2, p3 = _x_pairs(x_ptr, row, ok, K, ACT_SILU_MUL, PAIRS)
            x_smem.index(t).store(p0)
            x_smem.index(XTILES + t).store(p1)
            x_smem.index(2 * XTILES + t).store(p2)
            x_smem.index(3 * XTILES + t).store(p3)
            if PAIRS:
                p0, p1, p2, p3 = _x_pairs(x_ptr, row + 1, ok, K, ACT_SILU_MUL, PAIRS)
                x_smem.index(4 * XTILES + t).store(p0)
                x_smem.index(5 * XTILES + t).store(p1)
                x_smem.index(6 * XTILES + t).store(p2)
                x_smem.index(7 * XTILES + t).store(p3)
        gl.thread_barrier()

    acc = gl.zeros([GT, ROWS, BN], gl.float32, L)
    for t in range(tiles):
        st = t % STAGES
        mbarrier.wait(bars.index(st), (t // STAGES) & 1)
        if PAIRS:
            w_even = w_bufs.index(2 * st).load(L)
            w_odd = w_bufs.index(2 * st + 1).load(L)
        else:
            words = w_bufs.index(st).load(L)
        scale = s_bufs.index(st).load(LGN)
        if HAS_ZERO:
            z = z_bufs.index(st).load(LGN)
        else:
            z = gl.full([GT, BN], 8, gl.uint8, LGN)
        gl.thread_barrier()  # every warp has read stage st: refill it
        nt = t + STAGES
        _issue(w_desc, s_desc, z_desc, w_bufs, s_bufs, z_bufs, bars.index(st), st, g_lo + nt * GT, n0, N,
               nt < tiles, NBYTES, HAS_ZERO, PAIRS)

        # rows of groups past this split's end read as activations 0 (their words are real weights of the next
        # split, or TMA's zero fill past K)
        grp = g_lo + t * GT + offs_g
        rmask = (grp < g_hi)[:, None] & (offs_r >= 0)[None, :]
        if PAIRS:
            if XTILES:
                xe04 = x_smem.index(t).load(LGR)
                xe15 = x_smem.index(1 * XTILES + t).load(LGR)
                xe26 = x_smem.index(2 * XTILES + t).load(LGR)
                xe37 = x_smem.index(3 * XTILES + t).load(LGR)
                xo04 = x_smem.index(4 * XTILES + t).load(LGR)
                xo15 = x_smem.index(5 * XTILES + t).load(LGR)
                xo26 = x_smem.index(6 * XTILES + t).load(LGR)
                xo37 = x_smem.index(7 * XTILES + t).load(LGR)
            else:
                row = grp[:, None] * GROUP_ROWS + 2 * offs_r[None, :]
                xe04, xe15, xe26, xe37 = _x_pairs(x_ptr, row, rmask, K, ACT_SILU_MUL, True)
                xo04, xo15, xo26, xo37 = _x_pairs(x_ptr, row + 1, rmask, K, ACT_SILU_MUL, True)
            zz, mz = _zconsts(z)
            part = _dot16(w_even, w_odd,
                          gl.broadcast(xe04[:, :, None], w_even)[0], gl.broadcast(xe15[:, :, None], w_even)[0],
                          gl.broadcast(xe26[:, :, None], w_even)[0], gl.broadcast(xe37[:, :, None], w_even)[0],
                          gl.broadcast(xo04[:, :, None], w_even)[0], gl.broadcast(xo15[:, :, None], w_even)[0],
                          gl.broadcast(xo26[:, :, None], w_even)[0], gl.broadcast(xo37[:, :, None], w_even)[0],
                          gl.broadcast(zz[:, None, :], w_even)[0], gl.broadcast(mz[:, None, :], w_even)[0])
            acc += part * scale.to(gl.float32)[:, None, :]
        else:
            if XTILES:
                x04 = x_smem.index(t).load(LGR)
                x15 = x_smem.index(1 * XTILES + t).load(LGR)
                x26 = x_smem.index(2 * XTILES + t).load(LGR)
                x37 = x_smem.index(3 * XTILES + t).load(LGR)
            else:
                row = grp[:, None] * GROUP_ROWS + offs_r[None, :]
                x04, x15, x26, x37 = _x_pairs(x_ptr, row, rmask, K, ACT_SILU_MUL, False)
            s2, zz, mz = _consts(scale, z)
            acc += _dot8(words, gl.broadcast(x04[:, :, None], words)[0], gl.broadcast(x15[:, :, None], words)[0],
                         gl.broadcast(x26[:, :, None], words)[0], gl.broadcast(x37[:, :, None], words)[0],
                         gl.broadcast(s2[:, None, :], words)[0], gl.broadcast(zz[:, None, :], words)[0],
                         gl.broadcast(mz[:, None, :], words)[0])
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    y = gl.sum(gl.sum(acc, axis=1), axis=0)  # [BN]
    if PAIRS:
        y = y * 32.0  # the activations' 1/32
    offs_n = n0 + gl.arange(0, BN, layout=LN)
    n_mask = offs_n < N
    if SPLIT_K > 1:
        gl.store(part_ptr + pid_k * N + offs_n, y, mask=n_mask)
        gl.thread_barrier()  # every thread's partial is written before the (release) arrival below
        arrived = gl.atomic_add(lock_ptr + pid_n, 1)
        if arrived == SPLIT_K - 1:  # last to arrive: sum the partials in split order (deterministic)
            y = gl.zeros([BN], gl.float32, LN)
            for s in range(SPLIT_K):
                y += gl.load(part_ptr + s * N + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
            _finish(y, b_ptr, r_ptr, out_ptr, offs_n, n_mask, HAS_BIAS, HAS_RES)
            gl.atomic_xchg(lock_ptr + pid_n, 0)  # ready for the next launch (and CUDA-graph replays)
    else:
        _finish(y, b_ptr, r_ptr, out_ptr, offs_n, n_mask, HAS_BIAS, HAS_RES)


@gluon.jit
def _finish(y, b_ptr, r_ptr, out_ptr, offs_n, n_mask, HAS_BIAS: gl.constexpr, HAS_RES: gl.constexpr):
    if HAS_BIAS:
        y += gl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(gl.float32)
    if HAS_RES:
        y += gl.load(r_ptr + offs_n, mask=n_mask, other=0.0).to(gl.float32)
    gl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


def shared_layouts():
    """The descriptors' shared layouts, unswizzled: each 8-thread phase of a 16-byte shared load reads one whole
    128-byte row, so no bank conflicts without a swizzle."""
    return (gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3),
            gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2),
            gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=2))


def descriptors(pw, gt: int, bn: int, pairs: bool):
    n, k, g = pw.out_features, pw.in_features, pw.group_size
    wl, sl, zl = shared_layouts()
    if pairs:  # word rows 2i and 2i + 1 side by side: [groups, rows / 2, 2N]
        w_desc = GluonTensorDescriptor.from_tensor(pw.qweight.view(k // g, g // 16, 2 * n), [gt, g // 16, bn], wl)
    else:
        w_desc = GluonTensorDescriptor.from_tensor(pw.qweight.view(k // g, g // 8, n), [gt, g // 8, bn], wl)
    s_desc = GluonTensorDescriptor.from_tensor(pw.scale, [gt, bn], sl)
    z_desc = GluonTensorDescriptor.from_tensor(pw.zero if pw.zero is not None else pw.qweight.view(torch.uint8)[:, :n],
                                               [gt, bn], zl)
    return w_desc, s_desc, z_desc


def launch(x, pw, res, act, out, part, lock, cfg: dict, pdl: bool = False):
    n, k = pw.out_features, pw.in_features
    w_desc, s_desc, z_desc = descriptors(pw, cfg["GT"], cfg["BN"], cfg.get("PAIRS", False))
    dummy = out
    grid = (triton.cdiv(n, cfg["BN"]), cfg["SPLIT_K"])
    _gemv_tma_kernel[grid](
        w_desc, s_desc, z_desc, x, pw.bias if pw.bias is not None else dummy, res if res is not None else dummy,
        out, part, lock, n, k,
        HAS_ZERO=pw.zero is not None, HAS_BIAS=pw.bias is not None, HAS_RES=res is not None,
        ACT_SILU_MUL=act == "silu_mul", PAIRS=cfg.get("PAIRS", False), SPLIT_K=cfg["SPLIT_K"], STAGES=cfg["STAGES"],
        WARPS_G=cfg["WARPS_G"], PDL=pdl, num_warps=cfg["num_warps"], XTILES=x_tiles(pw, cfg),
        **({"launch_pdl": True} if pdl else {}))


def x_tiles(pw, cfg: dict) -> int:
    """With ``XSMEM``, the tiles of one split (the activations' shared-memory planes are sized for them)."""
    if not cfg.get("XSMEM"):
        return 0
    n_groups = pw.in_features // pw.group_size
    per_split = -(-n_groups // cfg["SPLIT_K"])
    return -(-per_split // cfg["GT"])
