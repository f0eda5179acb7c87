"""Experiment (branch exp/mma-gemv, not wired into the runtime): a batch-1 int4 GEMV whose products run on tensor
cores through ``mma.sync.m16n8k16`` in inline PTX, with the words stored pre-permuted so that each lane's word
decodes straight into its B-operand fragments (as Marlin does), in Gluon (explicit layouts: which lane holds which
word is fixed).

Why: the pointer GEMV's PDL chain at 4096 x 4096 is bound by the decode after its wait (docs/BENCHMARKS.md,
sixteenth session), 21-27 SASS instructions a word. Here a word costs one SHF, four LOP3, two HSUB2 / two HFMA2
(codes minus zero point, exact in fp16) and two HMMA (the eight products and their sum), the scale applied per
group in fp32 on the accumulators: about 11 before loads and addresses.

Layout ``pack_mma``: int32 ``[N / 8, K / 32, 32]``; word ``[nb, kb, lane]`` holds column ``n = 8 nb + lane // 4``,
``t = lane % 4``, ``k0 = 32 kb``, nibbles 0..7 = codes at k0 + (2t, 2t+8, 16+2t, 16+2t+8, 2t+1, 2t+9, 16+2t+1,
16+2t+9): mask 0x000F000F gives the pair (2t, 2t+1), the B fragment's first register of the first k16 step; 0x00F000F0
its second (2t+8, 2t+9); the same after a shift by 8, the second step's. A warp reads one [nb, kb] block: 128 B.
Activations: row 0 of the 16-row A operand (lanes 0-3 load their pairs, other rows zero); outputs: lanes 0-3's
c0, c1 (columns 2t, 2t+1). Groups of 128 (four k32 blocks).

    python bench/triton_gemv_mma.py --emulate        # CPU: packing + fragment mapping against the reference
    python bench/triton_gemv_mma.py --sass           # CPU: compile for sm_90, count the loop's instructions
    python bench/triton_gemv_mma.py                  # GPU: correctness and timing against the runtime's GEMV
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402

_NIBBLE_K = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of a word holds code 8w + _NIBBLE_K[j] of its run of eight


def pack_mma(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[K, N]`` (0..15) -> words ``[N / 8, K / 128, 32, 4]`` int32 in the layout above (K a multiple of
    128: groups of 128)."""
    k, n = codes.shape
    if k % 128 or n % 8:
        raise ValueError(f"K ({k}) must be a multiple of 128 and N ({n}) of 8")
    lane = torch.arange(32)
    t, g = lane % 4, lane // 4
    grp = torch.arange(k // 128)
    i = torch.arange(4)
    nb = torch.arange(n // 8)
    words = torch.zeros(n // 8, k // 128, 32, 4, dtype=torch.int64)
    base = (128 * grp)[None, :, None, None] + (32 * t)[None, None, :, None] + (8 * i)[None, None, None, :]
    nn = (8 * nb)[:, None, None, None] + g[None, None, :, None]
    for j, dk in enumerate(_NIBBLE_K):
        words |= codes.to(torch.int64)[base + dk, nn] << (4 * j)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # as signed 32-bit


def emulate(x: torch.Tensor, wm: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """What the kernel computes, in torch, from the mma fragments' definitions (PTX ISA, m16n8k16 .f16): lane
    (g, t) holds B rows 2t + 8r + h (r, h in 0..1) of column g, and A row g's columns 2t + 8r + h; C row 0 columns
    2t, 2t + 1 in lanes 0-3. Each lane's word (block i of group grp) decodes, per k16 step s, into B's elements
    (codes minus zero point, fp16), its A elements being x[128 grp + 32 t + 8 i + 4 s + 2 r + h]; the group's sum
    times its scale. ``x`` [K] fp16."""
    nbs, groups = wm.shape[:2]
    inv = [_NIBBLE_K.index(o) for o in range(8)]  # offset 4s + 2r + h -> nibble
    w = wm.to(torch.int64) & 0xFFFFFFFF
    y = torch.zeros(nbs * 8, dtype=torch.float32)
    for nb in range(nbs):
        for grp in range(groups):
            c = torch.zeros(8, dtype=torch.float32)  # C row 0
            for i in range(4):
                for st in range(2):
                    a_row = torch.zeros(16, dtype=torch.float32)
                    b = torch.zeros(16, 8, dtype=torch.float32)
                    for lane in range(32):
                        gg, t = lane // 4, lane % 4
                        z = float(zero[grp, 8 * nb + gg])
                        for r in range(2):
                            for h in range(2):
                                o = 4 * st + 2 * r + h
                                q = float((w[nb, grp, lane, i] >> (4 * inv[o])) & 15)
                                b[2 * t + 8 * r + h, gg] = torch.tensor(q - z).half().float()
                                if gg == 0:
                                    a_row[2 * t + 8 * r + h] = x[128 * grp + 32 * t + 8 * i + o].float()
                    c += a_row @ b
            y[8 * nb: 8 * nb + 8] += c * scale[grp, 8 * nb: 8 * nb + 8].float()
    return y


_MMA_PTX = gl.constexpr("""
    {
    .reg .b32 a, q, b0, b1, b2, b3, zr, k16;
    mov.b32 zr, 0;
    mov.b32 k16, 0x2C002C00;
    lop3.b32 a, $4, 0x000F000F, 0x64006400, 0xEA;
    sub.rn.f16x2 b0, a, $24;
    lop3.b32 a, $4, 0x00F000F0, 0x64006400, 0xEA;
    fma.rn.f16x2 b1, a, k16, $25;
    shr.b32 q, $4, 8;
    lop3.b32 a, q, 0x000F000F, 0x64006400, 0xEA;
    sub.rn.f16x2 b2, a, $24;
    lop3.b32 a, q, 0x00F000F0, 0x64006400, 0xEA;
    fma.rn.f16x2 b3, a, k16, $25;
    mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$8, zr, $9, zr}, {b0, b1},
        {zr, zr, zr, zr};
    mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$10, zr, $11, zr}, {b2, b3},
        {$0, $1, $2, $3};
    lop3.b32 a, $5, 0x000F000F, 0x64006400, 0xEA;
    sub.rn.f16x2 b0, a, $24;
    lop3.b32 a, $5, 0x00F000F0, 0x64006400, 0xEA;
    fma.rn.f16x2 b1, a, k16, $25;
    shr.b32 q, $5, 8;
    lop3.b32 a, q, 0x000F000F, 0x64006400, 0xEA;
    sub.rn.f16x2 b2, a, $24;
    lop3.b32 a, q, 0x00F000F0, 0x64006400, 0xEA;
    fma.rn.f16x2 b3, a, k16, $25;
    mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$12, zr, $13, zr}, {b0, b1},
        {$0, $1, $2, $3};
    mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$14, zr, $15, zr}, {b2, b3},
        {$0, $1, $2, $3};
    lop3.b32 a, $6, 0x000F000F, 0x64006400, 0xEA;
    sub.rn.f16x2 b0, a, $24;
    lop3.b32 a, $6, 0x00F000F0, 0x64006400, 0xEA;
    fma.rn.f16x2 b1, a, k16, $25;
    shr.b32 q, $6, 8;
    lop3.b32 a, q, 0x000F000F, 0x64006400, 0xEA;
    sub.rn.f16x2 b2, a, $24;
    lop3.b32 a, q, 0x00F000F0, 0x64006400, 0xEA;
    fma.rn.f16x2 b3, a, k16, $25;
    mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$16, zr, $17, zr}, {b0, b1},
        {$0, $1, $2, $3};
    mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$18, zr, $19, zr}, {b2, b3},
        {$0, $1, $2, $3};
    lop3.b32 a, $7, 0x000F000F, 0x64006400, 0xEA;
    sub.rn.f16x2 b0, a, $24;
    lop3.b32 a, $7, 0x00F000F0, 0x64006400, 0xEA;
    fma.rn.f16x2 b1, a, k16, $25;
    shr.b32 q, $7, 8;
    lop3.b32 a, q, 0x000F000F, 0x64006400, 0xEA;
    sub.rn.f16x2 b2, a, $24;
    lop3.b32 a, q, 0x00F000F0, 0x64006400, 0xEA;
    fma.rn.f16x2 b3, a, k16, $25;
    mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$20, zr, $21, zr}, {b0, b1},
        {$0, $1, $2, $3};
    mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$22, zr, $23, zr}, {b2, b3},
        {$0, $1, $2, $3};
    }
""")  # a constexpr: jitted code may read a global only as one


@gluon.jit
def _mma_group(w0, w1, w2, w3, x, zz, mz):
    """A lane's four words of one group (k32 blocks 0-3 of one column block): B fragments decoded (codes minus
    zero point, exact in fp16) and multiplied by row 0 of the activations on tensor cores, eight mma.sync chained
    from zero: the group's C fragment. ``x``: the lane's 16 activation pairs (4 per k32 block)."""
    return gl.inline_asm_elementwise(
        asm=_MMA_PTX, constraints="=f,=f,=f,=f" + ",r" * 22,
        args=[w0, w1, w2, w3, x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], x[8], x[9], x[10], x[11], x[12],
              x[13], x[14], x[15], zz, mz],
        dtype=(gl.float32, gl.float32, gl.float32, gl.float32), is_pure=True, pack=1)


@gluon.jit
def gemv_mma_kernel(xw_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K, E: gl.constexpr, SPLIT_K: gl.constexpr,
                    num_warps: gl.constexpr):
    """xw: x [K] fp16 viewed as int32 pairs; words ``pack_mma``; scale [K/128, N] fp16, zero [K/128, N] uint8; out
    [N] fp32, atomically added (zero it first). Each warp owns E blocks of 8 columns; programs split K by groups."""
    # [warp, column block, lane, k32 block of the group]: a lane's four words of a group in its registers
    L: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [1, 1, 32, 1], [num_warps, 1, 1, 1], [3, 2, 1, 0])
    L3: gl.constexpr = gl.SliceLayout(3, L)
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n_groups = K // 128
    per = gl.cdiv(n_groups, SPLIT_K)
    g_lo = pid_k * per
    g_hi = gl.minimum(g_lo + per, n_groups)
    w_i = gl.arange(0, num_warps, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
    e_i = gl.arange(0, E, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))
    lane = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
    step = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L))))
    nb = pid_n * (num_warps * E) + w_i[:, None, None] * E + e_i[None, :, None]  # [W, E, 1]
    t = lane % 4
    g = lane // 4
    col_b = nb * 8 + g[None, None, :]  # the lane's B column
    col_c = nb * 8 + 2 * t[None, None, :]  # its accumulators' first column (row 0: lanes 0-3)
    nb_ok = nb * 8 < N
    row0 = (g == 0)[None, None, :]
    w_off = (nb * n_groups * 128 + lane[None, None, :] * 4)[:, :, :, None] + step[None, None, None, :]
    # a lane's activations for a group: int32 pairs 64 grp + 16 t + m, m = 4 i + 2 s + r (block i, k16 step s,
    # fragment register r), sixteen in a row: four 16-byte loads
    LX: gl.constexpr = gl.BlockedLayout([1, 1, 1, 16], [1, 1, 32, 1], [num_warps, 1, 1, 1], [3, 2, 1, 0])
    lane_x = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, LX))))
    m_x = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LX))))
    x_off = (16 * lane_x)[None, None, :, None] + m_x[None, None, None, :]
    x_ok = x_off < 64  # lanes 0-3 (row 0 of A); the others hold zeros
    acc0 = gl.zeros([num_warps, E, 32], gl.float32, L3)
    acc1 = gl.zeros([num_warps, E, 32], gl.float32, L3)
    for grp in range(g_lo, g_hi):
        words = gl.load(w_ptr + w_off + grp * 128, mask=nb_ok[:, :, :, None], other=0)  # one 16-byte load
        lo, hi = gl.split(gl.reshape(words, [num_warps, E, 32, 2, 2]))
        w0, w2 = gl.split(lo)
        w1, w3 = gl.split(hi)
        # the same registers in the 3-D layout (a relabelling: each lane keeps its own words)
        w0 = gl.convert_layout(w0, L3)
        w1 = gl.convert_layout(w1, L3)
        w2 = gl.convert_layout(w2, L3)
        w3 = gl.convert_layout(w3, L3)
        # row 0 of A: lanes 0-3 hold the pairs (k0 + 2t, +1) and (k0 + 8 + 2t, +1) of each k16 step, for the
        # group's four k32 blocks; the same for every warp and column block, zero in the other lanes
        xs = gl.load(xw_ptr + grp * 64 + x_off, mask=x_ok, other=0)  # [1, 1, 32, 16]
        xs = gl.reshape(xs, [1, 1, 32, 2, 2, 2, 2])  # m = 8 a + 4 b + 2 c + d
        xd0, xd1 = gl.split(xs)
        xd0c0, xd0c1 = gl.split(xd0)
        xd1c0, xd1c1 = gl.split(xd1)
        xd0c0b0, xd0c0b1 = gl.split(xd0c0)
        xd0c1b0, xd0c1b1 = gl.split(xd0c1)
        xd1c0b0, xd1c0b1 = gl.split(xd1c0)
        xd1c1b0, xd1c1b1 = gl.split(xd1c1)
        xa0000, xa0001 = gl.split(xd0c0b0)
        xa0010, xa0011 = gl.split(xd0c0b1)
        xa0100, xa0101 = gl.split(xd0c1b0)
        xa0110, xa0111 = gl.split(xd0c1b1)
        xa1000, xa1001 = gl.split(xd1c0b0)
        xa1010, xa1011 = gl.split(xd1c0b1)
        xa1100, xa1101 = gl.split(xd1c1b0)
        xa1110, xa1111 = gl.split(xd1c1b1)
        x = (gl.convert_layout(xa0000, L3),
             gl.convert_layout(xa1000, L3),
             gl.convert_layout(xa0100, L3),
             gl.convert_layout(xa1100, L3),
             gl.convert_layout(xa0010, L3),
             gl.convert_layout(xa1010, L3),
             gl.convert_layout(xa0110, L3),
             gl.convert_layout(xa1110, L3),
             gl.convert_layout(xa0001, L3),
             gl.convert_layout(xa1001, L3),
             gl.convert_layout(xa0101, L3),
             gl.convert_layout(xa1101, L3),
             gl.convert_layout(xa0011, L3),
             gl.convert_layout(xa1011, L3),
             gl.convert_layout(xa0111, L3),
             gl.convert_layout(xa1111, L3))
        z = gl.load(z_ptr + grp * N + col_b, mask=nb_ok, other=0).to(gl.int32)
        zz = (0x6400 + z) * 0x10001  # (1024 + z) in both fp16 halves
        mz = (0xD400 + 16 * z) * 0x10001  # -(64 + z)
        c0, c1, c2, c3 = _mma_group(w0, w1, w2, w3, x, zz, mz)
        s0 = gl.load(s_ptr + grp * N + col_c, mask=nb_ok & row0, other=0.0).to(gl.float32)
        s1 = gl.load(s_ptr + grp * N + col_c + 1, mask=nb_ok & row0, other=0.0).to(gl.float32)
        acc0 += c0 * s0
        acc1 += c1 * s1
    ok = nb_ok & row0
    gl.atomic_add(out_ptr + col_c, acc0, mask=ok, sem="relaxed")
    gl.atomic_add(out_ptr + col_c + 1, acc1, mask=ok, sem="relaxed")


def _random_case(n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(k // 128, n, generator=gen) * 0.02 + 0.001).half()
    zero = torch.randint(0, 16, (k // 128, n), generator=gen, dtype=torch.uint8)
    x = torch.randn(k, generator=gen).half()
    w = (codes.float() - zero.float().repeat_interleave(128, 0)) * scale.float().repeat_interleave(128, 0)
    ref = x.float() @ w
    return x, codes, scale, zero, ref


def check_emulation() -> dict:
    out = {}
    for n, k in ((16, 256), (24, 384)):
        x, codes, scale, zero, ref = _random_case(n, k)
        y = emulate(x, pack_mma(codes), scale, zero)
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        out[f"{n}x{k}"] = err
        print(f"emulated {n}x{k}: max rel err {err:.2e}", flush=True)
        assert err < 1e-5, err
    return out


def sass_counts(warps_e=((4, 1), (4, 2), (4, 4), (8, 2))) -> list:
    from bench.triton_gemv_sass import loop_mix
    from qcompile.runtime.triton.aot_check import compile_one

    types = dict(xw_ptr="*i32", w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8", out_ptr="*fp32", N="i32", K="i32")
    rows = []
    for warps, e in warps_e:
        st = compile_one(gemv_mma_kernel, types, dict(E=e, SPLIT_K=4, num_warps=warps), dict(N=4096, K=4096), warps,
                         keep_cubin=True)
        n, mix = loop_mix(st["cubin"])
        words = 4 * e  # a group's words per thread: four k32 blocks per column block
        rows.append(dict(warps=warps, E=e, regs=st["regs"], spills=st["spills"], per_word=n / words))
        print(f"{warps} warps x {e} column blocks: {st['regs']} registers, {n} instructions per group loop, "
              f"{n / words:.1f} per word; top: {', '.join(f'{k} {v}' for k, v in mix.most_common(8))}", flush=True)
    return rows


def launch(x, wm, scale, zero, out, e: int, warps: int, split: int):
    n = scale.shape[1]
    k = x.numel()
    grid = (-(-(n // 8) // (warps * e)), split)
    gemv_mma_kernel[grid](x.view(torch.int32), wm, scale, zero, out, n, k, E=e, SPLIT_K=split, num_warps=warps)


def gpu(configs) -> dict:
    from bench.triton_kernels import SHAPES, copies_for, graph_time, peak_copy_bandwidth
    from qcompile.runtime.triton.packing import pack_from_export
    from qcompile.runtime.triton.wq_matmul import wq_linear

    res = {"device": torch.cuda.get_device_name(), "peak_copy": peak_copy_bandwidth(), "rows": []}
    peak = res["peak_copy"]["tb_per_s"]
    for n, k in ((256, 512), (1000, 384)) + tuple(SHAPES):
        x, codes, scale, zero, ref = _random_case(n, k, seed=1)
        xc, sc, zc = x.cuda(), scale.cuda(), zero.cuda()
        wm = pack_mma(codes).cuda()
        for e, warps, split in configs:
            out = torch.zeros(n, device="cuda", dtype=torch.float32)
            launch(xc, wm, sc, zc, out, e, warps, split)
            err = ((out.cpu() - ref).abs().max() / ref.abs().max()).item()
            row = {"N": n, "K": k, "E": e, "warps": warps, "split": split, "rel_err": err}
            if (n, k) in SHAPES:
                copies = copies_for(wm.numel() * 4)
                ws = [wm] + [wm.clone() for _ in range(copies - 1)]
                outs = [torch.zeros(n, device="cuda", dtype=torch.float32) for _ in ws]
                t = graph_time([lambda w=w, o=o: launch(xc, w, sc, zc, o, e, warps, split) for w, o in zip(ws, outs)])
                nbytes = wm.numel() * 4 + sc.numel() * 2 + zc.numel() + 2 * k + 4 * n
                row.update(us=t * 1e6, fraction_of_peak_copy=nbytes / t / 1e12 / peak)
            res["rows"].append(row)
            print(row, flush=True)
        if (n, k) in SHAPES:  # the runtime's tuned GEMV on the same integers, same run
            pw = pack_from_export(codes.T.contiguous().to(torch.int32), scale.T.contiguous(), zero.T.contiguous(),
                                  bits=4, dtype=torch.float16).to("cuda")
            xx = xc.view(1, k)
            copies = copies_for(pw.nbytes)
            pws = [pw] + [pw.to("cuda") for _ in range(copies - 1)]
            outs = [torch.empty(1, n, device="cuda", dtype=torch.float16) for _ in pws]
            wq_linear(xx, pw)
            t = graph_time([lambda p=p, o=o: wq_linear(xx, p, out=o) for p, o in zip(pws, outs)])
            res["rows"].append({"N": n, "K": k, "runtime_us": t * 1e6})
            print(f"runtime GEMV {n}x{k}: {t * 1e6:.2f} us", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emulate", action="store_true")
    ap.add_argument("--sass", action="store_true")
    ap.add_argument("--out", default="bench/results/triton_gemv_mma.json")
    args = ap.parse_args()
    res = {}
    if args.emulate or not torch.cuda.is_available():
        res["emulation"] = check_emulation()
    if args.sass or not torch.cuda.is_available():
        res["sass"] = sass_counts()
    if torch.cuda.is_available() and not (args.emulate or args.sass):
        res["gpu"] = gpu([(e, w, s) for w in (4, 8) for e in (1, 2, 4) for s in (1, 2, 4, 8)])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
