"""W8A8 and W4A4 GEMM: per-token dynamic activation quantization, int8 tensor-core dot, scales in the epilogue.

* ``quantize_rows``: one program per token row; ``scale = clip * max|x| / qmax``, ``q = round(x / scale)`` (ties
  to even), clamped to ``[-2^(b-1), 2^(b-1)-1]``: the graph's fake quantization, bit for bit. It can
  RMS-normalize the row first (``norm=True``), i.e. the quantization is fused into the producer that already
  holds the row (the layer norm before q/k/v and gate/up); the Hadamard kernel has the same fused epilogue for the
  rotated down_proj input.
* ``int_linear``: ``out = xs[m] * sum_k xq[m, k] * s_w * (v - z)`` on ``PackedIntWeight``. The weight tile is read
  K-contiguous ([N, K]) and transposed in the dot, the operand order Hopper's 8-bit MMA (wgmma) requires. Per-channel
  weights accumulate in int32 over all of K; grouped weights (group a multiple of the K-tile) scale each tile's
  int32 result in fp32. Asymmetric weights subtract ``z * sum_k xq`` per group.
* ``int_linear`` on int8 per-channel weights at M >= 128 (the W8A8 prefill GEMM) takes a persistent kernel whose
  operands come through TMA tensor descriptors (one program per SM walking the output tiles in grouped order,
  128 x 256 x 128 tiles, 4 stages): 1.38-1.72x fp16 ``torch.matmul`` on the H200 at Llama-3-8B shapes against
  1.34-1.60x for the pointer-based kernel below (bench/triton_sweep.py); warp specialization and a TMA store of
  the output measured no better. On sm_90 the tuner also offers ``_int8_wgmma_kernel`` (Gluon: one wgmma in
  flight, the output through shared memory and a TMA store): 1.66-2.09x on the H100 at every Llama-3-8B shape,
  M = 1024-4096 (bench/results/device_2026-12-05_s8/call1_h100/kernels_gemm.json).
* W4A4: H100 has no int4 tensor cores (Hopper dropped the int4 MMA that Ampere had). 4-bit activations are held
  as int8 values in [-8, 7] and 4-bit weights are unpacked in registers from nibbles to int8, and the product runs
  on the int8 tensor cores: 4-bit halves the weight bytes and keeps 4-bit accuracy semantics, not the FLOPs.
"""

from __future__ import annotations

import torch

from qcompile.runtime.triton._env import interpreting, require_triton
from qcompile.runtime.triton._tune import Tuner, launch_opts, num_sms
from qcompile.runtime.triton.packing import PackedIntWeight

triton = require_triton()
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from qcompile.runtime.triton._jit import MIN_SCALE, grouped_tile, round_half_even, row_ptr, tile_rows  # noqa: E402
from qcompile.runtime.triton._gluon import gl, gluon, hopper  # noqa: E402

fence_async_shared, mbarrier, tma = hopper.fence_async_shared, hopper.mbarrier, hopper.tma
warpgroup_mma, warpgroup_mma_wait = hopper.warpgroup_mma, hopper.warpgroup_mma_wait
GluonTensorDescriptor = hopper.TensorDescriptor


@triton.jit
def _quant_rows_kernel(x_ptr, w_ptr, q_ptr, s_ptr, K, stride_x, stride_q, eps, clip,
                       QMAX: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(row_ptr(x_ptr, row, stride_x) + offs, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        x = tl.div_rn(x, tl.sqrt_rn(tl.sum(x * x, axis=0) / K + eps))
        if HAS_W:
            x = x * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # IEEE-rounded division (tl.div_rn) and ties-to-even: codes bit-identical to torch's round(x / scale)
    scale = tl.maximum(tl.div_rn(tl.max(tl.abs(x), axis=0) * clip, QMAX), MIN_SCALE)
    q = tl.minimum(tl.maximum(round_half_even(tl.div_rn(x, scale)), -QMAX - 1), QMAX)
    tl.store(row_ptr(q_ptr, row, stride_q) + offs, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _int_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, bz_ptr, bias_ptr, out_ptr,
                     M, N, K, stride_am, stride_bn, stride_om,
                     W4: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    HALF: tl.constexpr = BLOCK_K // 2
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    a_rows = tile_rows(a_ptr, pid_m * BLOCK_M, offs_m, stride_am)
    for k0 in range(0, K, BLOCK_K):
        if W4:
            offs_h = tl.arange(0, HALF)
            a_lo = tl.load(a_rows + (k0 + offs_h)[None, :], mask=m_mask[:, None], other=0)
            a_hi = tl.load(a_rows + (k0 + HALF + offs_h)[None, :], mask=m_mask[:, None], other=0)
            byte = tl.load(b_ptr + offs_n[:, None] * stride_bn + (k0 // 2 + offs_h)[None, :], mask=n_mask[:, None],
                           other=0x88).to(tl.int32)
            w_lo = ((byte & 15) - 8).to(tl.int8)
            w_hi = ((byte >> 4) - 8).to(tl.int8)
            part = tl.dot(a_lo, tl.trans(w_lo), out_dtype=tl.int32) + tl.dot(a_hi, tl.trans(w_hi), out_dtype=tl.int32)
            if HAS_ZERO:
                tile_sum = tl.sum(a_lo.to(tl.int32), axis=1) + tl.sum(a_hi.to(tl.int32), axis=1)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            a = tl.load(a_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0)
            part = tl.dot(a, tl.trans(b), out_dtype=tl.int32)
            if HAS_ZERO:
                tile_sum = tl.sum(a.to(tl.int32), axis=1)
        if PER_CHANNEL:
            acc_i += part
            if HAS_ZERO:
                rowsum += tile_sum
        else:  # one weight group per K-tile: scale this tile's exact int32 result
            sn = (k0 // GROUP) * N + offs_n
            ws = tl.load(bs_ptr + sn, mask=n_mask, other=0.0)
            if HAS_ZERO:
                wz = tl.load(bz_ptr + sn, mask=n_mask, other=0)
                part = part - tile_sum[:, None] * wz[None, :]
            acc_f += part.to(tl.float32) * ws[None, :]
    a_scale = tl.load(as_ptr + offs_m, mask=m_mask, other=0.0)
    if PER_CHANNEL:
        ws = tl.load(bs_ptr + offs_n, mask=n_mask, other=0.0)
        if HAS_ZERO:
            acc_i -= rowsum[:, None] * tl.load(bz_ptr + offs_n, mask=n_mask, other=0)[None, :]
        y = acc_i.to(tl.float32) * ws[None, :] * a_scale[:, None]
    else:
        y = acc_f * a_scale[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    tl.store(tile_rows(out_ptr, pid_m * BLOCK_M, offs_m, stride_om) + offs_n[None, :],
             y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _int8_tma_kernel(a_desc, b_desc, as_ptr, bs_ptr, bias_ptr, out_ptr, M, N, K, stride_om,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    """``xs[m] * s_w[n] * sum_k a[m, k] b[n, k]`` (+ bias) for int8 a [M, K] and per-channel symmetric int8 b
    [N, K] read through TMA descriptors; persistent: program p computes output tiles p, p + NUM_PROGRAMS, ..."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(k_tiles):  # the descriptors zero-fill past M, N and K
            a = a_desc.load([om, ki * BLOCK_K])
            b = b_desc.load([on, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        offs_m = om + tl.arange(0, BLOCK_M)
        offs_n = on + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        y = (acc.to(tl.float32) * tl.load(bs_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
             * tl.load(as_ptr + offs_m, mask=m_mask, other=0.0)[:, None])
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        tl.store(tile_rows(out_ptr, om, offs_m, stride_om) + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


@gluon.jit
def _int8_wgmma_kernel(a_desc, b_desc, as_ptr, bs_ptr, bias_ptr, out_ptr, c_desc, M, N, K, stride_om,
                       HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, INSTR_N: gl.constexpr,
                       num_warps: gl.constexpr, EPILOGUE: gl.constexpr = 0):
    """``_int8_tma_kernel``'s product (same int32 sums, same epilogue arithmetic, so the same output bit for bit),
    written in Gluon so that one wgmma stays in flight while the next K-tile's is issued.

    Triton's pipeliner waits for every wgmma whose accumulator is not fp32 before the next is issued
    (``dotCanBeProperlyAsync``, "Rule 2.1", in Triton 3.6), so the int8 kernel above runs its tensor-core ops one
    at a time. Here the loop is written out by hand: STAGES TMA loads in flight on mbarriers, each wgmma issued
    asynchronously and waited for one iteration later (``warpgroup_mma_wait(1)``), when its stage is refilled.
    One output tile per program, tiles in grouped order: a persistent version (a program's loads running one flat
    sequence of K-iterations over its tiles, the epilogue after each tile's K loop) measured 10-19 % slower on
    the H100 at every shape (bench/results/device_2026-12-05_s7/call{3,4}_h100). Hopper only (wgmma): the tests run it
    against the Triton kernel on the GPU and under Triton's interpreter (``_gluon``), and ``aot_check`` compiles it
    for sm_90 anywhere.

    ``EPILOGUE`` moves the same output values three ways (Gluon does not re-layout a store by itself, as Triton's
    coalescing pass does): 0 stores straight from the wgmma accumulator layout (each thread two adjacent columns of
    a row), 1 re-lays the tile out first so each thread stores 16 contiguous bytes, 2 writes it to shared memory
    and stores it with one TMA copy (``c_desc``; the operand stages are dead by then, so it can reuse their space).
    On the H100 the TMA store took 15-18 % off the direct store at K = 4096 and 5-7 % at K = 14336 (the 128 x 256
    tile with 4 stages; bench/results/device_2026-12-05_s8/call1_h100/gemm_focus.json): the store, not the K loop,
    was what kept this kernel level with the Triton one at K = 4096."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    pid = gl.program_id(0)
    num_pid_m = gl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * gl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    group_m = gl.minimum(num_pid_m - first_m, GROUP_M)
    off_m = (first_m + (pid % per_group) % group_m) * BLOCK_M
    off_n = ((pid % per_group) // group_m) * BLOCK_N

    # warps stacked along M (16 rows each); int8 wgmma takes an N of at most 224 per instruction
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                          instr_shape=[16, INSTR_N, 32])
    a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    k_tiles = gl.cdiv(K, BLOCK_K)
    nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
    for i in gl.static_range(STAGES - 1):  # the first STAGES - 1 K-tiles in flight (the descriptors zero-fill)
        ok = i < k_tiles
        mbarrier.expect(bars.index(i), nbytes, pred=ok)
        tma.async_copy_global_to_shared(a_desc, [off_m, i * BLOCK_K], bars.index(i), a_bufs.index(i), pred=ok)
        tma.async_copy_global_to_shared(b_desc, [off_n, i * BLOCK_K], bars.index(i), b_bufs.index(i), pred=ok)
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=mma_layout)
    for ki in range(k_tiles):
        s = ki % STAGES
        mbarrier.wait(bars.index(s), (ki // STAGES) & 1)
        a_s = a_bufs.index(s)
        b_s = b_bufs.index(s)
        acc = warpgroup_mma(a_s, b_s.permute((1, 0)), acc, is_async=True)
        # one wgmma left in flight: K-tile ki - 1's is done, so its stage takes K-tile ki + STAGES - 1
        acc, a_s, b_s = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_s, b_s))
        nk = ki + STAGES - 1
        ns = nk % STAGES
        ok = nk < k_tiles
        mbarrier.expect(bars.index(ns), nbytes, pred=ok)
        tma.async_copy_global_to_shared(a_desc, [off_m, nk * BLOCK_K], bars.index(ns), a_bufs.index(ns), pred=ok)
        tma.async_copy_global_to_shared(b_desc, [off_n, nk * BLOCK_K], bars.index(ns), b_bufs.index(ns), pred=ok)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
    offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
    m_mask = offs_m < M
    n_mask = offs_n < N
    y = (acc.to(gl.float32) * gl.load(bs_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
         * gl.load(as_ptr + offs_m, mask=m_mask, other=0.0)[:, None])
    if HAS_BIAS:
        y += gl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if EPILOGUE == 2:  # TMA store: it clips the tile at M and N itself
        c_smem = gl.allocate_shared_memory(c_desc.dtype, [BLOCK_M, BLOCK_N], c_desc.layout)
        c_smem.store(y.to(c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [off_m, off_n], c_smem)
        tma.store_wait(pendings=0)
    else:  # M x N may pass 2^31: the tile's first row offset in int64, its rows in int32 (as _jit.tile_rows)
        out_tile = out_ptr + off_m.to(gl.int64) * stride_om
        if EPILOGUE == 1:  # 16 bytes a thread, a warp along one row (two rows: 128 16-bit columns)
            VEC: gl.constexpr = 128 // out_ptr.dtype.element_ty.primitive_bitwidth
            TPW_N: gl.constexpr = BLOCK_N // VEC if BLOCK_N // VEC < 32 else 32
            row_layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TPW_N, TPW_N], [num_warps, 1], [1, 0])
            yc = gl.convert_layout(y.to(out_ptr.dtype.element_ty), row_layout)
            rm = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, row_layout))
            rn = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, row_layout))
            gl.store(out_tile + rm[:, None] * stride_om + rn[None, :], yc,
                     mask=(off_m + rm < M)[:, None] & (rn < N)[None, :])
        else:
            gl.store(out_tile + (offs_m - off_m)[:, None] * stride_om + offs_n[None, :],
                     y.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_QUANT = Tuner("quantize_rows")
_TMA = Tuner("int8_tma_gemm")
TMA_MIN_M = 128  # below one 128-row tile the pointer-based kernel's smaller tiles fit better
_GEMM = Tuner("int_gemm")


def quantize_rows(x: torch.Tensor, bits: int = 8, *, norm: bool = False, norm_weight: torch.Tensor | None = None,
                  eps: float = 1e-6, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization of x [M, K] (optionally RMS-normalized first) -> (int8 [M, K], fp32 [M]);
    the arithmetic of ``qcompile.quant.activations.fake_quantize_tokens`` (symmetric, per token)."""
    if bits not in (4, 8):
        raise ValueError(f"activation bits must be 4 or 8, got {bits}")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x2.shape
    block = triton.next_power_of_2(k)
    if block > 32768:
        raise ValueError(f"rows of {k} features exceed the one-tile quantizer (32768)")
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    _, opts = launch_opts({"num_warps": warps, "num_stages": 1})
    _quant_rows_kernel[(m,)](x2, norm_weight if norm_weight is not None else x2, q, s, k, x2.stride(0), q.stride(0),
                             float(eps), float(clip_ratio), QMAX=2 ** (bits - 1) - 1, NORM=norm,
                             HAS_W=norm_weight is not None, BLOCK=block, **opts)
    return q, s


def int_gemm_candidates(m: int, n: int, k: int, pw: PackedIntWeight) -> list[dict]:
    if pw.bits == 4:
        bks = [2 * pw.half]
    else:
        bks = [bk for bk in (128, 64, 32) if pw.group_size >= k or pw.group_size % bk == 0]
    if interpreting():
        return [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=bks[-1] if pw.bits == 8 else bks[0], GROUP_M=4)]
    tiles = [(128, 256, 8, 3), (128, 128, 8, 4), (256, 128, 8, 3), (64, 128, 4, 4), (64, 256, 8, 3), (32, 128, 4, 4)]
    out = []
    for bk in bks:
        for bm, bn, warps, stages in tiles:
            if bm > max(32, triton.next_power_of_2(m)):
                continue
            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages))
    return out


def tma_candidates(m: int, out_dtype: torch.dtype = torch.float16, wgmma: bool = False,
                   tma_store: bool = False) -> list[dict]:
    """Tiles x pipeline depth; shared memory holds the stages plus the output tile on its way to the store, so
    fp32 outputs (4 bytes per element) take the tiles whose total stays under Hopper's 227 KiB. With ``wgmma``
    (an sm_90 GPU) the Gluon kernel's tiles too (``WGMMA``), each with its epilogues (``EPILOGUE``: the re-laid-out
    store, 1, spills registers at 256 columns; the TMA store, 2, needs ``tma_store``: 16-byte aligned output rows)."""
    if interpreting():
        return [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)]
    if out_dtype == torch.float32:
        tiles = [(128, 128, 128, 8, 4), (128, 256, 64, 8, 4), (128, 128, 128, 8, 3)]
    else:
        tiles = [(128, 256, 128, 8, 4), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4)]
    out = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=st)
           for bm, bn, bk, w, st in tiles if bm <= max(128, triton.next_power_of_2(m))]
    if wgmma:
        out += [dict(WGMMA=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, STAGES=st, INSTR_N=128,
                     num_warps=w, EPILOGUE=epi)
                for bm, bn, w, st in WGMMA_TILES if bm <= max(128, triton.next_power_of_2(m))
                for epi in (0, 1, 2) if (epi != 2 or tma_store) and (epi != 1 or bn < 256)]  # 1 spills at 256
    return out


# (BLOCK_M, BLOCK_N, warps, stages) of the Gluon wgmma kernel: 4 stages of 128 x 256 tiles take 192 KiB; 3 stages
# of 128 x 128 with 4 warps (96 KiB, 208 registers) fit two programs on a multiprocessor, so one's pipeline fill
# and store overlap the other's K loop. On the H100 at the Llama-3-8B shapes, M = 1024 / 2048, these two were the
# best tiles (the first at four of the six cases, the second at two); every other Gluon tile tried (128 x 256 with
# 3 stages, 128 x 128 with 8 warps or 4 / 2 stages, 64 x 256) came 3-61 % behind the best at every case
# (bench/results/device_2026-12-05_s8/call1_h100/gemm_focus.json, each tile with its best epilogue)
WGMMA_TILES = [(128, 256, 8, 4), (128, 128, 4, 3)]


def wgmma_capable(device) -> bool:
    """The Gluon wgmma kernel runs on sm_90 (Hopper) GPUs only: wgmma is not in other architectures (the
    interpreter runs it when a config names it, but timing it there means nothing, so the tuner never offers it)."""
    dev = torch.device(device)
    return not interpreting() and dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] == 9


def _tma_capable(pw: PackedIntWeight, xq: torch.Tensor) -> bool:
    """Int8 per-channel symmetric weights and what TMA needs: a Hopper-or-newer GPU (or the interpreter),
    16-byte aligned rows and bases."""
    if pw.bits != 8 or pw.group_size < pw.in_features or pw.zero is not None:
        return False
    if pw.in_features % 16 or xq.stride(0) % 16 or xq.data_ptr() % 16 or pw.qweight.data_ptr() % 16:
        return False
    if interpreting():
        return True
    return xq.is_cuda and torch.cuda.get_device_capability(xq.device)[0] >= 9


# the TMA store's shared layout depends on the element type (its swizzle and box width): one entry per output dtype
_GL_OUT = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16, torch.float32: gl.float32}


def _tma_storable(out: torch.Tensor) -> bool:
    return (out.dtype in _GL_OUT and out.stride(1) == 1 and (out.stride(0) * out.element_size()) % 16 == 0
            and out.data_ptr() % 16 == 0)


def takes_tma_path(m: int, pw: PackedIntWeight, xq: torch.Tensor) -> bool:
    """Whether ``int_linear`` runs the TMA kernel by default: at least one 128-row tile of activations on
    weights and a device it can take (``_tma_capable``)."""
    return m >= TMA_MIN_M and _tma_capable(pw, xq)


def _int8_tma(xq, xs, pw: PackedIntWeight, out, config):
    m, k = xq.shape
    n = pw.out_features
    sms = num_sms(xq.device)
    bias = pw.bias if pw.bias is not None else pw.scale

    def launch(cfg):
        if cfg.get("WGMMA"):
            bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
            a_desc = GluonTensorDescriptor.from_tensor(xq, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk],
                                                                                                        gl.int8))
            b_desc = GluonTensorDescriptor.from_tensor(pw.qweight, [bn, bk],
                                                       gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8))
            epilogue = cfg.get("EPILOGUE", 0)
            if epilogue == 2 and not _tma_storable(out):
                raise ValueError("the TMA-store epilogue needs 16-byte aligned output rows and base, and an fp16, "
                                 "bf16 or fp32 output")
            c_desc = (GluonTensorDescriptor.from_tensor(out, [bm, bn], gl.NVMMASharedLayout.get_default_for(
                [bm, bn], _GL_OUT[out.dtype])) if epilogue == 2 else a_desc)
            _int8_wgmma_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
                a_desc, b_desc, xs, pw.scale, bias, out, c_desc, m, n, k, out.stride(0),
                HAS_BIAS=pw.bias is not None, GROUP_M=cfg["GROUP_M"], STAGES=cfg["STAGES"], INSTR_N=cfg["INSTR_N"],
                num_warps=cfg["num_warps"], EPILOGUE=epilogue)
            return
        meta, opts = launch_opts(cfg)
        a_desc = TensorDescriptor.from_tensor(xq, [meta["BLOCK_M"], meta["BLOCK_K"]])
        b_desc = TensorDescriptor.from_tensor(pw.qweight, [meta["BLOCK_N"], meta["BLOCK_K"]])
        programs = min(sms, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]))
        _int8_tma_kernel[(programs,)](
            a_desc, b_desc, xs, pw.scale, bias, out, m, n, k, out.stride(0),
            HAS_BIAS=pw.bias is not None, NUM_PROGRAMS=programs, **meta, **opts)

    _TMA.run((triton.next_power_of_2(m), n, k, pw.bias is not None, out.dtype),
             tma_candidates(m, out.dtype, wgmma_capable(xq.device), _tma_storable(out)), launch, config)
    return out


def int_linear(xq: torch.Tensor, xs: torch.Tensor, pw: PackedIntWeight, out_dtype: torch.dtype = torch.float16,
               config: dict | None = None, tma: bool | None = None) -> torch.Tensor:
    """``xs[m] * (xq @ W)`` (+ bias) for int8 activations xq [M, K] with per-row scales xs [M] -> [M, N].
    ``tma``: force (True) or forbid (False) the TMA kernel; default: wherever ``takes_tma_path``."""
    m, k = xq.shape
    n = pw.out_features
    if k != pw.in_features:
        raise ValueError(f"activations have {k} features, the weight expects {pw.in_features}")
    if pw.bits == 8 and pw.group_size < k and pw.group_size % 32:
        raise ValueError(f"the int8 GEMM needs per-channel weights or groups that are multiples of 32, got "
                         f"{pw.group_size}")
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if tma and not _tma_capable(pw, xq):
        raise ValueError("the TMA GEMM needs int8 per-channel symmetric weights, 16-byte aligned rows and a "
                         "Hopper-or-newer GPU")
    if tma or (tma is None and takes_tma_path(m, pw, xq)):
        return _int8_tma(xq, xs, pw, out, config)
    key = (triton.next_power_of_2(m), n, k, pw.bits, pw.group_size, pw.zero is not None)

    def launch(cfg):
        meta, opts = launch_opts(cfg)
        grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _int_gemm_kernel[grid](
            xq, xs, pw.qweight, pw.scale, pw.zero if pw.zero is not None else pw.scale,
            pw.bias if pw.bias is not None else pw.scale, out, m, n, k, xq.stride(0), pw.qweight.stride(0),
            out.stride(0), W4=pw.bits == 4, GROUP=pw.group_size, PER_CHANNEL=pw.group_size >= k,
            HAS_ZERO=pw.zero is not None, HAS_BIAS=pw.bias is not None, **meta, **opts)

    _GEMM.run(key, int_gemm_candidates(m, n, k, pw), launch, config)
    return out


def w8a8_linear(x: torch.Tensor, pw: PackedIntWeight, act_bits: int | None = None) -> torch.Tensor:
    """Quantize x per token (8-bit for 8-bit weights, 4-bit for 4-bit weights unless ``act_bits``) and multiply."""
    bits = act_bits or pw.bits
    xq, xs = quantize_rows(x, bits)
    return int_linear(xq, xs, pw, out_dtype=x.dtype).reshape(*x.shape[:-1], pw.out_features)
