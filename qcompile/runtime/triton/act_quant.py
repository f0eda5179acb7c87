"""Per-token fake quantization (quantize-dequantize) of activations, as the exported graph computes it.

``fake_quantize(x, bits, symmetric, group_size, clip_ratio)`` runs the arithmetic of
``qcompile.quant.activations.fake_quantize_tokens`` and of the graph's nodes (``graph.quant_nodes``) along the
last dimension, in groups of ``group_size`` (None: the whole row), in float32:

* symmetric: ``s = max(clip * max|x| / qmax, 1e-8)``, ``q = clamp(round(x / s), -2^(b-1), 2^(b-1)-1)``, ``x' = q s``;
* asymmetric: ``hi = clip * max(max x, 0)``, ``lo = clip * min(min x, 0)``, ``s = max((hi - lo) / qmax, 1e-8)``,
  ``z = round(-lo / s)``, ``q = clamp(round(x / s) + z, 0, 2^b - 1)``, ``x' = (q - z) s``;

with IEEE-rounded divisions (``tl.div_rn``, as ORT's ``Div``), no fused multiply-adds (each product rounded, as
the graph's ``Mul``) and ties-to-even rounding (ONNX ``Round``), so on
float32 inputs the result is the graph's, bit for bit. One program per token group; the result has ``x``'s dtype.
Any bit width from 2 to 8 (the integer path for 8-bit symmetric per-token inputs is ``w8a8.quantize_rows``).
"""

from __future__ import annotations

import torch

from qcompile.runtime.triton._env import interpreting, require_triton

triton = require_triton()
import triton.language as tl  # noqa: E402

from qcompile.runtime.triton._jit import MIN_SCALE, round_half_even, row_ptr  # noqa: E402

MAX_GROUP = 32768  # one group per program, held in registers


@triton.jit
def _fake_quant_kernel(x_ptr, y_ptr, G, clip, QMAX: tl.constexpr, SYM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # one group of one token (rows of [tokens * groups, G])
    offs = tl.arange(0, BLOCK)
    mask = offs < G
    # padding reads 0, which changes neither max|x| nor the ranges (both contain 0 by construction)
    x = tl.load(row_ptr(x_ptr, row, G) + offs, mask=mask, other=0.0).to(tl.float32)
    if SYM:
        QMIN: tl.constexpr = -QMAX - 1
        scale = tl.maximum(tl.div_rn(tl.max(tl.abs(x), axis=0) * clip, QMAX), MIN_SCALE)
        q = tl.minimum(tl.maximum(round_half_even(tl.div_rn(x, scale)), QMIN), QMAX)
        y = q * scale
    else:
        hi = tl.maximum(tl.max(x, axis=0), 0.0) * clip
        lo = tl.minimum(tl.min(x, axis=0), 0.0) * clip
        scale = tl.maximum(tl.div_rn(hi - lo, QMAX), MIN_SCALE)
        zero = round_half_even(tl.div_rn(-lo, scale))
        q = tl.minimum(tl.maximum(round_half_even(tl.div_rn(x, scale)) + zero, 0.0), QMAX)
        y = (q - zero) * scale
    tl.store(row_ptr(y_ptr, row, G) + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def fake_quantize(x: torch.Tensor, bits: int, symmetric: bool, group_size: int | None = None,
                  clip_ratio: float = 1.0) -> torch.Tensor:
    """Quantize-dequantize ``x`` [..., K] per token (per group of ``group_size`` along K); see the module doc."""
    if not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be 2..8, got {bits}")
    k = x.shape[-1]
    g = group_size or k
    if k % g:
        raise ValueError(f"group_size {g} does not divide the last dimension {k}")
    if g > MAX_GROUP:
        raise ValueError(f"groups of {g} values exceed the one-tile quantizer ({MAX_GROUP})")
    x2 = x.reshape(-1, g)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.empty_like(x2)
    rows = x2.shape[0]
    if rows == 0:
        return y.reshape(x.shape)
    block = triton.next_power_of_2(g)
    qmax = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    # no FMA contraction: ``hi - lo`` with ``hi = max * clip`` must round the product first, as the graph's Mul
    # then Sub do (a fused multiply-add broke bit-exactness on the GPU: 2-bit asym, clip 0.9)
    opts = {} if interpreting() else {"num_warps": 4 if block <= 2048 else 8 if block <= 8192 else 16,
                                      "enable_fp_fusion": False}
    _fake_quant_kernel[(rows,)](x2, y, g, float(clip_ratio), QMAX=qmax, SYM=bool(symmetric), BLOCK=block, **opts)
    return y.reshape(x.shape)
