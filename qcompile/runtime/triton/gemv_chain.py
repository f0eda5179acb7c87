"""A chain of dependent batch-1 int4 GEMVs in one persistent launch: ``x_{l+1} = W_l x_l`` for ``l < L``.

Why: a GEMV launched per linear pays a fixed cost per launch that does not scale with the weight (the drain of the
kernel before, the ramp of the next, the weights read only after the dependency is met): at 4096 x 4096 the
runtime's PDL-chained GEMV spends 6.0 µs a step on 8.4 MB (49 % of the H100's copy peak), and
``bench/triton_chain_floor.py`` showed that a dependent step can cost 3.2 µs only if each program's weights are
read *before* it waits for the step before. A kernel per step cannot hold them (its programs would keep the next
kernel off the multiprocessors); one persistent kernel can:

* one program per multiprocessor (``N / BLOCK_N`` programs, at most the SM count, so all are resident), each
  owning the same ``BLOCK_N`` output columns of every layer;
* at step ``l`` a program first issues the loads of its whole slice of ``W_{l+1}`` into registers (the words,
  ``K / 8 x BLOCK_N`` int32: 64 KiB at K = 4096, BLOCK_N = 32), then waits at a grid barrier until every program
  has written its part of ``x_l``, then computes its columns of ``W_l x_l`` from the slice loaded during the step
  before, stores them and arrives at the barrier. The weight stream of the next step overlaps the barrier and the
  arithmetic of this one;
* the grid barrier is one int32 counter: ``atomic_add`` with release after a CTA barrier (every thread's stores
  first), spinning on an acquire read until ``(l - first) * programs`` arrivals; the program that makes the last
  arrival of the launch resets it to 0, so a CUDA graph can replay the launch (one counter a device: one chain in
  flight a device at a time, as on one stream);
* the decode is the runtime GEMV's row pairs (``wq_matmul._pairs_step``: half2 codes, scale per group in fp32),
  so a chain step rounds as ``wq_linear`` does for the same weight, up to the order its fp32 partials are summed.

The interpreter runs a grid's programs one after another, so a grid barrier would never open there: under
``TRITON_INTERPRET=1`` the same kernel runs without it (``SYNC=False``) and with the float decode (``_gemv_step``):
one launch per layer where there are several programs, the whole chain in one launch where one program holds all
columns (so the loop, the slice read a step ahead and its masking at the last step run there too); the barrier and
the half2 decode are checked on the GPU (``tests/runtime/triton/test_gemv_chain.py``, marked cuda).

``config={"SYNC": "tags"}`` (``_tagged_chain_kernel``) synchronises without a counter or a fence, as NCCL's
low-latency protocol does: a step writes its outputs, when the launch reads them again, as 8-byte words (the half2
(x_j, x_{j+4}) the decode takes, and the launch's 32-bit epoch above it), and the next step re-reads the vector
until every word carries this launch's epoch. The epoch lives on the device (``_tag_state``; program 0 advances
it at the end of a launch of two or more layers, when every program has read it; the no-barrier ablation, which
cannot, stamps its words with epoch 0, which no waiting launch takes; the advance skips 0 when the 32 bits wrap),
so CUDA graphs replay; a word left from 2^32 - 1 launches earlier could pass for a fresh one. The scales and zero
points are read with the slice, a step ahead; ``X_FIRST`` issues the next slice only once x has arrived. fp16
activations in the interpreter too.
(Measured on the H100 on 2026-12-07, the counter version streams at 45 %, below the runtime's PDL chain, because
each program keeps one slice in flight: docs/BENCHMARKS.md, twenty-first session. The tagged variant and
``gemv_chain_staged``, which stages slices in shared memory, were not yet timed.)

Scope: square int4 weights (N = K, so each output is the next input), fp16 activations on the GPU, groups along K
that divide K, N a multiple of ``BLOCK_N``. It is the batch-1 GEMV measured as a chain step
(``bench/triton_gemv_chain.py``); the runner still launches a ``wq_linear`` per linear (its linears are separated by
attention, norms and SwiGLU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.runtime.triton._env import check_device, interpreting, require_triton
from qcompile.runtime.triton._tune import num_sms
from qcompile.runtime.triton.packing import PackedWeight

triton = require_triton()
import triton.language as tl  # noqa: E402

from qcompile.runtime.triton.wq_matmul import (  # noqa: E402
    _dot16_half2,
    _gemv_step,
    _half2_consts,
    _load_pair_tiles,
    _load_tile,
    _pairs_step,
    _scale_pairs_32,
)


@triton.jit
def _load_slice(w_ptr, rows_hi, offs_n, n_mask, N, ROWS: tl.constexpr, PAIRS: tl.constexpr):
    """A program's whole slice of one layer's words (rows from ``rows_hi`` on masked: no memory traffic): as even
    and odd row tiles for the pair decode, else one tile (the second return value is then unused)."""
    if PAIRS:
        we, wo, _p, _pm, _wm = _load_pair_tiles(w_ptr, 0, rows_hi, offs_n, n_mask, N, ROWS)
        return we, wo
    else:
        words, _r, _rm, _wm = _load_tile(w_ptr, 0, rows_hi, offs_n, n_mask, N, ROWS, ROWS, 0)
        return words, words


@triton.jit
def _chain_kernel(x_ptr, w_ptr, s_ptr, z_ptr, sync_ptr, first, last, N,
                  K: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr,
                  PAIRS: tl.constexpr, SYNC: tl.constexpr, AHEAD: tl.constexpr = True):
    ROWS: tl.constexpr = K // 8
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_layer = tl.cast(ROWS, tl.int64) * N
    s_layer = tl.cast(K // GROUP, tl.int64) * N
    offs_p = 2 * tl.arange(0, ROWS // 2)
    offs_r = tl.arange(0, ROWS)
    cur_a, cur_b = _load_slice(w_ptr + first * w_layer, ROWS if AHEAD else 0, offs_n, n_mask, N, ROWS, PAIRS)
    arrived = 0
    for layer in range(first, last):
        if AHEAD:  # the next layer's slice first: weights are constants, so their stream overlaps the wait below
            more = layer + 1 < last
            nxt_a, nxt_b = _load_slice(w_ptr + tl.minimum(layer + 1, last - 1) * w_layer, tl.where(more, ROWS, 0),
                                       offs_n, n_mask, N, ROWS, PAIRS)
        else:  # (an ablation for the benchmark: this layer's slice read only after the wait, as a GEMV per launch)
            nxt_a = cur_a
            nxt_b = cur_b
        if SYNC:
            if layer > first:  # x_layer is complete once every program has arrived (layer - first) times
                target = (layer - first) * programs
                seen = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
                while seen < target:
                    seen = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
        if not AHEAD:
            cur_a, cur_b = _load_slice(w_ptr + layer * w_layer, ROWS, offs_n, n_mask, N, ROWS, PAIRS)
        x_l = x_ptr + layer * K
        s_l = s_ptr + layer * s_layer
        z_l = z_ptr + layer * s_layer
        if PAIRS:
            p_mask = offs_p < ROWS
            part = _pairs_step(x_l, s_l, z_l, cur_a, cur_b, 0, offs_p, offs_n, p_mask, n_mask,
                               p_mask[:, None] & n_mask[None, :], N, K, GROUP, HAS_ZERO, False, ROWS, BLOCK_N)
            y = tl.sum(part, axis=0) * 32.0  # the activations' 1/32
        else:
            r_mask = offs_r < ROWS
            m_mask = tl.arange(0, 1) < 1
            part = _gemv_step(x_l, s_l, z_l, cur_a, 0, offs_r, offs_n, tl.arange(0, 1), r_mask, n_mask, m_mask,
                              r_mask[:, None] & n_mask[None, :], N, K, K, 4, GROUP, HAS_ZERO, False, False, 1, ROWS,
                              BLOCK_N)
            y = tl.sum(part, axis=0)
        tl.store(x_ptr + (layer + 1) * K + offs_n, y.to(x_ptr.dtype.element_ty), mask=n_mask)
        if SYNC:
            tl.debug_barrier()  # every thread's stores precede the release below
            arrived = tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")
        cur_a = nxt_a
        cur_b = nxt_b
    if SYNC:
        # the launch's last arrival: every program is past every wait, so the counter may go back to 0
        if arrived == (last - first) * programs - 1:
            tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def _half2_word(xh, j: tl.constexpr, mask):
    lo = tl.load(xh + j, mask=mask, other=0).to(tl.int32) & 0xFFFF
    return lo | (tl.load(xh + j + 4, mask=mask, other=0).to(tl.int32) << 16)


@triton.jit
def _fp16_pairs(x_ptr, rows, mask):
    """The half2 words (x_j, x_{j+4}), j = 0..3, of word rows ``rows`` of an fp16 vector, as int32."""
    xh = x_ptr.to(tl.pointer_type(tl.int16)) + rows * 8
    p0 = _half2_word(xh, 0, mask)
    p1 = _half2_word(xh, 1, mask)
    p2 = _half2_word(xh, 2, mask)
    p3 = _half2_word(xh, 3, mask)
    return p0, p1, p2, p3


@triton.jit
def _load_relaxed(ptr, mask, ASM: tl.constexpr):
    """An 8-byte word read at L2 every time (a relaxed load at GPU scope: Triton's ``volatile`` would be system
    scope); rows are never masked off on the GPU (the mask only serves the interpreter, which has no inline asm)."""
    if ASM:
        return tl.inline_asm_elementwise("ld.relaxed.gpu.global.b64 $0, [$1];", "=l,l", [ptr], dtype=tl.int64,
                                         is_pure=False, pack=1)
    else:
        return tl.load(ptr, mask=mask, other=0, volatile=True)


@triton.jit
def _store_relaxed(ptr, word, mask):
    """Tagged words stored at GPU scope, relaxed: the pair of ``_load_relaxed`` (a plain store racing with the poll
    is a data race under the PTX memory model). An atomic exchange, not inline asm: Triton stores a replicated
    element from one thread only for its own memory ops, inline asm would store it from every thread."""
    tl.atomic_xchg(ptr, word, mask=mask, sem="relaxed", scope="gpu")


@triton.jit
def _tagged_pairs(t_ptr, rows, mask, epoch, HALF2: tl.constexpr):
    """The half2 words (x_j, x_{j+4}) of word rows ``rows`` from the tagged buffer (int64: the pair in the low 32
    bits, the launch's epoch in the high 32), and how many of the eight loaded words are not yet of this epoch."""
    tp = t_ptr + rows * 4
    w0 = _load_relaxed(tp + 0, mask, HALF2)
    w1 = _load_relaxed(tp + 1, mask, HALF2)
    w2 = _load_relaxed(tp + 2, mask, HALF2)
    w3 = _load_relaxed(tp + 3, mask, HALF2)
    e = epoch.to(tl.int64)
    stale = (((w0 >> 32) != e) | ((w1 >> 32) != e) | ((w2 >> 32) != e) | ((w3 >> 32) != e)) & mask
    return w0.to(tl.int32), w1.to(tl.int32), w2.to(tl.int32), w3.to(tl.int32), stale.to(tl.int32)


@triton.jit
def _half(pair, HI: tl.constexpr):
    """One fp16 half of a half2 word, as fp32 (the interpreter's float decode)."""
    bits = (pair >> 16) if HI else pair
    return (bits & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _float_dot8(w, x0, x1, x2, x3, zf):
    """``sum_j x_j (c_j - z)`` over one word's eight codes in fp32: code j in bits 4j..4j+3, its activation in
    half j // 4 of pair word j % 4."""
    acc = (((w >> 0) & 15).to(tl.float32) - zf) * _half(x0, False)[:, None]
    acc += (((w >> 4) & 15).to(tl.float32) - zf) * _half(x1, False)[:, None]
    acc += (((w >> 8) & 15).to(tl.float32) - zf) * _half(x2, False)[:, None]
    acc += (((w >> 12) & 15).to(tl.float32) - zf) * _half(x3, False)[:, None]
    acc += (((w >> 16) & 15).to(tl.float32) - zf) * _half(x0, True)[:, None]
    acc += (((w >> 20) & 15).to(tl.float32) - zf) * _half(x1, True)[:, None]
    acc += (((w >> 24) & 15).to(tl.float32) - zf) * _half(x2, True)[:, None]
    acc += (((w >> 28) & 15).to(tl.float32) - zf) * _half(x3, True)[:, None]
    return acc


@triton.jit
def _float_dot16(we, wo, xe0, xe1, xe2, xe3, xo0, xo1, xo2, xo3, z):
    """A row pair's sixteen codes in fp32 (the interpreter's decode; on the GPU ``_dot16_half2`` does it in
    half2)."""
    zf = z.to(tl.float32)
    return _float_dot8(we, xe0, xe1, xe2, xe3, zf) + _float_dot8(wo, xo0, xo1, xo2, xo3, zf)


@triton.jit
def _load_layer(w_ptr, s_ptr, z_ptr, layer, hi, offs_p, offs_n, n_mask, N, dep,
                K: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr):
    """A program's whole slice of layer ``layer``: even and odd word rows, and each row pair's scale and zero
    point (loaded in the words' layout, so nothing is rearranged after the wait); rows from ``hi`` on masked (no
    traffic). ``dep`` (0 at run time) ties the addresses to a value, so the loads cannot issue before it is known."""
    ROWS: tl.constexpr = K // 8
    w_l = w_ptr + tl.cast(layer, tl.int64) * (ROWS * N) + dep
    p_mask = offs_p < hi
    wp_mask = p_mask[:, None] & n_mask[None, :]
    off = offs_p[:, None] * N + offs_n[None, :]
    we = tl.load(w_l + off, mask=wp_mask, other=0)
    wo = tl.load(w_l + off + N, mask=wp_mask, other=0)
    s_off = tl.cast(layer, tl.int64) * ((K // GROUP) * N) + (offs_p // (GROUP // 8))[:, None] * N + offs_n[None, :]
    sc = tl.load(s_ptr + s_off + dep, mask=wp_mask, other=0.0)
    if HAS_ZERO:
        zp = tl.load(z_ptr + s_off + dep, mask=wp_mask, other=0)
    else:
        zp = tl.full(sc.shape, 8, tl.uint8)
    return we, wo, sc, zp


@triton.jit(do_not_specialize=["zero"])
def _tagged_chain_kernel(x_ptr, t_ptr, w_ptr, s_ptr, z_ptr, epoch_ptr, zero, first, last, N,
                         K: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr,
                         HALF2: tl.constexpr, SYNC: tl.constexpr, X_FIRST: tl.constexpr):
    """``_chain_kernel`` synchronised through tagged activations (module docstring): ``t_ptr`` holds x_1 ..
    x_{L-1} as int64 words, ``zero`` is 0 at run time (it ties the next slice's addresses to x for ``X_FIRST``);
    ``HALF2`` False is the interpreter's float decode."""
    ROWS: tl.constexpr = K // 8
    R2: tl.constexpr = ROWS // 2
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_p = 2 * tl.arange(0, R2)
    offs_q = tl.arange(0, BLOCK_N // 8)  # this program's word rows of the next x (8 outputs a word row)
    p_mask = offs_p < ROWS
    epoch = tl.load(epoch_ptr)
    # the epoch this launch's words carry; the no-wait ablation cannot advance the epoch safely, so its words carry 0,
    # which no waiting launch takes (epochs start at 1 and the buffer starts zero-filled)
    stamp = epoch
    if not SYNC:
        stamp = epoch * 0
    cur_e, cur_o, cur_s, cur_z = _load_layer(w_ptr, s_ptr, z_ptr, first, ROWS, offs_p, offs_n, n_mask, N, 0,
                                             K, GROUP, HAS_ZERO)
    for layer in range(first, last):
        more = layer + 1 < last
        nxt = tl.minimum(layer + 1, last - 1)
        if not X_FIRST:  # the next layer's slice before the wait for x_layer
            nxt_e, nxt_o, nxt_s, nxt_z = _load_layer(w_ptr, s_ptr, z_ptr, nxt, tl.where(more, ROWS, 0), offs_p, offs_n,
                                                     n_mask, N, 0, K, GROUP, HAS_ZERO)
        if layer == first:  # the chain's input: written before the launch
            xe0, xe1, xe2, xe3 = _fp16_pairs(x_ptr + layer * K, offs_p, p_mask)
            xo0, xo1, xo2, xo3 = _fp16_pairs(x_ptr + layer * K, offs_p + 1, p_mask)
            waited = tl.full((), 0, tl.int32)
        else:  # x_layer from the tagged buffer: every word carries the epoch of the launch that wrote it
            t_l = t_ptr + tl.cast(layer, tl.int64) * (K // 2)
            xe0, xe1, xe2, xe3, se = _tagged_pairs(t_l, offs_p, p_mask, epoch, HALF2)
            xo0, xo1, xo2, xo3, so = _tagged_pairs(t_l, offs_p + 1, p_mask, epoch, HALF2)
            waited = tl.sum(se + so)
            if SYNC:
                while waited > 0:
                    xe0, xe1, xe2, xe3, se = _tagged_pairs(t_l, offs_p, p_mask, epoch, HALF2)
                    xo0, xo1, xo2, xo3, so = _tagged_pairs(t_l, offs_p + 1, p_mask, epoch, HALF2)
                    waited = tl.sum(se + so)
        if X_FIRST:  # the next layer's slice once x_layer is here (its loads cannot queue ahead of x's)
            nxt_e, nxt_o, nxt_s, nxt_z = _load_layer(w_ptr, s_ptr, z_ptr, nxt, tl.where(more, ROWS, 0), offs_p, offs_n,
                                                     n_mask, N, waited * zero, K, GROUP, HAS_ZERO)
        scale = cur_s.to(tl.float32)
        z = cur_z
        if HALF2:
            xe0, xe1, xe2, xe3 = _scale_pairs_32(xe0, xe1, xe2, xe3)
            xo0, xo1, xo2, xo3 = _scale_pairs_32(xo0, xo1, xo2, xo3)
            _s2, zz, mz = _half2_consts(tl.zeros(z.shape, tl.float16), z)
            shape: tl.constexpr = (R2, BLOCK_N)
            part = _dot16_half2(cur_e, cur_o, tl.broadcast_to(xe0[:, None], shape),
                                tl.broadcast_to(xe1[:, None], shape), tl.broadcast_to(xe2[:, None], shape),
                                tl.broadcast_to(xe3[:, None], shape), tl.broadcast_to(xo0[:, None], shape),
                                tl.broadcast_to(xo1[:, None], shape), tl.broadcast_to(xo2[:, None], shape),
                                tl.broadcast_to(xo3[:, None], shape), zz, mz)
            y = tl.sum(part * scale, axis=0) * 32.0
        else:
            y = tl.sum(_float_dot16(cur_e, cur_o, xe0, xe1, xe2, xe3, xo0, xo1, xo2, xo3, z) * scale, axis=0)
        yh = y.to(tl.float16)
        tl.store(x_ptr + (layer + 1) * K + offs_n, yh, mask=n_mask)
        if more:  # x_{layer+1} is read in this launch: its pairs with this launch's epoch, 8 bytes a store
            bits = yh.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            lo, hi = tl.split(tl.permute(tl.reshape(bits, (BLOCK_N // 8, 2, 4)), (0, 2, 1)))
            word = (lo | (hi << 16)).to(tl.uint32, bitcast=True).to(tl.int64) | (stamp.to(tl.int64) << 32)
            t_next = t_ptr + tl.cast(layer + 1, tl.int64) * (K // 2) + pid * (BLOCK_N // 2)
            row_ok = tl.broadcast_to((pid * (BLOCK_N // 8) + offs_q < ROWS)[:, None], word.shape)
            _store_relaxed(t_next + offs_q[:, None] * 4 + tl.arange(0, 4)[None, :], word, row_ok)
        cur_e = nxt_e
        cur_o = nxt_o
        cur_s = nxt_s
        cur_z = nxt_z
    if SYNC:  # (not in the no-wait ablation: there a late program could still read the epoch after the store)
        if (pid == 0) & (last - first >= 2):
            # program 0 has read x_{last-1}, so every program has started (and read the epoch): the next launch's
            # words get the next epoch; 0 is skipped on wrap-around (it marks zero-filled and no-wait words)
            nxt = epoch + 1
            tl.store(epoch_ptr, nxt + (nxt == 0).to(tl.int32))


@dataclass
class ChainWeights:
    """``L`` square int4 weights stacked for ``gemv_chain``: ``qweight`` int32 [L, K/8, N], ``scale`` [L, K/G, N]
    (fp16), ``zero`` uint8 [L, K/G, N] or None (symmetric)."""

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group_size: int

    @property
    def layers(self) -> int:
        return self.qweight.shape[0]

    @property
    def features(self) -> int:
        return self.qweight.shape[2]


def stack_chain(weights: list[PackedWeight]) -> ChainWeights:
    """Stack ``PackedWeight``s of one square shape (int4, same group size and symmetry) for ``gemv_chain``."""
    if not weights:
        raise ValueError("gemv_chain needs at least one weight")
    first = weights[0]
    for i, w in enumerate(weights):
        if w.bits != 4 or w.in_features != w.out_features:
            raise ValueError(f"gemv_chain: weight {i} is {w.bits}-bit {w.out_features} x {w.in_features}; the chain "
                             "takes square int4 weights (each output is the next input)")
        if (w.in_features, w.group_size, w.zero is None, w.scale.dtype, w.device) != (
                first.in_features, first.group_size, first.zero is None, first.scale.dtype, first.device):
            raise ValueError(f"gemv_chain: weight {i} differs from weight 0 in size, group size, symmetry, scale "
                             "dtype or device")
        if w.bias is not None:
            raise ValueError(f"gemv_chain: weight {i} has a bias; the chain has no epilogue for one")
    return ChainWeights(
        qweight=torch.stack([w.qweight for w in weights]).contiguous(),
        scale=torch.stack([w.scale for w in weights]).contiguous(),
        zero=None if first.zero is None else torch.stack([w.zero for w in weights]).contiguous(),
        group_size=first.group_size,
    )


_SYNC: dict = {}


def _sync_counter(device) -> torch.Tensor:
    key = str(device)
    if key not in _SYNC:
        _SYNC[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _SYNC[key]


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


def chain_config(n: int, device) -> dict:
    """BLOCK_N and warps: the fewest columns a program that still leaves every program resident (one a
    multiprocessor); 16 warps keep two slices (64 KiB each at K = 4096) in registers without spills."""
    sms = 1 << 30 if interpreting() else num_sms(device)  # the interpreter launches a layer at a time
    for block_n in (16, 32, 64, 128, 256):
        if n % block_n == 0 and n // block_n <= sms:
            return {"BLOCK_N": block_n, "num_warps": 16}
    raise ValueError(f"gemv_chain: N={n} needs a column block that divides it into at most {sms} programs")


def gemv_chain(x: torch.Tensor, cw: ChainWeights, out: torch.Tensor | None = None,
               config: dict | None = None) -> torch.Tensor:
    """Run the chain from ``x`` ([K] or [1, K]); returns ``out`` [L + 1, K]: row 0 is ``x``, row ``l + 1`` the
    output of layer ``l`` (``out`` is written in place when given: a CUDA graph can capture the call)."""
    check_device(x.device)
    k = cw.features
    if x.numel() != k:
        raise ValueError(f"gemv_chain: x has {x.numel()} values, the weights take {k}")
    if x.device != cw.qweight.device:
        raise ValueError(f"gemv_chain: x is on {x.device}, the weights on {cw.qweight.device}")
    if (k // 8) & (k // 8 - 1) or k < 64:
        raise ValueError(f"gemv_chain: K={k} must be a power of two >= 64 (one register tile per slice)")
    if cw.group_size % 16 or k % cw.group_size:
        raise ValueError(f"gemv_chain: group size {cw.group_size} must be a multiple of 16 dividing K={k}")
    pairs = not interpreting()
    if pairs and x.dtype != torch.float16:
        raise ValueError(f"gemv_chain runs fp16 activations on the GPU, got {x.dtype}")
    layers = cw.layers
    if out is None:
        out = torch.empty(layers + 1, k, dtype=x.dtype, device=x.device)
    if out.shape != (layers + 1, k) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"gemv_chain: out must be a contiguous [{layers + 1}, {k}] {x.dtype} tensor")
    if x.data_ptr() != out.data_ptr():  # (x may already be out[0]: then the call is the chain's launch alone)
        out[0].copy_(x.reshape(-1))
    cfg = dict(config or chain_config(k, x.device))
    block_n = cfg["BLOCK_N"]
    programs = k // block_n
    if k % block_n or (not interpreting() and programs > num_sms(x.device)):
        raise ValueError(f"gemv_chain: BLOCK_N={block_n} gives {k / block_n:g} programs; all must be resident "
                         f"(at most {num_sms(x.device)}, one a multiprocessor)")
    zero = cw.zero if cw.zero is not None else cw.scale  # never read without HAS_ZERO
    tags = cfg.get("SYNC") == "tags"
    if tags and x.dtype != torch.float16:
        raise ValueError(f"gemv_chain with SYNC='tags' passes fp16 activations, got {x.dtype}")
    if interpreting():  # programs run one after another there, so no barrier: a launch per layer where there are
        # several programs; one program runs the whole chain in one launch (the loop and its slice read ahead run),
        # and with tags polls its own words (already fresh there)
        spans = [(layer, layer + 1) for layer in range(layers)] if programs > 1 else [(0, layers)]
        sync, opts = tags and programs == 1, {}
    else:  # ("NO_BARRIER": the benchmark's ablation, wrong results by design: what the barrier costs)
        spans = [(0, layers)]
        sync, opts = not cfg.get("NO_BARRIER", False), {"num_warps": cfg.get("num_warps", 16), "num_stages": 1}
    meta = dict(K=k, GROUP=cw.group_size, HAS_ZERO=cw.zero is not None, BLOCK_N=block_n, SYNC=sync, **opts)
    if tags:
        buf, epoch = _tag_state(x.device, (layers + 1) * k // 2)
        for first, last in spans:
            _tagged_chain_kernel[(programs,)](out, buf, cw.qweight, cw.scale, zero, epoch, 0, first, last, k,
                                              HALF2=pairs, X_FIRST=cfg.get("X_FIRST", False), **meta)
    else:
        for first, last in spans:
            _chain_kernel[(programs,)](out, cw.qweight, cw.scale, zero, _sync_counter(x.device), first, last, k,
                                       PAIRS=pairs, AHEAD=cfg.get("AHEAD", True), **meta)
    return out
