"""Experiment (static, CPU only): a batch-1 int4 GEMV whose products run on tensor cores, in plain Triton, and its
SASS instruction count per 32-bit word against the pointer GEMV's (``bench/triton_gemv_sass.py``: 21-27).

Per group of 128 K-rows: the words' codes are decoded to exact fp16 by the magic-number trick (two codes per
LOP3), the activations padded to 16 rows, and either eight ``tl.dot`` (one per code plane, K = 16) or one (the
planes joined and permuted into a [128, BN] tile, the activations gathered in the same order); zero points and
scales applied per group in fp32 afterwards. Compiled for sm_90 with Triton's bundled ptxas; the loop's
instructions counted as in ``triton_gemv_sass.py``.

    python bench/triton_gemv_tc_sass.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _codes8(words):
    """Eight fp16 tensors: code j (0..15, exact) of every word, j = 0..7 (nibble j)."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 a, q, m, k, c;
        mov.b32 m, 0x64006400;
        mov.b32 k, 0x2C002C00;
        mov.b32 c, 0xD400D400;
        lop3.b32 a, $8, 0x000F000F, 0x64006400, 0xEA;
        sub.rn.f16x2 a, a, m;
        mov.b32 {$0, $4}, a;
        lop3.b32 a, $8, 0x00F000F0, 0x64006400, 0xEA;
        fma.rn.f16x2 a, a, k, c;
        mov.b32 {$1, $5}, a;
        shr.b32 q, $8, 8;
        lop3.b32 a, q, 0x000F000F, 0x64006400, 0xEA;
        sub.rn.f16x2 a, a, m;
        mov.b32 {$2, $6}, a;
        lop3.b32 a, q, 0x00F000F0, 0x64006400, 0xEA;
        fma.rn.f16x2 a, a, k, c;
        mov.b32 {$3, $7}, a;
        }
        """,
        constraints="=h,=h,=h,=h,=h,=h,=h,=h,r",
        args=[words], dtype=(tl.float16,) * 8, is_pure=True, pack=1)


@triton.jit
def _x_code(x_ptr, k0, offs_m, offs_r, j: tl.constexpr, K):
    kk = k0 + 8 * offs_r + j
    return tl.load(x_ptr + kk[None, :] + 0 * offs_m[:, None], mask=(offs_m == 0)[:, None] & (kk < K)[None, :],
                   other=0.0)


@triton.jit
def gemv_tc_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLIT_K: tl.constexpr, JOIN: tl.constexpr):
    """Batch-1 int4 GEMV on tensor cores: per group, codes decoded to exact fp16 (q, no zero), x padded to 16
    rows, ``sum_j dot(x_j, codes_j)`` in fp32, then ``scale * (that - zero * sum(x))``. Out: fp32, atomically
    added (zero it first). GROUP = 128 (16 word rows: one mma K-step per code plane)."""
    R: tl.constexpr = GROUP // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_groups = K // GROUP
    per = tl.cdiv(n_groups, SPLIT_K)
    g_lo = pid_k * per
    g_hi = tl.minimum(g_lo + per, n_groups)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, 16)
    offs_r = tl.arange(0, R)
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for g in range(g_lo, g_hi):
        k0 = g * GROUP
        words = tl.load(w_ptr + (g * R + offs_r)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
        c0, c1, c2, c3, c4, c5, c6, c7 = _codes8(words)
        if JOIN:
            # J[r, n, i, s, c] = code 4c + 2s + i of word r; flattened idx = 4i + 2s + c
            jt = tl.join(tl.join(tl.join(c0, c1), tl.join(c2, c3)), tl.join(tl.join(c4, c5), tl.join(c6, c7)))
            b = tl.reshape(tl.permute(tl.reshape(jt, (R, BLOCK_N, 8)), (0, 2, 1)), (GROUP, BLOCK_N))
            idx = tl.arange(0, GROUP)
            code = 4 * (idx % 2) + 2 * ((idx // 2) % 2) + (idx % 8) // 4
            kk = k0 + (idx // 8) * 8 + code
            xa = tl.load(x_ptr + kk[None, :] + 0 * offs_m[:, None], mask=(offs_m == 0)[:, None], other=0.0)
            part = tl.dot(xa, b)
        else:
          part = tl.dot(_x_code(x_ptr, k0, offs_m, offs_r, 0, K), c0)
          part = tl.dot(_x_code(x_ptr, k0, offs_m, offs_r, 1, K), c1, part)
          part = tl.dot(_x_code(x_ptr, k0, offs_m, offs_r, 2, K), c2, part)
          part = tl.dot(_x_code(x_ptr, k0, offs_m, offs_r, 3, K), c3, part)
          part = tl.dot(_x_code(x_ptr, k0, offs_m, offs_r, 4, K), c4, part)
          part = tl.dot(_x_code(x_ptr, k0, offs_m, offs_r, 5, K), c5, part)
          part = tl.dot(_x_code(x_ptr, k0, offs_m, offs_r, 6, K), c6, part)
          part = tl.dot(_x_code(x_ptr, k0, offs_m, offs_r, 7, K), c7, part)
        xs = tl.sum(tl.load(x_ptr + k0 + tl.arange(0, GROUP)).to(tl.float32))
        scale = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
        acc += scale[None, :] * (part - z[None, :] * xs)
    y = tl.sum(tl.where((offs_m == 0)[:, None], acc, 0.0), axis=0)
    tl.atomic_add(out_ptr + offs_n, y, mask=n_mask, sem="relaxed")


def main() -> None:
    from bench.triton_gemv_sass import loop_mix
    from qcompile.runtime.triton.aot_check import compile_one

    types = dict(x_ptr="*fp16", w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8", out_ptr="*fp32", N="i32", K="i32")
    for join in (False, True):
        for bn, warps in [(32, 1), (32, 2), (64, 2), (64, 4), (128, 4)]:
            st = compile_one(gemv_tc_kernel, types, dict(GROUP=128, BLOCK_N=bn, SPLIT_K=4, JOIN=join),
                             dict(N=4096, K=4096), warps, 2, keep_cubin=True)
            n, mix = loop_mix(st["cubin"])
            words = 16 * bn / (warps * 32)  # one group's words a thread per iteration
            print(f"{'one dot (joined planes)' if join else 'eight dots'}, {bn} columns, {warps} warps: "
                  f"{st['regs']} registers, {st['shared']} B shared, {n} instructions per loop, {n / words:.1f} "
                  f"per word; top: {', '.join(f'{k} {v}' for k, v in mix.most_common(6))}")


if __name__ == "__main__":
    main()
