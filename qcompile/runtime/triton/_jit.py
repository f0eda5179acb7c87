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
