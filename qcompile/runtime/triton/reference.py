"""Pure-torch references of every Triton kernel: plain, slow, float32/float64, written from the definitions.

The kernels must match these (tests compare them with ``TRITON_INTERPRET=1`` on CPU and compiled on CUDA). Each
function states the convention the kernel implements, so this file doubles as the kernels' specification.
"""

from __future__ import annotations

import math

import torch

from qcompile.quant import hadamard
from qcompile.runtime.triton.packing import PackedIntWeight, PackedWeight

MIN_SCALE = 1e-8  # qcompile.quant.activations.MIN_SCALE

# -- weight-only ------------------------------------------------------------------------------------------------


def unpack_words(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [K, N] unsigned codes from words [K / (32 / bits), N] (code j of a word in bits j*b .. j*b + b - 1)."""
    shifts = (torch.arange(32 // bits, device=qweight.device) * bits).view(1, -1, 1)
    codes = (qweight.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1, qweight.shape[-1])


def unpack_codes(pw: PackedWeight) -> torch.Tensor:
    """int32 [K, N] unsigned codes from the packed words."""
    return unpack_words(pw.qweight, pw.bits).reshape(pw.in_features, pw.out_features)


def dequantize_packed(pw: PackedWeight) -> torch.Tensor:
    """float32 [K, N] = scale * (code - zero), zero = 2^(bits-1) for symmetric weights."""
    g = pw.group_size
    zero = (torch.full_like(pw.scale, 2 ** (pw.bits - 1), dtype=torch.float32) if pw.zero is None
            else pw.zero.float())
    codes = unpack_codes(pw).float()
    return (codes - zero.repeat_interleave(g, 0)) * pw.scale.float().repeat_interleave(g, 0)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up`` of a ``[.., 2I]`` tensor holding gate|up, in float32."""
    gate, up = x.float().chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


def wq_linear_ref(x: torch.Tensor, pw: PackedWeight, residual: torch.Tensor | None = None,
                  act: str | None = None) -> torch.Tensor:
    """``act(x) @ W (+ bias) (+ residual)`` in float32, returned in x's dtype. ``act="silu_mul"``: x holds gate|up."""
    xf = silu_mul(x) if act == "silu_mul" else x.float()
    y = xf @ dequantize_packed(pw)
    if pw.bias is not None:
        y = y + pw.bias.float()
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


# -- activations -------------------------------------------------------------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """As the exported graph: x / sqrt(mean(x^2) + eps) * weight, in float32."""
    xf = x.float()
    y = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.float()


def quantize_rows_ref(x: torch.Tensor, bits: int = 8, norm_weight: torch.Tensor | None = None,
                      eps: float = 1e-6, norm: bool = False, clip_ratio: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (row) symmetric quantization as ``qcompile.quant.activations`` defines it: ``scale =
    max(clip * max|x| / qmax, 1e-8)``, ``q = round(x / scale)`` (ties to even) clamped to ``[-2^(b-1), qmax]``,
    int8 container. With ``norm``, x is RMS-normalized first (times ``norm_weight`` if given), as the fused
    producer does. Returns (q int8 [M, K], scale float32 [M])."""
    xf = rms_norm_ref(x, norm_weight, eps) if norm else x.float()
    qmax = 2 ** (bits - 1) - 1
    scale = (xf.abs().amax(-1) * clip_ratio / qmax).clamp(min=MIN_SCALE)
    q = torch.round(xf / scale[:, None]).clamp(-qmax - 1, qmax)
    return q.to(torch.int8), scale


def unpack_int_weight(pw: PackedIntWeight) -> torch.Tensor:
    """int32 values v [N, K] of a PackedIntWeight."""
    if pw.bits == 8:
        return pw.qweight.to(torch.int32)
    n, h = pw.out_features, pw.half
    b = pw.qweight.to(torch.int32).view(n, -1, h)
    lo, hi = b & 15, b >> 4
    return torch.stack([lo, hi], 2).reshape(n, pw.in_features) - 8


def int_linear_ref(xq: torch.Tensor, xs: torch.Tensor, pw: PackedIntWeight,
                   out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``xs[m] * sum_k xq[m, k] * scale[g(k), n] * (v[n, k] - zero[g(k), n])`` (+ bias), in float64."""
    g = pw.group_size
    v = unpack_int_weight(pw).double().t()  # [K, N]
    if pw.zero is not None:
        v = v - pw.zero.double().repeat_interleave(g, 0)
    w = v * pw.scale.double().repeat_interleave(g, 0)
    y = (xq.double() @ w) * xs.double()[:, None]
    if pw.bias is not None:
        y = y + pw.bias.double()
    return y.to(out_dtype)


# -- Hadamard ----------------------------------------------------------------------------------------------------


def sylvester(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order n = 2^k (H_2n = [[H, H], [H, -H]]; symmetric)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester order must be a power of two, got {n}")
    return torch.from_numpy(hadamard.sylvester(n)).to(dtype=dtype, device=device)


def hadamard_ref(x: torch.Tensor, left: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """``x @ kron(left, H_p) * scale`` along the last dim (p = n / m, m = left's order; default scale 1/sqrt(n),
    which makes the transform orthonormal), in float64, returned in x's dtype. Computed as ``left^T X H_p`` on the
    row viewed as X [m, p], which is the Kronecker product's definition without the dense n x n matrix."""
    n = x.shape[-1]
    m = 1 if left is None else left.shape[0]
    a = torch.ones(1, 1, dtype=torch.float64, device=x.device) if left is None else left.to(x.device).double()
    x3 = x.double().reshape(-1, m, n // m)
    y = torch.einsum("ji,bjp->bip", a, x3) @ sylvester(n // m, torch.float64, x.device)
    s = 1.0 / math.sqrt(n) if scale is None else scale
    return (y * s).reshape(x.shape).to(x.dtype)


# -- KV cache and attention --------------------------------------------------------------------------------------


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half RoPE: halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); cos/sin hold D/2 values."""
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def kv_quantize_ref(x: torch.Tensor, bits: int, symmetric: bool = False, clip_ratio: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token per head quantization over the head dim, the arithmetic of
    ``qcompile.quant.activations.fake_quantize_tokens`` (one group per token):

    * asymmetric: ``hi = clip * max(max x, 0)``, ``lo = clip * min(min x, 0)``, ``scale = max((hi - lo) / qmax,
      1e-8)``, ``zero = round(-lo / scale)``, ``code = clamp(round(x / scale) + zero, 0, 2^b - 1)``;
    * symmetric: ``scale = max(clip * max|x| / qmax, 1e-8)``, ``q = clamp(round(x / scale), -2^(b-1), qmax)``,
      stored as the unsigned code ``q + 2^(b-1)`` with ``zero = 2^(b-1)``;

    (round = ties to even); x ~ (code - zero) * scale. Returns (codes int32 [.., D], scale, zero float32 [..])."""
    xf = x.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (xf.abs().amax(-1) * clip_ratio / qmax).clamp(min=MIN_SCALE)
        mid = float(2 ** (bits - 1))
        codes = torch.round(xf / scale[..., None]).clamp(-mid, qmax) + mid
        return codes.to(torch.int32), scale, torch.full_like(scale, mid)
    qmax = 2**bits - 1
    hi = xf.amax(-1).clamp(min=0) * clip_ratio
    lo = xf.amin(-1).clamp(max=0) * clip_ratio
    scale = ((hi - lo) / qmax).clamp(min=MIN_SCALE)
    zero = torch.round(-lo / scale)
    codes = (torch.round(xf / scale[..., None]) + zero[..., None]).clamp(0, qmax)
    return codes.to(torch.int32), scale, zero


def kv_dequantize_ref(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes.float() - zero[..., None].float()) * scale[..., None]


def pack_kv_int4(codes: torch.Tensor) -> torch.Tensor:
    """[.., D] 4-bit codes -> [.., D/2] uint8: byte j = code[j] | code[j + D/2] << 4 (the halves RoPE splits)."""
    lo, hi = codes.chunk(2, -1)
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_kv_int4(packed: torch.Tensor) -> torch.Tensor:
    b = packed.to(torch.int32)
    return torch.cat([b & 15, b >> 4], -1)


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lens: torch.Tensor,
                         sm_scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """One query token per sequence against its cache, GQA (query head h reads kv head h // (Hq / Hkv)).

    q [B, Hq, D]; k_cache/v_cache float [B, Hkv, S, D] (already dequantized); lens [B] valid positions; with a
    sliding ``window`` only the last ``window`` positions are visible. Float64 softmax; returns q's dtype.
    """
    b_, hq, d = q.shape
    hkv = k_cache.shape[1]
    s = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    out = torch.empty_like(q)
    for b in range(b_):
        length = int(lens[b])
        start = 0 if window is None else max(0, length - window)
        k = k_cache[b, :, start:length].double().repeat_interleave(hq // hkv, 0)
        v = v_cache[b, :, start:length].double().repeat_interleave(hq // hkv, 0)
        p = torch.softmax((k @ q[b].double().unsqueeze(-1)).squeeze(-1) * s, -1)
        out[b] = (p.unsqueeze(1) @ v).squeeze(1).to(q.dtype)
    return out


def mixed_cache_ref(k_float: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                    prefix: torch.Tensor) -> torch.Tensor:
    """The float view of a mixed cache: positions < prefix[b] from the float prefix, the rest dequantized."""
    deq = kv_dequantize_ref(k_codes, k_scale, k_zero)
    out = deq.clone()
    for b in range(out.shape[0]):
        p = int(prefix[b])
        out[b, :, :p] = k_float[b, :, :p].float()
    return out
