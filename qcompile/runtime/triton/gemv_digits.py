"""The batch-1 int4 GEMV on the int8 tensor cores, exact, with each program's words held in registers across the PDL
wait: activations as six int8 digit planes (Gluon, sm_90).

Why: a dependent GEMV step can only be fast if its weights are read before it waits for the step before, and if
little work is left after the wait. ``bench/triton_chain_floor.py`` measured both on the H100 (4096 x 4096,
2026-12-07, docs/BENCHMARKS.md, twenty-fourth session): a kernel that loads its whole slice into registers (128
words a thread, 128 programs of 4 warps) before the wait and uses it after takes 3.45 µs a step with about two
integer instructions a word after the wait, 3.99 µs with about five, 5.16 µs with about fourteen; 75 % of the copy
peak needs 3.89 µs. The half2 and fp16-mma decodes spend 10-25 instructions a word. Here the codes go to the int8
tensor cores nearly as they are stored (about 4.8 SASS instructions a word after the wait, all told):

* **Activations as digits.** An fp16 value is an integer multiple of 2^-24 below 2^16 in magnitude, so
  ``X = x * 2^24`` is an integer of at most 41 bits, with six balanced base-256 digits ``d_p`` in [-128, 127]
  (``X = sum_p d_p 256^p``). The step before writes them (``digit_planes`` on the host for the chain's input): plane
  ``p`` is column ``p`` of the mma's B operand (``m16n8k32``, eight columns, six used), so one mma multiplies 16
  rows x 32 inputs by all six planes at once, and every product and every group sum is an exact integer.
* **Codes as bytes, one instruction a word.** Each byte of a word holds the codes of two rows, ``c_P + 16 c_P'``
  (rows ``r`` and ``r + 16`` of the program's 32, same input). The mma reads the raw word as u8 (``C_raw = C_P + 16
  C_P'``) and the word AND 0x0F0F0F0F (``C_P``), so ``16 C_P' = C_raw - C_P``: one LOP3 a word and half an mma.
* **The zero point from a third mma**: A all ones gives the group's digit sums ``D_p``; ``sum (c - z) d = C - z D``.
* **Per group of 128** (four k32 steps) a lane folds its two planes (``C_2t + 256 C_2t+1``: exact in int32),
  subtracts the zero point's term, converts to fp32 and multiplies by the scale: about 1.7 instructions a word.
  At the end, plane weights ``2^(16 t - 24)``, the lanes' and the warps' sums, the fp16 output and its digits.

So a step computes ``fp16(sum_g s_g sum_k (c - z) x)`` with exact products and group sums (fp32 only in the
conversion of each group's folded sum, the scale products and the final sums), and writes both the fp16 output and
its digit planes for the next step (an output that overflows fp16 gets meaningless digits).

**Paced word loads** (``PACE``, twenty-fifth session). Each program issues its words in ``PACE`` batches (4 by
default), each batch after a word of the batch before has arrived (its addresses carry that word times ``nil``, a
zero the compilers cannot see); the output is the same bits (checked at paces 1, 2, 4 and 8). Why it helps, as we
read the measurements (not observed directly): with two programs a multiprocessor, the program of layer l + 2 starts
when layer l's exits, at about the moment layer l + 1 is released from its wait, and unpaced every program asks for
its whole slice at once (64 KiB each, 8.8 MB over the grid) just as layer l + 1's dependent path (its digit loads,
its stores, the grid's completion) needs the same memory system. Paced, fewer bytes wait ahead of that path, and the
slice still arrives in time. Consistent with it: the variant with three programs a multiprocessor (more slices in
flight) was slower, and so was eight batches.

Measured on the H100 (2026-12-07, docs/BENCHMARKS.md, twenty-fifth session; ``bench/triton_gemv_chain.py --digits``
in two runs and the experiment's sweep in a third, whose build read ``nil`` from memory): **3.72-3.81 / 3.31-3.37 µs
a step in chains of 8 / 32, 3.17-3.23 µs marginal (77-79 / 87-89 / 91-93 % of the copy peak; 75 % needs 3.90 µs),
4.1-4.6x fp16, 1.6-1.8x the runtime's PDL chain**. Unpaced (one batch, the twenty-fourth session's kernel) 4.71-4.74
/ 4.42-4.43 / 4.32-4.34 µs (62 / 66 / 68 %); 2 batches 4.02-4.03 µs marginal, 8 batches 4.33 µs (each batch adds a
dependent round trip; likely the slice then arrives too late, not measured). Where the time was not (sweeps of the
same day, bench/results/device_2026-12-07_s25/calls.md): loading 2-5 digit planes instead of 6 (4.24-4.32 µs),
copies of the planes (4.36-4.42), 8 or 16 warps a program (5.24 / 4.76), and a third of the mma (the digit sums
written by the step before instead: 4.34 µs, the same bits). Without the wait (the ablation, wrong by design) the
unpaced kernel streams at 3.23-3.25 µs marginal and the paced one at 3.59-3.65: pacing costs streaming speed and
buys back far more on the dependent path. The twenty-fourth session's figures and what it tried: 4.30 µs marginal
unpaced; loading the two zero planes as well 4.87; releasing the next layer before the loads 4.36; scales, zero
points and digits through shared memory 5.29 (and one failed GPU case in each of two runs, not examined further); a
cap of 168 registers 6.25.

Layout (``pack_digits``): program ``q`` owns rows ``32 q .. 32 q + 31``; its ``W`` warps split K (``S = K / 32 W``
k32 steps a warp); lane ``(g, t) = (lane // 4, lane % 4)`` holds, for each step ``s``, the four words of its A
fragments: word ``i``, byte ``j`` = the codes of rows ``g + 8 (i % 2)`` (low nibble) and ``g + 8 (i % 2) + 16`` (high
nibble) at input ``32 s + 4 t + j + 16 (i // 2)`` of the warp's range (PTX ISA, ``mma.m16n8k32`` fragments for
.u8/.s8). Words ``[N / 32, W, S, 32, 4]`` int32 (a warp's loads of one step are one 512-byte run); scales
``[N / 32, W, K / 128 W, 8, 4]`` fp16 and negated zero points (int8) the same, for rows ``g, g + 8, g + 16, g + 24``.
Digit planes ``[8, K]`` int8 (rows 6 and 7 unused: ``digit_planes`` writes zeros there, the kernel neither reads
nor writes them), each 64-input block permuted so that lane ``(g, t)`` reads plane
``g``'s B registers of two steps as one 16-byte load.

**K in slices** (``splits``, twenty-eighth session). A K that one program cannot hold (more than 1024 inputs a warp,
or groups a warp not a power of two) runs in equal slices, each packed as a weight of its own (``[splits, N / 32,
...]``) and read from its contiguous run of the planes (positions permute only within blocks of 64): program (q, sp)
computes slice sp's fp32 partial of rows 32 q .. 32 q + 31, writes it to the split-K workspace the pointer GEMV uses
and counts its arrival; the last of the column to arrive sums the partials in slice order (deterministic) and
writes the fp16 output. ``default_layout`` prefers slices of 1024 inputs a warp (128 words a thread, as one slice of
4096 at 4 warps): K = 14336 in 7 slices of 2048 at 2 warps took the 4096 x 14336 PDL chain to 12.73 µs, **80 % of
the copy peak, 3.35x fp16**, against 15.05 µs (68 %) at 4 warps (96 registers: room for five programs a
multiprocessor) in the same H100 run; 4096 x 4096 and 14336 x 4096 were 87 % and 89 % in it (docs/BENCHMARKS.md).

Scope: int4 weights with groups of 128, N a multiple of 32 and K of 512, 1024, 2048 or 4096, or equal slices of
those (fp16 output only). Two uses:
dependent chains of square weights, each step writing the next one's planes (``gemv_digits_chain``,
``bench/triton_gemv_chain.py``); and one GEMV whose planes a producer wrote (``gemv_digits``: the runner's
``digit_gemv``, where the RMSNorm before q|k|v and gate|up and the attention before o write them with
``_jit.store_digit_planes``; the output is fp16 only; the runner keeps one slice). SwiGLU writes none (down reads
gate|up through the pointer GEMV's prologue), so down keeps the pointer GEMV. Non-finite activations are
not representable. Tested (``tests/runtime/triton/test_gemv_digits.py``) on CUDA, and on the CPU under Triton's
interpreter through ``_gluon`` (``_GROUP_PTX``'s mma emulated instruction by instruction, lane by lane), both against
the dequantized GEMV; ``emulate`` computes what the kernel does from the fragments' definitions, in torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.runtime.triton._env import interpreting, require_triton

triton = require_triton()
from qcompile.runtime.triton._gluon import (  # noqa: E402
    _gdc_launch_dependents, _gdc_wait, as_numpy, emulates, from_numpy, gl, gluon, lane_registers, mma_m16n8k32_u8_s8)

from qcompile.runtime.triton._jit import DIGIT_OFFSET, DIGIT_PLANES, check_planes  # noqa: E402
from qcompile.runtime.triton.gemv_mma import _split4, _split8  # noqa: E402

PLANES = DIGIT_PLANES  # digits of an fp16 value times 2^24
ROWS = 32  # a program's output rows: two mma row blocks, one in each nibble of a byte
GROUP = 128
WARPS = 4
PACE = 4  # batches of a program's word loads (the module docstring: 4 was the fastest of 1, 2, 4, 8 on the H100)
_OFFSET = DIGIT_OFFSET  # makes every balanced digit a byte 0..255
_PLANES: gl.constexpr = gl.constexpr(PLANES)  # (jitted code reads a global only as a constexpr)
_OFFSET_C: gl.constexpr = gl.constexpr(_OFFSET)


def plane_positions(k: int) -> torch.Tensor:
    """Where input ``k`` sits in a plane: in each 64-input block, lane t's B registers of steps 2 sp and 2 sp + 1
    (inputs 32 s + 4 t + j + 16 b) are bytes ``64 sp + 16 t + 8 (s % 2) + 4 b + j``."""
    if k % 64:
        raise ValueError(f"digit planes need K a multiple of 64, got {k}")
    kk = torch.arange(k)
    s, r = kk // 32, kk % 32
    b, t, j = r // 16, (r % 16) // 4, r % 4
    return (s // 2) * 64 + t * 16 + (s % 2) * 8 + b * 4 + j


def digit_planes(x: torch.Tensor) -> torch.Tensor:
    """fp16 ``x`` [K] -> int8 [8, K]: the balanced base-256 digits of ``x * 2^24`` (exact), plane p in row p (rows 6
    and 7 zero), positions as ``plane_positions``."""
    if x.dtype != torch.float16:
        raise ValueError(f"digit planes are defined for fp16 activations, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("digit planes: the activations hold inf or NaN")
    k = x.numel()
    big = (x.reshape(-1).double() * 2.0**24).to(torch.int64) + _OFFSET  # exact: 41 bits
    shifts = 8 * torch.arange(PLANES, device=x.device)
    digits = ((big[None, :] >> shifts[:, None]) & 255) - 128
    out = torch.zeros(8, k, dtype=torch.int8, device=x.device)
    out[:PLANES, plane_positions(k).to(x.device)] = digits.to(torch.int8)
    return out


def planes_to_values(planes: torch.Tensor) -> torch.Tensor:
    """The inverse of ``digit_planes``, as float64 [K] (for checks)."""
    k = planes.shape[1]
    digits = planes[:PLANES, plane_positions(k).to(planes.device)].to(torch.int64)
    weights = torch.tensor([256**p for p in range(PLANES)], dtype=torch.int64, device=planes.device)
    return (digits * weights[:, None]).sum(0).double() / 2.0**24


@dataclass
class DigitWeight:
    """One int4 weight (``N`` outputs, ``K`` inputs, groups of 128) in this kernel's layout (the chain kernel takes
    square ones: its output is the next layer's input, and it strides the planes it writes by K)."""

    words: torch.Tensor  # int32 [N / 32, W, S, 32, 4]; split: [splits, N / 32, W, S, 32, 4], S of one slice
    scale: torch.Tensor  # fp16 [N / 32, W, K / 128 W, 8, 4] (split: [splits, ...], K of one slice)
    nzero: torch.Tensor  # int8, the same: minus the zero point
    out_features: int
    in_features: int
    warps: int
    splits: int = 1  # K in this many equal slices, one program each (K / splits <= 1024 warps)

    @property
    def slice_features(self) -> int:
        return self.in_features // self.splits


def _slice_fits(ks: int, warps: int) -> bool:
    """K slice ``ks`` in one program: groups of 128 a warp a power of two, at most 1024 inputs a warp."""
    groups = ks // (GROUP * warps)
    return ks % (GROUP * warps) == 0 and groups > 0 and not groups & (groups - 1) and ks <= 1024 * warps


def split_layouts(k: int, warps: int = WARPS) -> list[int]:
    """Every number of equal K slices that one program each can hold at ``warps`` warps, fewest first."""
    return [sp for sp in range(1, k // (GROUP * warps) + 1) if k % sp == 0 and _slice_fits(k // sp, warps)]


def default_splits(k: int, warps: int = WARPS) -> int:
    """The fewest equal K slices that one program each can hold (1 where K fits; 7 for K = 14336 at 4 warps: 2048
    inputs a slice); 0 where none does."""
    return next(iter(split_layouts(k, warps)), 0)


def default_layout(k: int) -> tuple[int, int]:
    """(splits, warps) for K inputs: slices of 1024 inputs a warp (128 words a thread), at the most warps (4 or 2)
    that allow them; else one slice at ``WARPS`` warps where K fits it; else slices of 1024 at one warp where they
    divide K; else the fewest slices at ``WARPS`` warps.
    On the H100 as PDL chains (2026-12-07, docs/BENCHMARKS.md): K = 14336 in 7 slices of 2048 at 2 warps reached 80 %
    of the copy peak against 68 % at 4 warps, and K = 2048 in one slice at 2 warps took 2.23-2.36 us at the 1.2B
    model's o and q|k|v against 2.75-2.82 at 4 warps."""
    for warps in (WARPS, 2):
        if k % (1024 * warps) == 0:
            return k // (1024 * warps), warps
    if _slice_fits(k, WARPS):  # 512, 1024: one slice at 4 warps, as before 2 warps were measured at K = 2048
        return 1, WARPS
    if k % 1024 == 0:  # 3072, 5120, ...: slices of 1024 at one warp
        return k // 1024, 1
    return default_splits(k, WARPS) or 1, WARPS


def pack_digits(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, warps: int | None = None,
                splits: int | None = None) -> DigitWeight:
    """``codes`` [K, N] (0..15), ``scale`` [K / 128, N], ``zero`` [K / 128, N] (None: symmetric, zero point 8) ->
    the layout of the module docstring. ``splits``: K in that many equal slices, each packed as a weight of its own
    (programs ``(N / 32, splits)``, the last of a column to finish summing their fp32 partials). Defaults: both
    given by ``default_layout``; ``warps`` alone: the fewest slices at it (``default_splits``); ``splits`` alone: at
    ``default_layout``'s warps where it gives that many slices, else at ``WARPS`` warps."""
    k, n = codes.shape
    if warps is None:
        default_sp, default_warps = default_layout(k)
        splits, warps = (default_sp, default_warps) if splits in (None, default_sp) else (splits, WARPS)
    if warps < 1 or warps & (warps - 1):
        raise ValueError(f"gemv_digits: warps must be a power of two, got {warps}")
    if splits is None:
        splits = default_splits(k, warps) or 1  # 1: the checks below name what does not fit
    if splits < 1 or k % splits or (splits > 1 and not _slice_fits(k // splits, warps)):
        raise ValueError(f"gemv_digits: K = {k} does not split into {splits} slices of 128 x {warps} warps x a "
                         f"power of two, at most {1024 * warps}, inputs")
    if splits > 1:
        if scale.shape != (k // GROUP, n) or (zero is not None and zero.shape != scale.shape):
            raise ValueError(f"gemv_digits takes scales and zero points [K / {GROUP}, N] = [{k // GROUP}, {n}], got "
                             f"{tuple(scale.shape)}")
        ks, gs = k // splits, k // splits // GROUP
        parts = [pack_digits(codes[i * ks:(i + 1) * ks], scale[i * gs:(i + 1) * gs],
                             None if zero is None else zero[i * gs:(i + 1) * gs], warps, 1) for i in range(splits)]
        return DigitWeight(torch.stack([p.words for p in parts]), torch.stack([p.scale for p in parts]),
                           torch.stack([p.nzero for p in parts]), n, k, warps, splits)
    groups = k // (GROUP * warps)  # a warp's: a power of two (the kernel halves its registers to find one)
    if n % ROWS or k % (GROUP * warps) or groups & (groups - 1) or scale.shape != (k // GROUP, n):
        raise ValueError(f"gemv_digits takes N a multiple of {ROWS} and K {GROUP} x {warps} warps x a power of two, "
                         f"with scales [K / {GROUP}, N]; got codes {tuple(codes.shape)}, scales {tuple(scale.shape)}")
    if k > 1024 * warps:  # K / 32 words a thread, held in registers: 128 is what a thread can hold beside the rest
        raise ValueError(f"gemv_digits: K = {k} needs more than {warps} warps (at most 1024 inputs a warp)")
    if scale.dtype != torch.float16:
        raise ValueError(f"gemv_digits takes fp16 scales (the kernel reads them as such), got {scale.dtype}")
    if scale.device != codes.device or (zero is not None and zero.device != codes.device):
        raise ValueError("gemv_digits: codes, scales and zero points must be on one device")
    if zero is None:
        zero = torch.full_like(scale, 8, dtype=torch.uint8)
    # two codes share a byte, and the kernel's int32 bounds assume 4-bit codes and zero points
    if codes.numel() and (codes.min() < 0 or codes.max() > 15):
        raise ValueError(f"gemv_digits takes 4-bit codes 0..15, got {int(codes.min())}..{int(codes.max())}")
    if zero.shape != scale.shape or (zero.numel() and (zero.min() < 0 or zero.max() > 15)):
        raise ValueError(f"gemv_digits takes zero points 0..15 shaped like the scales {tuple(scale.shape)}")
    dev = codes.device
    steps = k // (32 * warps)
    q = torch.arange(n // ROWS, device=dev).view(-1, 1, 1, 1, 1, 1)
    w = torch.arange(warps, device=dev).view(1, -1, 1, 1, 1, 1)
    s = torch.arange(steps, device=dev).view(1, 1, -1, 1, 1, 1)
    lane = torch.arange(32, device=dev).view(1, 1, 1, -1, 1, 1)
    i = torch.arange(4, device=dev).view(1, 1, 1, 1, -1, 1)
    j = torch.arange(4, device=dev).view(1, 1, 1, 1, 1, -1)
    g, t = lane // 4, lane % 4
    kk = w * (k // warps) + 32 * s + 4 * t + j + 16 * (i // 2)
    row = ROWS * q + g + 8 * (i % 2)
    c = codes.to(torch.int64)
    byte = c[kk, row] + 16 * c[kk, row + 16]  # [N/32, W, S, 32, 4, 4]
    words = (byte << (8 * j)).sum(-1)
    words = (words - ((words >> 31) << 32)).to(torch.int32)  # as signed 32-bit
    gw = k // (GROUP * warps)
    qq = torch.arange(n // ROWS, device=dev).view(-1, 1, 1, 1, 1)
    ww = torch.arange(warps, device=dev).view(1, -1, 1, 1, 1)
    gi = torch.arange(gw, device=dev).view(1, 1, -1, 1, 1)
    gg = torch.arange(8, device=dev).view(1, 1, 1, -1, 1)
    r = torch.arange(4, device=dev).view(1, 1, 1, 1, -1)
    grp = ww * gw + gi
    rows = ROWS * qq + gg + 8 * r  # r = 0..3: rows g, g + 8, g + 16, g + 24
    return DigitWeight(words.contiguous(), scale[grp, rows].to(torch.float16).contiguous(),
                       (-zero[grp, rows].to(torch.int16)).to(torch.int8).contiguous(), n, k, warps)


def emulate(dw: DigitWeight, planes: torch.Tensor) -> torch.Tensor:
    """What the kernel computes (before its fp16 rounding), in torch from the fragments' definitions: lane (g, t)
    holds A rows g and g + 8 at columns 4t + (0..3) and 16 + 4t + (0..3), B column g at rows 4t + (0..3) and
    16 + 4t + (0..3), C rows g and g + 8 at columns 2t and 2t + 1 (PTX ISA, m16n8k32 .u8/.s8). float64 [N]. It
    checks the layouts, not the kernel's arithmetic: it sums in int64 and float64, so the kernel's int32 folds and
    fp32 steps are checked by running the kernel itself (``test_kernel_chain``, ``test_single_gemv``: compiled on
    the GPU, interpreted on the CPU). A split weight: the sum of its slices'
    (each slice's inputs a contiguous run of the planes: positions permute only within blocks of 64)."""
    if dw.splits > 1:
        ks = dw.slice_features
        return sum(emulate(DigitWeight(dw.words[i], dw.scale[i], dw.nzero[i], dw.out_features, ks, dw.warps),
                           planes[:, i * ks:(i + 1) * ks]) for i in range(dw.splits))
    n, k, warps = dw.out_features, dw.in_features, dw.warps
    steps = k // (32 * warps)
    gw = steps // 4
    pos = plane_positions(k).to(planes.device)
    xb = planes.to(torch.int64)  # [8, K] permuted
    wd = dw.words.to(torch.int64) & 0xFFFFFFFF
    byte = torch.stack([(wd >> (8 * j)) & 255 for j in range(4)], -1)  # [q, w, s, lane, i, j]
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    weights = torch.tensor([2.0 ** (8 * p - 24) for p in range(8)], dtype=torch.float64)  # plane p's
    r_slot = torch.arange(16) // 8  # a block's rows 0-7 / 8-15: rows g / g + 8 (slots 0 / 1, +2 for the high block)
    gg = torch.arange(16) % 8
    y = torch.zeros(n, dtype=torch.float64)
    for q in range(n // ROWS):
        for w in range(warps):
            for grp in range(gw):
                c_raw = torch.zeros(16, 8, dtype=torch.int64)
                c_lo = torch.zeros(16, 8, dtype=torch.int64)
                d = torch.zeros(8, dtype=torch.int64)
                for so in range(4):
                    s = 4 * grp + so
                    a = torch.zeros(16, 32, dtype=torch.int64)  # A as the lanes' fragments define it
                    for i in range(4):
                        for jj in range(4):
                            a[g + 8 * (i % 2), 4 * t + jj + 16 * (i // 2)] = byte[q, w, s, :, i, jj]
                    b = torch.zeros(32, 8, dtype=torch.int64)  # B column g from plane g at the lane's bytes
                    base = w * (k // warps) + 32 * s  # the step's first input
                    for bb in range(2):
                        for jj in range(4):
                            kin = base + 4 * t + jj + 16 * bb
                            # lanes g = 6, 7 load nothing (columns 6 and 7 are zero whatever planes 6, 7 hold)
                            b[4 * t + jj + 16 * bb, g] = torch.where(g < PLANES, xb[g, pos[kin]], 0)
                    c_raw += a @ b
                    c_lo += (a & 15) @ b
                    d += b.sum(0)
                for half, c in ((0, c_lo), (1, (c_raw - c_lo) // 16)):
                    rows = ROWS * q + 16 * half + torch.arange(16)
                    nz = dw.nzero[q, w, grp, gg, 2 * half + r_slot].to(torch.int64)
                    sc = dw.scale[q, w, grp, gg, 2 * half + r_slot].double()
                    v = c + nz[:, None] * d[None, :]  # sum (c - z) d per plane, exact
                    y[rows] += sc * (v.double() * weights).sum(1)
    return y


@gluon.jit
def _halves(v):
    """[A, B, 2n] -> the first and the last n of the last dimension (a relabelling of each lane's registers)."""
    n: gl.constexpr = v.shape[2] // 2
    a, b = gl.split(gl.permute(gl.reshape(v, [v.shape[0], v.shape[1], 2, n]), [0, 1, 3, 2]))
    return a, b


@gluon.jit
def _chunk(v, i: gl.constexpr, LEVELS: gl.constexpr):
    """Chunk ``i`` of ``2^LEVELS`` along the last dimension."""
    cur = v
    for lvl in gl.static_range(LEVELS):
        a, b = _halves(cur)
        if (i >> (LEVELS - 1 - lvl)) & 1:
            cur = b
        else:
            cur = a
    return cur


_STEP = """
    and.b32 l0, ${w0}, 0x0F0F0F0F;
    and.b32 l1, ${w1}, 0x0F0F0F0F;
    and.b32 l2, ${w2}, 0x0F0F0F0F;
    and.b32 l3, ${w3}, 0x0F0F0F0F;
    mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {{$0, $1, $2, $3}}, {{l0, l1, l2, l3}}, {{${b0}, ${b1}}}, {cl};
    mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {{$4, $5, $6, $7}}, {{${w0}, ${w1}, ${w2}, ${w3}}},
        {{${b0}, ${b1}}}, {cr};
    mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {{$8, $9, e2, e3}}, {{one, one, one, one}}, {{${b0}, ${b1}}},
        {cd};"""


def _group_ptx() -> str:
    """A group's four k32 steps: outputs $0-$3 (C of the low nibbles), $4-$7 (C of the raw bytes), $8-$9 (the
    digit sums of the lane's two planes); inputs $10-$25 the words (step-major), $26-$33 the B registers."""
    body = ""
    for so in range(4):
        zero = "{zr, zr, zr, zr}"
        body += _STEP.format(w0=10 + 4 * so, w1=11 + 4 * so, w2=12 + 4 * so, w3=13 + 4 * so, b0=26 + 2 * so,
                             b1=27 + 2 * so, cl=zero if so == 0 else "{$0, $1, $2, $3}",
                             cr=zero if so == 0 else "{$4, $5, $6, $7}",
                             cd=zero if so == 0 else "{$8, $9, e2, e3}")
    return """
    {
    .reg .b32 l0, l1, l2, l3, e2, e3, one, zr;
    mov.b32 one, 0x01010101;
    mov.b32 zr, 0;""" + body + """
    }
"""


_GROUP_PTX = gl.constexpr(_group_ptx())
_GROUP_CONSTRAINTS = gl.constexpr("=r," * 10 + ",".join(["r"] * 24))


@emulates(_GROUP_PTX)
def _group_ptx_emulated(*regs):
    """``_GROUP_PTX`` under Triton's interpreter, instruction by instruction: the operands are [W, 32] (warp, lane),
    as ``_digits_kernel``'s layout ``L2`` places them."""
    regs, shape = lane_registers([as_numpy(r) for r in regs])
    w, x = regs[:16], regs[16:]
    ones = [w[0] * 0 + 0x01010101] * 4
    low = raw = sums = None
    for so in range(4):
        words, b = w[4 * so: 4 * so + 4], x[2 * so: 2 * so + 2]
        low = mma_m16n8k32_u8_s8([v & 0x0F0F0F0F for v in words], b, low)  # and.b32 l, w, 0x0F0F0F0F
        raw = mma_m16n8k32_u8_s8(words, b, raw)
        sums = mma_m16n8k32_u8_s8(ones, b, sums)
    return tuple(from_numpy(v, gl.int32, shape) for v in low + raw + sums[:2])


@gluon.jit
def _group_mma(w, x):
    """One lane's 16 words and 8 B registers of a group -> (C_P 4, C_raw 4, D 2), int32."""
    return gl.inline_asm_elementwise(
        asm=_GROUP_PTX, constraints=_GROUP_CONSTRAINTS,
        args=[w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9], w[10], w[11], w[12], w[13], w[14], w[15],
              x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]],
        dtype=(gl.int32,) * 10, is_pure=True, pack=1)


@gluon.jit
def _batch_after(w_ptr, off, b: gl.constexpr, SP: gl.constexpr, before, nil, LD: gl.constexpr):
    """Batch ``b`` of a program's words (steps b SP .. b SP + SP - 1), its addresses tied to the last word a lane
    holds of the batch ``before`` (times ``nil``, 0: the load goes out once that word is in). The term is a
    multiple of 4 words to the compilers, so the loads stay 16-byte."""
    v = gl.reshape(before, [before.shape[0], before.shape[1], before.shape[2] * 4])
    LEV: gl.constexpr = v.shape[2].bit_length() - 1
    last = gl.convert_layout(gl.reshape(_chunk(v, v.shape[2] - 1, LEV), [before.shape[0], before.shape[1]]), LD)
    return gl.load(w_ptr + off + b * SP * 128 + ((last * nil) << 2)[:, :, None, None])


@gluon.jit
def _paced_words(w_ptr, pid, nil, S: gl.constexpr, W: gl.constexpr, PACE: gl.constexpr):
    """The program's words [W, 32, 4 S] (as one load would give them) in ``PACE`` batches of steps, each batch's
    addresses depending on the last word of the batch before through ``nil`` (0, unknown to the compilers), so a
    batch is issued only once the one before has begun to arrive."""
    gl.static_assert((PACE == 1) | (PACE == 2) | (PACE == 4) | (PACE == 8), "PACE must be 1, 2, 4 or 8")
    gl.static_assert(S % PACE == 0, "PACE must divide the steps a warp")
    SP: gl.constexpr = S // PACE
    L4: gl.constexpr = gl.BlockedLayout([1, 1, SP, 4], [1, 32, 1, 1], [W, 1, 1, 1], [3, 2, 1, 0])
    LD: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, L4))
    w4 = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
    l4 = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
    s4 = gl.arange(0, SP, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L4))))
    i4 = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
    off = (((pid * W + w4) * (S * 128))[:, None, None, None] + (l4 * 4)[None, :, None, None]
           + (s4 * 128)[None, None, :, None] + i4[None, None, None, :])
    p0 = gl.load(w_ptr + off)
    if PACE == 1:
        words = gl.reshape(p0, [W, 32, 4 * S])
    else:
        # join's new dimension is the last: bit i of the batch index ends up in dimension 4 + i
        p1 = _batch_after(w_ptr, off, 1, SP, p0, nil, LD)
        if PACE == 2:
            words = gl.reshape(gl.permute(gl.join(p0, p1), [0, 1, 4, 2, 3]), [W, 32, 4 * S])
        else:
            p2 = _batch_after(w_ptr, off, 2, SP, p1, nil, LD)
            p3 = _batch_after(w_ptr, off, 3, SP, p2, nil, LD)
            if PACE == 4:
                words = gl.reshape(gl.permute(gl.join(gl.join(p0, p1), gl.join(p2, p3)), [0, 1, 5, 4, 2, 3]),
                                   [W, 32, 4 * S])
            else:
                p4 = _batch_after(w_ptr, off, 4, SP, p3, nil, LD)
                p5 = _batch_after(w_ptr, off, 5, SP, p4, nil, LD)
                p6 = _batch_after(w_ptr, off, 6, SP, p5, nil, LD)
                p7 = _batch_after(w_ptr, off, 7, SP, p6, nil, LD)
                j = gl.join(gl.join(gl.join(p0, p1), gl.join(p2, p3)), gl.join(gl.join(p4, p5), gl.join(p6, p7)))
                words = gl.reshape(gl.permute(j, [0, 1, 6, 5, 4, 2, 3]), [W, 32, 4 * S])
    return words


@gluon.jit
def _store_out(y, row, pid, y_ptr, b_ptr, r_ptr, HAS_BIAS: gl.constexpr, HAS_RES: gl.constexpr):
    """fp32 rows ``32 pid + row`` (+ bias) (+ residual) -> fp16 in ``y_ptr``; returns the fp16 values."""
    if HAS_BIAS:
        y = y + gl.load(b_ptr + pid * 32 + row).to(gl.float32)
    if HAS_RES:
        y = y + gl.load(r_ptr + pid * 32 + row).to(gl.float32)
    yh = y.to(gl.float16)
    gl.store(y_ptr + pid * 32 + row, yh)
    return yh


@gluon.jit(do_not_specialize=["nil"])
def _digits_kernel(w_ptr, s_ptr, z_ptr, p_in_ptr, p_out_ptr, y_ptr, b_ptr, r_ptr, part_ptr, lock_ptr, nil,
                   K: gl.constexpr, LEV_W: gl.constexpr, num_warps: gl.constexpr, PDL: gl.constexpr,
                   WAIT: gl.constexpr = True, PACE: gl.constexpr = 4, HAS_BIAS: gl.constexpr = False,
                   HAS_RES: gl.constexpr = False, DIGITS_OUT: gl.constexpr = True, SPLIT: gl.constexpr = 1):
    """One layer: 32 output rows a program, everything in registers (226 at K = 4096: two programs a
    multiprocessor, this layer's and the next's). ``nil`` is 0 (``_paced_words``); ``PACE`` 1, 2, 4 or 8 batches of
    word loads. ``WAIT=False`` is the benchmark's ablation (no wait for the layer before: wrong results by
    design). ``HAS_BIAS`` / ``HAS_RES``: adds ``b_ptr``'s / ``r_ptr``'s fp16 [N] (in fp32, in that order, as the
    pointer GEMV does) before the rounding; ``DIGITS_OUT=False``: the fp16 output only (a GEMV whose output feeds no
    other ``gemv_digits``, e.g. the runner's). ``SPLIT`` > 1 (fp16 output only): program (q, sp) takes slice sp of
    K's ``SPLIT`` equal slices, writes its fp32 partial to ``part_ptr`` [SPLIT, N] and counts its arrival in
    ``lock_ptr`` [N / 32]; the last of a column to arrive sums the partials in slice order (deterministic) and
    finishes the output."""
    gl.static_assert((SPLIT == 1) | (not DIGITS_OUT), "a split GEMV writes the fp16 output only")
    W: gl.constexpr = num_warps
    KS: gl.constexpr = K // SPLIT  # the program's inputs
    S: gl.constexpr = KS // (32 * W)  # k32 steps a warp
    GW: gl.constexpr = S // 4  # groups of 128 a warp: 2^LEV_W
    LG: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [1, 1, 32, 1], [1, W, 1, 1], [3, 2, 1, 0])  # [GW, W, 32, 4]
    LX5: gl.constexpr = gl.BlockedLayout([1, 1, 1, 1, 4], [1, 1, 1, 32, 1], [1, W, 1, 1, 1], [4, 3, 2, 1, 0])
    L2: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(0, LG))  # [W, 32]: one value a lane
    pid = gl.program_id(0)
    pid_k = gl.program_id(1)
    wpid = pid_k * gl.num_programs(0) + pid  # the program's block of words, scales and zero points

    # the program's words: constants, loaded before the wait and held in registers, in PACE batches
    words = _paced_words(w_ptr, wpid, nil, S, W, PACE)
    # scales and zero points [GW, W, 32, 4]: group gi, rows g, g + 8, g + 16, g + 24 of lane (g, t)
    gG = gl.arange(0, GW, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, LG))))
    wG = gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, LG))))
    lG = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, LG))))
    rG = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LG))))
    sz_off = ((((wpid * W + wG)[None, :, None, None] * GW + gG[:, None, None, None]) * 8
               + (lG // 4)[None, None, :, None]) * 4 + rG[None, None, None, :])
    # the B registers [GW, W, 2, 32, 4]: lane (g, t) reads plane g; group gi, half h = steps 2h and 2h + 1
    gX = gl.arange(0, GW, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, LX5)))))
    wX = gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, LX5)))))
    hX = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, gl.SliceLayout(4, LX5)))))
    lX = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(4, LX5)))))
    jX = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, LX5)))))
    x_off = (((lX // 4) * (K // 4))[None, None, None, :, None]
             + ((wX * (S // 2))[None, :, None, None, None] + (2 * gX)[:, None, None, None, None]
                + hX[None, None, :, None, None]) * 16
             + ((lX % 4) * 4)[None, None, None, :, None] + jX[None, None, None, None, :])
    # (a slice's inputs are a contiguous run of the planes: positions permute only within blocks of 64)
    x_ptrs = p_in_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + pid_k * (KS // 4) + x_off
    # [W, 32, GW * 4]: group gi's four values a lane are elements 4 gi .. 4 gi + 3
    scales = gl.reshape(gl.permute(gl.load(s_ptr + sz_off), [1, 2, 0, 3]), [W, 32, 4 * GW])
    nzero = gl.reshape(gl.permute(gl.load(z_ptr + sz_off), [1, 2, 0, 3]), [W, 32, 4 * GW])
    if PDL:  # the next layer's programs may start loading their own constants; x is the layer before's output
        _gdc_launch_dependents()
        if WAIT:
            _gdc_wait()
    # [W, 32, GW * 8]: group gi's B registers a lane are elements 8 gi + 4 h + j. Lanes g = 6, 7 feed B's unused
    # columns and load nothing: every program reads the digits whole, so they are most of the L2 traffic after
    # the wait (0.5 µs a step less than loading the zero planes, on the H100)
    xv = gl.load(x_ptrs, mask=(lX // 4 < _PLANES)[None, None, None, :, None], other=0)
    xw = gl.reshape(gl.permute(xv, [1, 3, 0, 2, 4]), [W, 32, 8 * GW])

    acc0 = gl.zeros([W, 32], gl.float32, L2)  # rows g, g + 8 (x1) and g + 16, g + 24 (x16), one plane pair
    acc1 = gl.zeros([W, 32], gl.float32, L2)
    acc2 = gl.zeros([W, 32], gl.float32, L2)
    acc3 = gl.zeros([W, 32], gl.float32, L2)
    for gi in gl.static_range(GW):
        wc = _chunk(words, gi, LEV_W)  # [W, 32, 16]
        wa, wb = _halves(wc)
        w_g = _split8(wa, L2) + _split8(wb, L2)
        x_g = _split8(_chunk(xw, gi, LEV_W), L2)
        s0, s1, s2, s3 = _split4(_chunk(scales, gi, LEV_W), L2)
        z0, z1, z2, z3 = _split4(_chunk(nzero, gi, LEV_W), L2)
        cl0, cl1, cl2, cl3, cr0, cr1, cr2, cr3, d0, d1 = _group_mma(w_g, x_g)
        dc = d0 + (d1 << 8)  # the lane's two planes folded: plane 2t + 256 x plane 2t + 1 (exact in int32)
        lo_g = cl0 + (cl1 << 8)
        lo_g8 = cl2 + (cl3 << 8)
        hi_g = (cr0 + (cr1 << 8)) - lo_g  # 16 x the high nibbles' sums
        hi_g8 = (cr2 + (cr3 << 8)) - lo_g8
        acc0 += (lo_g + z0.to(gl.int32) * dc).to(gl.float32) * s0.to(gl.float32)
        acc1 += (lo_g8 + z1.to(gl.int32) * dc).to(gl.float32) * s1.to(gl.float32)
        acc2 += (hi_g + z2.to(gl.int32) * (dc << 4)).to(gl.float32) * s2.to(gl.float32)
        acc3 += (hi_g8 + z3.to(gl.int32) * (dc << 4)).to(gl.float32) * s3.to(gl.float32)

    # plane weights 2^(16 t - 24), the high rows' 1/16; then the sums over t (lanes) and warps
    lS = gl.arange(0, 32, layout=gl.SliceLayout(0, L2))
    t_w = gl.exp2((16 * (lS % 4) - 24).to(gl.float32))[None, :]
    rows01 = gl.join(acc0 * t_w, acc1 * t_w)  # [W, 32, 2]: slot m -> row g + 8 m
    rows23 = gl.join(acc2 * (t_w * 0.0625), acc3 * (t_w * 0.0625))
    both = gl.join(rows01, rows23)  # [W, 32, 2, 2]: (m, n) -> row g + 8 m + 16 n
    per_g = gl.sum(gl.reshape(both, [W, 8, 4, 2, 2]), axis=2)  # over t
    y = gl.sum(per_g, axis=0)  # over warps: [8, 2, 2]
    LY: gl.constexpr = gl.BlockedLayout([1, 1, 1, 8], [8, 2, 2, 1], [1, 1, 1, W], [3, 2, 1, 0])
    Y3: gl.constexpr = gl.SliceLayout(3, LY)
    y = gl.convert_layout(y, Y3)
    g3 = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, Y3)))[:, None, None]
    m3 = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, Y3)))[None, :, None]
    n3 = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, Y3)))[None, None, :]
    row = g3 + 8 * m3 + 16 * n3
    if SPLIT > 1:
        n_out = gl.num_programs(0) * 32
        gl.store(part_ptr + pid_k * n_out + pid * 32 + row, y)
        gl.thread_barrier()  # every thread's partial is written before the (release) arrival below
        arrived = gl.atomic_add(lock_ptr + pid, 1)
        if arrived == SPLIT - 1:  # last to arrive: the partials in slice order
            total = gl.zeros([8, 2, 2], gl.float32, Y3)
            for sp in gl.static_range(SPLIT):  # unrolled: the loads go out together
                total += gl.load(part_ptr + sp * n_out + pid * 32 + row, cache_modifier=".cg")
            _store_out(total, row, pid, y_ptr, b_ptr, r_ptr, HAS_BIAS, HAS_RES)
            gl.atomic_xchg(lock_ptr + pid, 0)  # ready for the next launch (and CUDA-graph replays)
    else:
        yh = _store_out(y, row, pid, y_ptr, b_ptr, r_ptr, HAS_BIAS, HAS_RES)
    if DIGITS_OUT:
        # the output's digit planes for the next step (input k = 32 pid + row: step pid, b = n, t' = (g + 8 m) // 4)
        big = (yh.to(gl.float32) * 16777216.0).to(gl.int64) + _OFFSET_C
        p4 = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LY))))[None, None, None, :]
        digit = (((gl.expand_dims(big, 3) >> (8 * p4)) & 255) - 128).to(gl.int8)
        pos = (pid // 2) * 64 + ((g3 + 8 * m3) // 4) * 16 + (pid % 2) * 8 + n3 * 4 + g3 % 4
        gl.store(p_out_ptr + p4 * K + gl.expand_dims(pos, 3), digit, mask=p4 < _PLANES)


@dataclass
class DigitChain:
    """``L`` weights of one square shape for ``gemv_digits_chain``."""

    layers: list

    @property
    def features(self) -> int:
        return self.layers[0].in_features


def stack_digits(cw) -> DigitChain:
    """A ``gemv_chain.ChainWeights`` (int4, groups of 128) re-packed for this kernel, layer by layer."""
    from qcompile.runtime.triton.gemv_chain import ChainWeights

    if not isinstance(cw, ChainWeights) or cw.group_size != GROUP:
        raise ValueError(f"gemv_digits takes a ChainWeights with groups of {GROUP}")
    from qcompile.runtime.triton.reference import unpack_words

    return DigitChain([pack_digits(unpack_words(cw.qweight[layer], 4), cw.scale[layer],
                                   None if cw.zero is None else cw.zero[layer]) for layer in range(cw.layers)])


def gemv_digits_chain(planes: torch.Tensor, dc: DigitChain, out: torch.Tensor, pdl: bool = True,
                      wait: bool = True, pace: int = PACE) -> torch.Tensor:
    """Run the chain: ``planes`` int8 [L + 1, 8, K] (row 0 the input's ``digit_planes``, the rest written here; rows
    6 and 7 of each are neither read nor written), ``out`` fp16 [L + 1, K] (row l + 1 layer l's output). One launch a
    layer, each a programmatic dependent of the one before (``pdl``); each program issues its word loads in ``pace``
    batches (1, 2, 4 or 8; the result is the same bits); ``wait=False``: the benchmark's no-wait ablation (wrong
    results by design)."""
    if pace not in (1, 2, 4, 8):
        raise ValueError(f"gemv_digits_chain: pace must be 1, 2, 4 or 8 batches, got {pace}")
    if not dc.layers:
        raise ValueError("gemv_digits_chain: the chain has no layers")
    if any(dw.splits != 1 for dw in dc.layers):  # each step writes the next one's planes: one program a row block
        raise ValueError("gemv_digits_chain takes weights packed in one slice (splits=1)")
    k = dc.features
    n_layers = len(dc.layers)
    if any((k // (32 * dw.warps)) % pace for dw in dc.layers):
        raise ValueError(f"gemv_digits_chain: {pace} batches do not divide the k32 steps a warp ({k} inputs)")
    if (planes.shape != (n_layers + 1, 8, k) or planes.dtype != torch.int8 or not planes.is_contiguous()
            or not (planes.is_cuda or interpreting())):
        raise ValueError(f"gemv_digits_chain: planes must be a contiguous int8 CUDA tensor [{n_layers + 1}, 8, {k}] "
                         "(a CPU tensor under TRITON_INTERPRET=1)")
    if (out.shape != (n_layers + 1, k) or out.dtype != torch.float16 or out.device != planes.device
            or not out.is_contiguous()):
        raise ValueError(f"gemv_digits_chain: out must be a contiguous fp16 tensor [{n_layers + 1}, {k}] on "
                         f"{planes.device}")
    if any(dw.words.device != planes.device or dw.scale.device != planes.device or dw.nzero.device != planes.device
           or (dw.out_features, dw.in_features) != (k, k) for dw in dc.layers):
        raise ValueError(f"gemv_digits_chain: every layer must be {k} x {k} on {planes.device}")
    if planes.is_cuda and torch.cuda.get_device_capability(planes.device)[0] < 9:
        raise ValueError("gemv_digits_chain needs an sm_90 GPU or newer (programmatic dependent launches)")
    for layer, dw in enumerate(dc.layers):
        _digits_kernel[(dw.out_features // ROWS,)](
            dw.words, dw.scale, dw.nzero, planes[layer], planes[layer + 1], out[layer + 1], out[layer + 1],
            out[layer + 1], out[layer + 1], out[layer + 1], 0, K=k,
            LEV_W=(k // (GROUP * dw.warps)).bit_length() - 1, num_warps=dw.warps, PDL=pdl, WAIT=wait, PACE=pace,
            **({"launch_pdl": True} if pdl else {}))
    return out


def digit_weight(pw, splits: int | None = None) -> DigitWeight:
    """A ``packing.PackedWeight`` (int4, groups of 128; N a multiple of 32; K 512, 1024, 2048 or 4096, or with
    ``splits`` (default: ``default_layout``'s) equal slices of those, at the warps ``pack_digits`` picks) re-packed
    for ``gemv_digits``; ValueError naming what does not fit."""
    from qcompile.runtime.triton.reference import unpack_words

    if pw.bits != 4 or pw.group_size != GROUP:
        raise ValueError(f"gemv_digits takes int4 weights in groups of {GROUP}, got {pw.bits}-bit codes in groups "
                         f"of {pw.group_size}")
    if pw.scale.dtype != torch.float16:
        raise ValueError(f"gemv_digits computes in float16, got {pw.scale.dtype} scales")
    return pack_digits(unpack_words(pw.qweight, 4), pw.scale, pw.zero, splits=splits)


def gemv_digits(planes: torch.Tensor, dw: DigitWeight, *, bias: torch.Tensor | None = None,
                residual: torch.Tensor | None = None, pdl: bool = False, pace: int = PACE) -> torch.Tensor:
    """One GEMV on digit planes: ``planes`` int8 [8, K] (``digit_planes``, or a producer's ``_jit.store_digit_planes``)
    -> fp16 [1, N] = ``fp16(sum_g s_g sum_k (c - z) x (+ bias) (+ residual))`` (``residual`` fp16 [1, N]); ``pdl``:
    launched as a programmatic dependent (its words loaded before it waits for the planes' producer)."""
    n, k, ks = dw.out_features, dw.in_features, dw.slice_features
    if pace not in (1, 2, 4, 8) or (ks // (32 * dw.warps)) % pace:
        raise ValueError(f"gemv_digits: pace must be 1, 2, 4 or 8 batches dividing the k32 steps a warp, got {pace}")
    check_planes(planes, k, dw.words.device, "gemv_digits")
    for name, t in (("bias", bias), ("residual", residual)):
        if t is not None and (t.numel() != n or t.dtype != torch.float16 or t.device != planes.device
                              or not t.is_contiguous()):
            raise ValueError(f"gemv_digits: {name} must be a contiguous fp16 tensor of {n} on {planes.device}")
    out = torch.empty(1, n, dtype=torch.float16, device=planes.device)
    part = lock = out
    if dw.splits > 1:  # the pointer GEMV's split-K workspace (sized before any capture: the first call is eager)
        from qcompile.runtime.triton.wq_matmul import _Workspace

        part, lock = _Workspace.get(planes.device, dw.splits * n, n // ROWS)
    _digits_kernel[(n // ROWS, dw.splits)](
        dw.words, dw.scale, dw.nzero, planes, planes, out, bias if bias is not None else out,
        residual if residual is not None else out, part, lock, 0, K=k,
        LEV_W=(ks // (GROUP * dw.warps)).bit_length() - 1, num_warps=dw.warps, PDL=pdl, PACE=pace,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, DIGITS_OUT=False, SPLIT=dw.splits,
        **({"launch_pdl": True} if pdl else {}))
    return out
