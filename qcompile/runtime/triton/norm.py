"""RMSNorm as the exported graph computes it, one launch per call (decode runs it twice per layer).

``y = x * (1 / sqrt(mean(x^2) + eps)) * w`` in float32 with IEEE-rounded sqrt and division, output in x's dtype;
optionally also the fp16 output's digit planes (``gemv_digits``: the next GEMV reads those instead).
"""

from __future__ import annotations

import torch

from qcompile.runtime.triton._env import interpreting, require_triton
from qcompile.runtime.triton._tune import pdl_flag

triton = require_triton()
import triton.language as tl  # noqa: E402

from qcompile.runtime.triton._jit import check_planes, row_ptr, store_row_digit_planes  # noqa: E402
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: E402


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, p_ptr, N, stride_x, stride_y, eps, HAS_W: tl.constexpr,
                     BLOCK: tl.constexpr, PDL: tl.constexpr = False, PLANES: tl.constexpr = False):
    row = tl.program_id(0)
    if PDL:  # a programmatic dependent: release the next kernel, then wait for x (the kernel before's output)
        gdc_launch_dependents()
        gdc_wait()
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(row_ptr(x_ptr, row, stride_x) + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, axis=0) / N + eps))
    if HAS_W:
        y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = y.to(y_ptr.dtype.element_ty)
    tl.store(row_ptr(y_ptr, row, stride_y) + offs, y, mask=mask)
    if PLANES:
        store_row_digit_planes(p_ptr, y, N, BLOCK)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, pdl: bool = False,
             planes: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of x (rows of up to 65536 features); ``weight=None`` means a folded (unit) scale.
    ``pdl``: launched as a programmatic dependent (sm_90+; a plain launch under the interpreter). ``planes``: int8
    [8, N] that also receives the fp16 output's digit planes (one row, N a multiple of 64; ``gemv_digits``)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if planes is not None:
        if x.dtype != torch.float16 or x2.shape[0] != 1:
            raise ValueError(f"rms_norm: digit planes are written for one fp16 row, got x {x.dtype} "
                             f"{tuple(x.shape)}")
        check_planes(planes, n, x.device, "rms_norm")
    y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(n)
    if block > 65536:
        raise ValueError(f"rms_norm rows of {n} features exceed one tile (65536)")
    # 8 warps past 4096 features, and from 4096 with digit planes (their 64-bit digits spill 4 warps' registers)
    opts = {} if interpreting() else {"num_warps": 4 if block < 4096 or (block == 4096 and planes is None) else 8}
    pdl, launch = pdl_flag(pdl, x.device)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight if weight is not None else x2, y, planes if planes is not None else y,
                                     n, x2.stride(0), y.stride(0), float(eps), HAS_W=weight is not None, BLOCK=block,
                                     PDL=pdl, PLANES=planes is not None, **opts, **launch)
    return y.reshape(x.shape)
