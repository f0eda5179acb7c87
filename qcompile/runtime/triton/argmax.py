"""Greedy decoding's argmax over one row of logits, as ``torch.argmax`` picks it, in one launch.

torch's reduction over one row of 128256 logits took 36.8 µs of every decode step of the 1.2B Llama on the H100
(5 % of the step; docs/BENCHMARKS.md, twenty-ninth session): one reduction kernel, mostly idle multiprocessors.
Here about one program per multiprocessor each reduces a chunk to its largest value and that value's first index,
stores the pair in the split-K workspace (``wq_matmul._Workspace``) and counts its arrival; the last to arrive
reduces the pairs in chunk order and writes the index (the pattern of the split-K GEMV's epilogue).

The pick is torch's: the first index of the largest value; NaN above everything (the first NaN wins, as in
torch); -0.0 equal to +0.0. Values are compared as int32 keys that order floats totally (sign-magnitude bits
turned two's complement), with every NaN mapped to the largest key, so that ties and NaN need no float rules.
"""

from __future__ import annotations

import torch

from qcompile.runtime.triton._env import interpreting, require_triton
from qcompile.runtime.triton._tune import num_sms

triton = require_triton()
import triton.language as tl  # noqa: E402

_NAN_KEY = tl.constexpr(2**31 - 1)  # above +inf's key (0x7F800000)
_NO_INDEX = tl.constexpr(2**31 - 1)


@triton.jit
def _argmax_kernel(x_ptr, part_ptr, lock_ptr, out_ptr, copy_ptr, a0_ptr, a1_ptr, N, CHUNK: tl.constexpr,
                   PROGRAMS: tl.constexpr, COPY: tl.constexpr = False, ADVANCE: tl.constexpr = 0):
    """``COPY``: the index also into ``copy_ptr``; ``ADVANCE`` (0-2): ``a0_ptr`` (and ``a1_ptr``), int32 counters,
    each advanced by one, by the last program (the decode step's tail, which would otherwise take three launches)."""
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    v = tl.load(x_ptr + offs, mask=offs < N, other=float("-inf")).to(tl.float32)
    v = tl.where(v == 0.0, 0.0, v)  # -0.0 -> +0.0: equal, as torch compares them
    bits = v.to(tl.int32, bitcast=True)
    key = tl.where(v != v, _NAN_KEY, bits ^ ((bits >> 31) & 0x7FFFFFFF))  # float order as int order; NaN on top
    best = tl.max(key, axis=0)
    # the chunk's first index of its best key (a masked tail is -inf, after every real entry of the last chunk)
    first = tl.min(tl.where(key == best, offs, _NO_INDEX), axis=0)
    tl.store(part_ptr + pid, best.to(tl.float32, bitcast=True))  # raw 32-bit pairs in the fp32 workspace
    tl.store(part_ptr + PROGRAMS + pid, first.to(tl.float32, bitcast=True))
    tl.debug_barrier()  # the pair is written before the (release) arrival below
    arrived = tl.atomic_add(lock_ptr, 1)
    if arrived == tl.num_programs(0) - 1:  # last to arrive: the first chunk holding the largest key wins
        p = tl.arange(0, PROGRAMS)
        pmask = p < tl.num_programs(0)
        keys = tl.load(part_ptr + p, mask=pmask, other=0.0, cache_modifier=".cg").to(tl.int32, bitcast=True)
        idx = tl.load(part_ptr + PROGRAMS + p, mask=pmask, other=0.0, cache_modifier=".cg").to(tl.int32,
                                                                                                bitcast=True)
        keys = tl.where(pmask, keys, -_NAN_KEY - 1)
        top = tl.max(keys, axis=0)
        pick = tl.min(tl.where(keys == top, idx, _NO_INDEX), axis=0).to(tl.int64)
        tl.store(out_ptr, pick)
        if COPY:
            tl.store(copy_ptr, pick)
        if ADVANCE >= 1:
            tl.store(a0_ptr, tl.load(a0_ptr) + 1)
        if ADVANCE >= 2:
            tl.store(a1_ptr, tl.load(a1_ptr) + 1)
        tl.atomic_xchg(lock_ptr, 0)  # ready for the next launch (and for CUDA-graph replays)


MAX_CHUNK = 8192  # 64 values a thread at 4 warps; longer rows take more programs


def chunk_size(n: int, sms: int) -> int:
    """Logits a program reduces on ``sms`` multiprocessors: about a program per multiprocessor for any vocabulary
    (126 programs of 1024 for 128256 logits on the H100's 132), at least 256 and at most ``MAX_CHUNK`` a program.
    Under the interpreter (``num_sms`` 4), whose cost is per program, 4 programs up to 32768 logits."""
    return min(MAX_CHUNK, max(256, triton.next_power_of_2(triton.cdiv(n, sms))))


def argmax(x: torch.Tensor, out: torch.Tensor | None = None, *, copy_to: torch.Tensor | None = None,
           advance: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """The index of the largest entry of the 1-D ``x`` (float16/bfloat16/float32, at most 2^31 - 1 entries) as
    ``torch.argmax`` gives it: int64 [1], written into ``out`` when given (an int64 tensor of one element on x's
    device). In the same launch, once the index is known: written into ``copy_to`` too (one int64), and each of
    ``advance`` (at most two int32 tensors of one element) incremented: the decode step's next token, position and
    length."""
    from qcompile.runtime.triton.wq_matmul import _Workspace

    if x.dim() != 1 or x.numel() == 0 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"argmax takes a non-empty 1-D float16/bfloat16/float32 tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    if x.numel() >= 2**31:
        raise ValueError(f"argmax: {x.numel()} entries exceed int32 indices")
    if out is None:
        out = torch.empty(1, dtype=torch.int64, device=x.device)
    elif out.dtype != torch.int64 or out.numel() != 1 or out.device != x.device:
        raise ValueError(f"argmax: out must be one int64 element on {x.device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    for name, t, dtype in [("copy_to", copy_to, torch.int64)] + [("advance", a, torch.int32) for a in advance]:
        if t is not None and (t.dtype != dtype or t.numel() != 1 or t.device != x.device):
            raise ValueError(f"argmax: {name} must be one {dtype} element on {x.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    if len(advance) > 2:
        raise ValueError(f"argmax advances at most two counters, got {len(advance)}")
    x = x.contiguous()
    n = x.numel()
    chunk = chunk_size(n, num_sms(x.device))
    programs = triton.cdiv(n, chunk)
    padded = triton.next_power_of_2(programs)  # the last program's reduction over every program's pair
    part, lock = _Workspace.get(x.device, 2 * padded, 1)
    opts = {} if interpreting() else {"num_warps": 4}
    a0, a1 = (list(advance) + [out, out])[:2]  # unused pointers (ADVANCE says how many are read)
    _argmax_kernel[(programs,)](x, part, lock, out, copy_to if copy_to is not None else out, a0, a1, n, CHUNK=chunk,
                                PROGRAMS=padded, COPY=copy_to is not None, ADVANCE=len(advance), **opts)
    return out
