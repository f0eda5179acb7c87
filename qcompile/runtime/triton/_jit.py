"""Device helpers shared by the kernels (and the host checks that go with them)."""

import torch

from qcompile.runtime.triton._env import require_triton

triton = require_triton()
import triton.language as tl  # noqa: E402

MIN_SCALE = tl.constexpr(1e-8)  # the scale floor of qcompile.quant.activations: an all-zero token stays zero


@triton.jit
def round_half_even(y):
    """``torch.round`` / ONNX ``Round`` (ties to even) without libdevice: ``y - floor(y)`` is exact for the
    |y| < 2^23 the quantizers produce, unlike ``floor(y + 0.5)``, which also rounds 0.49999997 up."""
    r = tl.floor(y)
    f = y - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` for a GEMM launched as one flat grid, walking GROUP_M row tiles per
    column step so that consecutive programs reuse the same weight tiles from L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def row_ptr(ptr, row, stride):
    """``ptr + row * stride`` with the product in int64: a row-major tensor of 2^31 elements or more (a long
    prompt's activations: 75k tokens of a 70B model's 28672-wide MLP) puts its last rows' offsets past int32."""
    return ptr + tl.cast(row, tl.int64) * stride


@triton.jit
def tile_rows(ptr, m0, offs_m, stride):
    """Pointers to the rows ``offs_m`` (a column vector) of a tile whose first row is ``m0``: that row's offset in
    int64 (M x N outputs may pass 2^31: all of a long prompt's logits over a large vocabulary; so may M x K
    activations, see ``row_ptr``), the rows within the tile in int32."""
    return ptr + tl.cast(m0, tl.int64) * stride + (offs_m - m0)[:, None] * stride


# gemv_digits' activations: the six balanced base-256 digits of an fp16 value times 2^24 (the format is defined in
# gemv_digits' docstring; producers write it with ``store_digit_planes``, kept here so that they need no Gluon)
DIGIT_PLANES = 6
DIGIT_OFFSET = sum(128 << (8 * p) for p in range(DIGIT_PLANES))  # makes every balanced digit a byte 0..255
_DIGIT_PLANES_C = tl.constexpr(DIGIT_PLANES)
_DIGIT_OFFSET_C = tl.constexpr(DIGIT_OFFSET)


@triton.jit
def store_digit_planes(p_ptr, offs, y, mask, K):
    """A producer's epilogue: the digit planes of its fp16 output ``y`` at inputs ``offs`` (``mask``) into ``p_ptr``
    int8 [8, K] (rows 6 and 7 untouched), as ``gemv_digits.digit_planes`` writes them: the next GEMV
    (``gemv_digits``) reads them instead of ``y``. ``K`` a multiple of 64."""
    s = offs // 32
    r = offs % 32
    pos = (s // 2) * 64 + ((r % 16) // 4) * 16 + (s % 2) * 8 + (r // 16) * 4 + r % 4  # plane_positions
    _store_planes_at(p_ptr, pos, y, mask, K)


@triton.jit
def store_row_digit_planes(p_ptr, y, N, BLOCK: tl.constexpr):
    """``store_digit_planes`` for a producer that holds a whole row: ``y`` its fp16 outputs 0..BLOCK-1 (BLOCK a
    power of two >= 64; outputs from ``N``, a multiple of 64, masked). The row is permuted into plane order in
    registers first, so that each plane goes out as contiguous bytes (16-byte stores) instead of one byte at a time
    at scattered positions: on the H100 the scattered stores made the 1.2B model's RMSNorm 46 us a step slower.
    Input 64 blk + 32 h + 16 a + 4 c + d sits at byte 64 blk + 16 c + 8 h + 4 a + d (``plane_positions``)."""
    yp = tl.reshape(tl.permute(tl.reshape(y, (BLOCK // 64, 2, 2, 4, 4)), (0, 3, 1, 2, 4)), (BLOCK,))
    q = tl.arange(0, BLOCK)
    _store_planes_at(p_ptr, q, yp, q < N, N)


@triton.jit
def _store_planes_at(p_ptr, pos, y, mask, K):
    """The six digit planes of fp16 ``y`` at plane positions ``pos`` (``mask``) of ``p_ptr`` int8 [8, K]."""
    big = (y.to(tl.float16).to(tl.float32) * 16777216.0).to(tl.int64) + _DIGIT_OFFSET_C  # exact: 41 bits
    for p in tl.static_range(_DIGIT_PLANES_C):
        tl.store(p_ptr + p * K + pos, (((big >> (8 * p)) & 255) - 128).to(tl.int8), mask=mask)


def check_planes(planes: torch.Tensor, k: int, device, who: str) -> None:
    """The digit planes of ``k`` inputs a producer writes and ``gemv_digits`` reads: a contiguous int8 tensor
    [8, k] on ``device``, ``k`` a multiple of 64 (the planes' 64-input blocks)."""
    if (k % 64 or planes.shape != (8, k) or planes.dtype != torch.int8 or not planes.is_contiguous()
            or planes.device != torch.device(device)):
        raise ValueError(f"{who}: digit planes are a contiguous int8 tensor [8, K] on {device}, K a multiple of 64; "
                         f"got {planes.dtype} {tuple(planes.shape)} on {planes.device} for K = {k}")
