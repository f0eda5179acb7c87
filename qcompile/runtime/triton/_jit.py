"""Device helpers shared by the kernels."""

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
