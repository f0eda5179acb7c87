"""The persistent int4 GEMV chain with each layer's weights staged in shared memory, ``STAGES`` layers ahead (Gluon).

Why: ``gemv_chain``'s register-resident kernel keeps one slice in flight per program: the next layer's loads are
issued when this layer's arrive, so every step exposes the memory's latency once on top of its stream (the H100
measured 4.6-4.9 µs a step at 4096 x 4096 even with no synchronisation at all, 2026-12-07). Here each program's
slice of layer ``l + STAGES`` (64 KiB of words at K = 4096, BLOCK_N = 32, plus its scales and zero points) is asked
of the TMA engine as soon as layer ``l``'s slice has been read out of shared memory, so ``STAGES`` slices are in
flight at all times and the weight stream does not drain between steps.

Synchronisation is through tagged activations, as NCCL's low-latency protocol does it: each step writes its
outputs as 8-byte words (an fp16 pair in the low half, the launch's 32-bit epoch in the high half, stored as relaxed
GPU-scope atomics) and the next step reads the whole vector until every word carries this launch's epoch (no
counter, no fence). The epoch lives on the device (``_tag_state``): program 0 advances it at the end of a launch of
two or more layers, when every program has read it, skipping 0 when the 32 bits wrap; the no-wait ablation, which
cannot advance it safely, stamps its words with 0, which no waiting launch takes (epochs start at 1, the buffer
zero-filled), so CUDA graphs replay; a word left from 2^32 - 1 launches earlier could pass for a fresh one. The
words are re-packed for this kernel (``stage_chain``) so that the half2 decode's code pair j / j + 4 of a word
multiplies the adjacent activations (x_{2j}, x_{2j+1}): the pairs a program writes are then adjacent outputs of its
own.

Measured on the H100 (2026-12-07, docs/BENCHMARKS.md, twenty-third session): 6.5-7.0 µs a step at 4096 x 4096
(42-45 % of the copy peak) with 2 or 3 stages, slower than the runtime's PDL chain (5.9-6.1 µs); 5.3-5.9 µs without
waits (the ablation); ``per_layer`` 5.5-6.0 µs (49-53 %), 1.02-1.06x the runtime's PDL chain.

Layout (8 warps, BLOCK_N = 32, K / GROUP = 32 groups: a thread holds one group's 8 row pairs x 4 columns, so the
scale is applied after a reduction inside the thread). GPU only: its programs spin on each other's tagged words,
which an interpreter running one program at a time cannot execute (``_gluon`` runs the other Gluon kernels on the
CPU); checked on CUDA by ``tests/runtime/triton/test_gemv_chain.py`` and timed by ``bench/triton_gemv_chain.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.runtime.triton._env import require_triton
from qcompile.runtime.triton._tune import num_sms
from qcompile.runtime.triton._gluon import _gdc_launch_dependents, _gdc_wait
from qcompile.runtime.triton.gemv_chain import ChainWeights
from qcompile.runtime.triton.wq_matmul import _DOT16_PTX, _TIMES_1_32_PTX

triton = require_triton()
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma  # noqa: E402
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402

_DOT16: gl.constexpr = gl.constexpr(_DOT16_PTX.value)
_TIMES_1_32: gl.constexpr = gl.constexpr(_TIMES_1_32_PTX.value)


@gluon.jit
def _dot16(we, wo, x0, x1, x2, x3, y0, y1, y2, y3, zz, mz):
    """``wq_matmul._dot16_half2`` (the same PTX): ``sum_j x_j (c_j - z)`` over a row pair's 16 codes, fp32."""
    sixteenth = gl.full(we.shape, 0x2C002C00, gl.int32, we.type.layout)  # (1/16, 1/16)
    return gl.inline_asm_elementwise(
        asm=_DOT16, constraints="=r,r,r,r,r,r,r,r,r,r,r,r,r,r",
        args=[we, wo, x0, x1, x2, x3, y0, y1, y2, y3, zz, mz, sixteenth],
        dtype=gl.int32, is_pure=True, pack=1).to(gl.float32, bitcast=True)


@gluon.jit
def _times_1_32(pairs):
    """half2 words times 1/32 (exact), as ``_dot16`` expects its activations."""
    return gl.inline_asm_elementwise(
        asm=_TIMES_1_32, constraints="=r,r",
        args=[pairs], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _issue(w_desc, s_desc, z_desc, bar, w_buf, s_buf, z_buf, layer, n0, ok,
           ROWS: gl.constexpr, BOX: gl.constexpr, G: gl.constexpr):
    nbytes: gl.constexpr = (ROWS // BOX) * w_desc.block_type.nbytes + s_desc.block_type.nbytes \
        + z_desc.block_type.nbytes
    mbarrier.expect(bar, nbytes, pred=ok)
    for b in gl.static_range(ROWS // BOX):
        tma.async_copy_global_to_shared(w_desc, [layer * ROWS + b * BOX, n0], bar, w_buf.slice(b * BOX, BOX), pred=ok)
    tma.async_copy_global_to_shared(s_desc, [layer * G, n0], bar, s_buf, pred=ok)
    tma.async_copy_global_to_shared(z_desc, [layer * G, n0], bar, z_buf, pred=ok)


@gluon.jit
def _staged_chain_kernel(w_desc, s_desc, z_desc, x_ptr, t_ptr, epoch_ptr, first, last,
                         K: gl.constexpr, GROUP: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                         SYNC: gl.constexpr, num_warps: gl.constexpr, PDL: gl.constexpr = False):
    ROWS: gl.constexpr = K // 8
    BOX: gl.constexpr = w_desc.block_type.shape[0]
    G: gl.constexpr = K // GROUP
    PPG: gl.constexpr = GROUP // 16  # row pairs a group
    HALF: gl.constexpr = K // 2  # half2 words of x
    # a thread: one group's PPG row pairs x 4 columns; lanes 4 groups x 8 column quads; warps along groups
    L3: gl.constexpr = gl.BlockedLayout([1, PPG, 4], [4, 1, 8], [num_warps, 1, 1], [2, 1, 0])
    XL: gl.constexpr = gl.SliceLayout(2, L3)  # [G, PPG]: a row pair's activations, broadcast along columns
    GL: gl.constexpr = gl.SliceLayout(1, L3)  # [G, BLOCK_N]: scales, zero points, group sums
    X1: gl.constexpr = gl.BlockedLayout([8], [32], [num_warps], [0])  # x as K / 2 half2 words, 8 a thread
    YL: gl.constexpr = gl.BlockedLayout([2], [32], [num_warps], [0])  # the program's outputs, pairs in a thread
    PLAIN3: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])

    pid = gl.program_id(0)
    n0 = pid * BLOCK_N
    w_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, ROWS, BLOCK_N], w_desc.layout)
    s_bufs = gl.allocate_shared_memory(gl.float16, [STAGES, G, BLOCK_N], s_desc.layout)
    z_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES, G, BLOCK_N], z_desc.layout)
    x_s = gl.allocate_shared_memory(gl.int32, [8, G, PPG], PLAIN3)
    x_v = x_s._reinterpret(gl.int32, [8, G, PPG], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))  # (for .index)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(STAGES):
        mbarrier.init(bars.index(b), count=1)
    for b in gl.static_range(STAGES):
        _issue(w_desc, s_desc, z_desc, bars.index(b), w_bufs.index(b), s_bufs.index(b), z_bufs.index(b), first + b,
               n0, first + b < last, ROWS, BOX, G)
    if PDL:  # a launch per layer: the slice is on its way before waiting for the launch before (weights are
        # constants), and the next launch may start issuing its own
        _gdc_launch_dependents()
        _gdc_wait()
    epoch = gl.load(epoch_ptr)
    stamp = epoch  # the epoch this launch's words carry: 0 in the no-wait ablation (module docstring)
    if not SYNC:
        stamp = epoch * 0
    offs_x = gl.arange(0, HALF, layout=X1)
    offs_y = gl.arange(0, BLOCK_N, layout=YL)
    for layer in range(first, last):
        step = layer - first
        st = step % STAGES
        # x_layer as half2 words: the chain's input from the fp16 vector, later layers from the tagged buffer
        if layer == first:
            xw = gl.load(x_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + layer * HALF + offs_x)
        else:
            t_l = t_ptr + layer * HALF + offs_x
            tw = gl.load(t_l, volatile=True)
            if SYNC:
                stale = gl.sum(((tw >> 32) != epoch.to(gl.int64)).to(gl.int32), axis=0)
                while stale > 0:
                    tw = gl.load(t_l, volatile=True)
                    stale = gl.sum(((tw >> 32) != epoch.to(gl.int64)).to(gl.int32), axis=0)
            xw = tw.to(gl.int32)
        # into shared memory as [parity * 4 + j, group, pair]: each thread reads its pairs' words contiguously
        x_s.store(gl.permute(gl.reshape(_times_1_32(xw), [G, PPG, 8]), [2, 0, 1]))
        gl.thread_barrier()
        xe0 = x_v.index(0).load(XL)
        xe1 = x_v.index(1).load(XL)
        xe2 = x_v.index(2).load(XL)
        xe3 = x_v.index(3).load(XL)
        xo0 = x_v.index(4).load(XL)
        xo1 = x_v.index(5).load(XL)
        xo2 = x_v.index(6).load(XL)
        xo3 = x_v.index(7).load(XL)
        mbarrier.wait(bars.index(st), (step // STAGES) & 1)
        w3 = w_bufs.index(st)._reinterpret(gl.int32, [G, PPG, 2 * BLOCK_N], PLAIN3)
        we = w3.slice(0, BLOCK_N, dim=2).load(L3)
        wo = w3.slice(BLOCK_N, BLOCK_N, dim=2).load(L3)
        scale = s_bufs.index(st).load(GL).to(gl.float32)
        z = z_bufs.index(st).load(GL).to(gl.int32)
        gl.thread_barrier()  # every thread has its words: the stage takes layer + STAGES
        _issue(w_desc, s_desc, z_desc, bars.index(st), w_bufs.index(st), s_bufs.index(st), z_bufs.index(st),
               layer + STAGES, n0, layer + STAGES < last, ROWS, BOX, G)
        # (1024 + z) and -(64 + z) as half2 bit patterns (1024 + z: 0x6400 + z; -(64 + z): 0xD400 + 16 z)
        zz = gl.expand_dims((0x6400 + z) * 0x10001, 1)
        mz = gl.expand_dims((0xD400 + 16 * z) * 0x10001, 1)
        part = _dot16(we, wo, gl.expand_dims(xe0, 2), gl.expand_dims(xe1, 2), gl.expand_dims(xe2, 2),
                      gl.expand_dims(xe3, 2), gl.expand_dims(xo0, 2), gl.expand_dims(xo1, 2),
                      gl.expand_dims(xo2, 2), gl.expand_dims(xo3, 2), zz, mz)
        y = gl.sum(gl.sum(part, axis=1) * scale, axis=0) * 32.0
        yh = gl.convert_layout(y, YL).to(gl.float16)
        gl.store(x_ptr + (layer + 1) * K + n0 + offs_y, yh)
        if layer + 1 < last:  # read in this launch: the adjacent pairs with this launch's epoch
            bits = yh.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
            lo, hi = gl.split(gl.reshape(bits, [BLOCK_N // 2, 2]))
            word = (lo | (hi << 16)).to(gl.uint32, bitcast=True).to(gl.int64) | (stamp.to(gl.int64) << 32)
            offs_w = gl.arange(0, BLOCK_N // 2, layout=lo.type.layout)
            # relaxed at GPU scope: a plain store racing with the poll (a volatile load) is a data race in PTX's model
            gl.atomic_xchg(t_ptr + (layer + 1) * HALF + n0 // 2 + offs_w, word, sem="relaxed", scope="gpu")
    for b in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(b))
    if SYNC:  # program 0 has read x_{last-1}: every program has started and read the epoch (not so without waits)
        if (pid == 0) & (last - first >= 2):
            nxt = epoch + 1  # 0 skipped on wrap-around
            gl.store(epoch_ptr, nxt + (nxt == 0).to(gl.int32))


@dataclass
class StagedChain:
    """``ChainWeights`` re-packed for the staged kernel: in each word, code j (j < 4) is input 2j of its eight and
    code j + 4 is input 2j + 1 (the half2 decode pairs nibbles j and j + 4), plus the TMA descriptors."""

    qweight: torch.Tensor  # int32 [L * K / 8, N]
    scale: torch.Tensor  # fp16 [L * K / G, N]
    zero: torch.Tensor  # uint8 [L * K / G, N]
    layers: int
    features: int
    group_size: int
    descs: tuple


def _repack(qweight: torch.Tensor) -> torch.Tensor:
    """Nibble j of the result holds the old nibble 2j (j < 4) or 2(j - 4) + 1."""
    old = [(qweight >> (4 * j)) & 15 for j in range(8)]
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    out = torch.zeros_like(qweight)
    for j, src in enumerate(order):
        out |= old[src] << (4 * j)
    return out


BLOCK_N = 32
WARPS = 8


def stage_chain(cw: ChainWeights) -> StagedChain:
    """Re-pack ``cw`` for ``gemv_chain_staged`` (fp16 scales; a symmetric chain gets zero points of 8)."""
    layers, rows, n = cw.qweight.shape
    k = rows * 8
    g = k // cw.group_size
    if n != k or k % BLOCK_N or g != 4 * WARPS or cw.group_size % 16:
        raise ValueError(f"gemv_chain_staged: K={k}, group {cw.group_size}: this experiment takes K / group = "
                         f"{4 * WARPS} groups (a thread a group) and N = K a multiple of {BLOCK_N}")
    qweight = _repack(cw.qweight).reshape(layers * rows, n).contiguous()
    scale = cw.scale.to(torch.float16).reshape(layers * g, n).contiguous()
    zero = (cw.zero if cw.zero is not None else torch.full_like(cw.scale, 8, dtype=torch.uint8))
    zero = zero.reshape(layers * g, n).contiguous()
    box = min(rows, 256)

    def desc(t, rows_, bits):
        return TensorDescriptor.from_tensor(t, [rows_, BLOCK_N], gl.NVMMASharedLayout(0, bits, 2))

    return StagedChain(qweight, scale, zero, layers, k, cw.group_size,
                       (desc(qweight, box, 32), desc(scale, g, 16), desc(zero, g, 8)))


_TAGS: dict = {}


def _tag_state(device, words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tagged activation buffer (int64, zero-filled, grown as chains grow) and the launch epoch (int32, from 1)
    of a device: one chain in flight a device at a time, as on one stream."""
    key = str(device)
    bufs, epoch = _TAGS.get(key, ([], None))
    if not bufs or bufs[-1].numel() < words:
        if epoch is None:
            epoch = torch.ones(1, dtype=torch.int32, device=device)
        # smaller buffers stay allocated: a CUDA graph captured on one keeps its address
        bufs = bufs + [torch.zeros(words, dtype=torch.int64, device=device)]
        _TAGS[key] = (bufs, epoch)
    return bufs[-1], epoch


def gemv_chain_staged(x: torch.Tensor, sc: StagedChain, out: torch.Tensor | None = None, stages: int = 3,
                      sync: bool = True, per_layer: bool = False) -> torch.Tensor:
    """As ``gemv_chain`` (row l + 1 of ``out`` is layer l's output), fp16 on an sm_90 GPU. ``sync=False`` is the
    benchmark's ablation (no waiting for the step before: wrong results by design). ``per_layer``: one launch a
    layer instead of one persistent launch, each a programmatic dependent (PDL) of the one before that issues its
    slice's TMA loads before waiting for it: the shape a per-linear GEMV in the runner would have (``stages``
    unused; the weight stream overlaps the launch before's tail rather than the layers ahead)."""
    k = sc.features
    if x.dtype != torch.float16 or x.numel() != k or not x.is_cuda:
        raise ValueError(f"gemv_chain_staged takes an fp16 CUDA vector of {k} values")
    if x.device != sc.qweight.device:
        raise ValueError(f"gemv_chain_staged: x is on {x.device}, the weights on {sc.qweight.device}")
    if out is None:
        out = torch.empty(sc.layers + 1, k, dtype=x.dtype, device=x.device)
    if out.shape != (sc.layers + 1, k) or out.dtype != x.dtype or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"gemv_chain_staged: out must be a contiguous [{sc.layers + 1}, {k}] fp16 tensor on "
                         f"{x.device}")
    if x.data_ptr() != out.data_ptr():
        out[0].copy_(x.reshape(-1))
    programs = k // BLOCK_N
    if programs > num_sms(x.device):
        raise ValueError(f"gemv_chain_staged: {programs} programs must all be resident ({num_sms(x.device)} SMs)")
    tags, epoch = _tag_state(x.device, (sc.layers + 1) * k // 2)
    if per_layer:  # each launch reads the fp16 row its predecessor wrote: no tags, no epoch advance; at most 128
        # registers, so that the next launch's programs fit beside this one's (186 uncapped: one a multiprocessor)
        for layer in range(sc.layers):
            _staged_chain_kernel[(programs,)](*sc.descs, out, tags, epoch, layer, layer + 1, K=k,
                                              GROUP=sc.group_size, BLOCK_N=BLOCK_N, STAGES=1, SYNC=sync,
                                              num_warps=WARPS, PDL=True, launch_pdl=True, maxnreg=128)
        return out
    _staged_chain_kernel[(programs,)](*sc.descs, out, tags, epoch, 0, sc.layers, K=k, GROUP=sc.group_size,
                                      BLOCK_N=BLOCK_N, STAGES=stages, SYNC=sync, num_warps=WARPS)
    return out
