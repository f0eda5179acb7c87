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

_NIBBLE_K = (0, 8, 16, 24, 1, 9, 17, 25)  # k offset (beyond k0 + 2t) of nibble j


def pack_mma(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[K, N]`` (0..15) -> words ``[N / 8, K / 32, 32]`` int32 in the layout above."""
    k, n = codes.shape
    if k % 32 or n % 8:
        raise ValueError(f"K ({k}) must be a multiple of 32 and N ({n}) of 8")
    lane = torch.arange(32)
    t, g = lane % 4, lane // 4
    kb = torch.arange(k // 32)
    nb = torch.arange(n // 8)
    words = torch.zeros(n // 8, k // 32, 32, dtype=torch.int64)
    for j, dk in enumerate(_NIBBLE_K):
        kk = (32 * kb)[None, :, None] + 2 * t[None, None, :] + dk  # [1, KB, 32]
        nn = (8 * nb)[:, None, None] + g[None, None, :]  # [NB, 1, 32]
        words |= codes.to(torch.int64)[kk, nn] << (4 * j)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # as signed 32-bit


def emulate(x: torch.Tensor, wm: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int = 128):
    """What the kernel computes, lane by lane, in torch: each lane's word decoded into its B fragments (q - z as
    fp16), the m16n8k16 products of row 0 summed per group in fp32, times the group's scale. ``x`` [K] fp16."""
    nbs, kbs, _ = wm.shape
    lane = torch.arange(32)
    t, g = lane % 4, lane // 4
    w = wm.to(torch.int64) & 0xFFFFFFFF
    y = torch.zeros(nbs * 8, dtype=torch.float32)
    for nb in range(nbs):
        cols = 8 * nb + g  # each lane's B column
        acc = torch.zeros(8, dtype=torch.float32)
        part = torch.zeros(8, dtype=torch.float32)
        for kb in range(kbs):
            grp = (32 * kb) // group
            z = zero[grp, cols].to(torch.float32)
            bmat = torch.zeros(32, 8, dtype=torch.float32)  # B [k 0..31 of this block, n 0..7]
            for j, dk in enumerate(_NIBBLE_K):
                q = ((w[nb, kb] >> (4 * j)) & 15).to(torch.float32)
                bmat[2 * t + dk, g] = (q - z).half().float()  # the fragment element lane holds
            part += x[32 * kb: 32 * kb + 32].float() @ bmat
            if (32 * kb + 32) % group == 0:
                acc += part * scale[grp, 8 * nb: 8 * nb + 8].float()
                part.zero_()
        y[8 * nb: 8 * nb + 8] = acc
    return y


_MMA_PTX = gl.constexpr("""
    {
    .reg .b32 a, q, b0, b1, b2, b3, zr, k16;
    mov.b32 zr, 0;
    mov.b32 k16, 0x2C002C00;
    lop3.b32 a, $4, 0x000F000F, 0x64006400, 0xEA;
    sub.rn.f16x2 b0, a, $9;
    lop3.b32 a, $4, 0x00F000F0, 0x64006400, 0xEA;
    fma.rn.f16x2 b1, a, k16, $10;
    shr.b32 q, $4, 8;
    lop3.b32 a, q, 0x000F000F, 0x64006400, 0xEA;
    sub.rn.f16x2 b2, a, $9;
    lop3.b32 a, q, 0x00F000F0, 0x64006400, 0xEA;
    fma.rn.f16x2 b3, a, k16, $10;
    mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$5, zr, $6, zr}, {b0, b1},
        {$11, $12, $13, $14};
    mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$7, zr, $8, zr}, {b2, b3},
        {$0, $1, $2, $3};
    }
""")  # a constexpr: jitted code may read a global only as one


@gluon.jit
def _mma_word(words, a0, a2, a0b, a2b, zz, mz, c0, c1, c2, c3):
    return gl.inline_asm_elementwise(
        asm=_MMA_PTX, constraints="=f,=f,=f,=f,r,r,r,r,r,r,r,f,f,f,f",
        args=[words, a0, a2, a0b, a2b, zz, mz, c0, c1, c2, c3],
        dtype=(gl.float32, gl.float32, gl.float32, gl.float32), is_pure=True, pack=1)


@gluon.jit
def _zero_consts(z):
    """(1024 + z) and -(64 + z) as half2 pairs, from uint8 zero points (exact in fp16)."""
    zf = z.to(gl.float32)
    hi = (zf + 1024.0).to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    lo = (-(zf + 64.0)).to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    return hi | (hi << 16), lo | (lo << 16)


@gluon.jit
def gemv_mma_kernel(xw_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K, E: gl.constexpr, SPLIT_K: gl.constexpr,
                    num_warps: gl.constexpr):
    """xw: x [K] fp16 viewed as int32 pairs, words ``pack_mma``, scale [K/128, N] fp16, zero [K/128, N] uint8; out [N]
    fp32, atomically added (zero it first). Each warp owns E blocks of 8 columns; programs split K."""
    L: gl.constexpr = gl.BlockedLayout([1, 1, 1], [1, 1, 32], [num_warps, 1, 1], [2, 1, 0])
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    kbs = K // 32
    n_groups = K // 128
    per = gl.cdiv(n_groups, SPLIT_K)
    g_lo = pid_k * per
    g_hi = gl.minimum(g_lo + per, n_groups)
    w_i = gl.arange(0, num_warps, layout=gl.SliceLayout(1, gl.SliceLayout(2, L)))
    e_i = gl.arange(0, E, layout=gl.SliceLayout(0, gl.SliceLayout(2, L)))
    lane = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, L)))
    nb = pid_n * (num_warps * E) + w_i[:, None, None] * E + e_i[None, :, None]  # [W, E, 1]
    t = lane % 4
    g = lane // 4
    col_b = nb * 8 + g[None, None, :]  # the lane's B column
    col_c = nb * 8 + 2 * t[None, None, :]  # its accumulators' first column
    nb_ok = nb * 8 < N
    row0 = (g == 0)[None, None, :]
    acc0 = gl.zeros([num_warps, E, 32], gl.float32, L)
    acc1 = gl.zeros([num_warps, E, 32], gl.float32, L)
    for grp in range(g_lo, g_hi):
        z = gl.load(z_ptr + grp * N + col_b, mask=nb_ok, other=0)
        zz, mz = _zero_consts(z)
        c0 = gl.zeros([num_warps, E, 32], gl.float32, L)
        c1 = gl.zeros([num_warps, E, 32], gl.float32, L)
        c2 = gl.zeros([num_warps, E, 32], gl.float32, L)
        c3 = gl.zeros([num_warps, E, 32], gl.float32, L)
        for i in gl.static_range(4):
            kb = grp * 4 + i
            words = gl.load(w_ptr + (nb * kbs + kb) * 32 + lane[None, None, :], mask=nb_ok, other=0)
            # row 0 of A: lanes 0-3 hold x pairs (k0 + 2t, +1) and (k0 + 8 + 2t, +1) per k16 step; the same for
            # every warp and column block (broadcast), zero in the other lanes
            xi = kb * 16 + t[None, None, :]
            a0 = gl.load(xw_ptr + xi, mask=row0, other=0)
            a2 = gl.load(xw_ptr + xi + 4, mask=row0, other=0)
            a0b = gl.load(xw_ptr + xi + 8, mask=row0, other=0)
            a2b = gl.load(xw_ptr + xi + 12, mask=row0, other=0)
            c0, c1, c2, c3 = _mma_word(words, a0, a2, a0b, a2b, zz, mz, c0, c1, c2, c3)
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
    for n, k in ((64, 256), (40, 384)):
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
