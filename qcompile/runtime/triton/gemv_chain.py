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

(Measured on the H100 on 2026-12-07: the counter version streams at 40-45 %, below the runtime's PDL chain, because
each program keeps one slice in flight: docs/BENCHMARKS.md, twenty-first and twenty-third sessions.
``gemv_chain_staged`` stages slices in shared memory instead. A variant synchronised through tagged activations
was 1.3-2.7x slower than this one and failed its GPU check; it was removed, see the twenty-third session.)

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
    _gemv_step,
    _load_pair_tiles,
    _load_tile,
    _pairs_step,
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
    cfg = dict(config or chain_config(k, x.device))
    unknown = set(cfg) - {"BLOCK_N", "num_warps", "AHEAD", "NO_BARRIER"}
    if unknown:
        raise ValueError(f"gemv_chain: unknown config keys {sorted(unknown)}")
    if x.data_ptr() != out.data_ptr():  # (x may already be out[0]: then the call is the chain's launch alone)
        out[0].copy_(x.reshape(-1))
    block_n = cfg["BLOCK_N"]
    programs = k // block_n
    if k % block_n or (not interpreting() and programs > num_sms(x.device)):
        raise ValueError(f"gemv_chain: BLOCK_N={block_n} gives {k / block_n:g} programs; all must be resident "
                         f"(at most {num_sms(x.device)}, one a multiprocessor)")
    zero = cw.zero if cw.zero is not None else cw.scale  # never read without HAS_ZERO
    if interpreting():  # programs run one after another there, so no barrier: a launch per layer where there are
        # several programs; one program runs the whole chain in one launch (the loop and its slice read ahead run)
        spans = [(layer, layer + 1) for layer in range(layers)] if programs > 1 else [(0, layers)]
        sync, opts = False, {}
    else:  # ("NO_BARRIER": the benchmark's ablation, wrong results by design: what the barrier costs)
        spans = [(0, layers)]
        sync, opts = not cfg.get("NO_BARRIER", False), {"num_warps": cfg.get("num_warps", 16), "num_stages": 1}
    meta = dict(K=k, GROUP=cw.group_size, HAS_ZERO=cw.zero is not None, BLOCK_N=block_n, SYNC=sync, **opts)
    for first, last in spans:
        _chain_kernel[(programs,)](out, cw.qweight, cw.scale, zero, _sync_counter(x.device), first, last, k,
                                   PAIRS=pairs, AHEAD=cfg.get("AHEAD", True), **meta)
    return out
