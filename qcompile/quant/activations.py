"""Dynamic quantization of activations and of the KV cache: per token (optionally per group), scales computed
from the data at run time.

One definition, two implementations that must agree: :func:`fake_quantize_tokens` here (torch, what the
fake-quant model and the passes compute with) and ``qcompile.graph.quant_nodes.fake_quantize_tokens`` (the same
arithmetic as ONNX nodes). Both compute, along the last dimension in groups of ``group_size``:

* symmetric: ``s = clip * max|x| / qmax``, ``q = clamp(round(x / s), -2^(b-1), 2^(b-1)-1)``, ``x' = q * s``;
* asymmetric: ``hi = clip * max(max x, 0)``, ``lo = clip * min(min x, 0)``, ``s = (hi - lo) / qmax``,
  ``z = round(-lo / s)``, ``q = clamp(round(x / s) + z, 0, 2^b - 1)``, ``x' = (q - z) * s``;

with ``s`` floored at :data:`MIN_SCALE` so an all-zero group stays zero instead of dividing by zero, and
round-half-to-even in both (``torch.round`` and ONNX ``Round``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.errors import RecipeError
from qcompile.quant.grid import MAX_BITS, MIN_BITS, int_range

MIN_SCALE = 1e-8


@dataclass(frozen=True)
class TokenQuantSpec:
    """How a run-time tensor is quantized: bits, symmetry, group size along the last dim, clip ratio."""

    bits: int = 8
    symmetric: bool = True
    group_size: int | None = None  # None: one group per token (the whole last dimension)
    clip_ratio: float = 1.0

    def __post_init__(self):
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise RecipeError(f"activation/KV bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise RecipeError(f"activation/KV group_size must be a positive integer or null, got {self.group_size!r}")
        if not isinstance(self.clip_ratio, (int, float)) or not 0 < self.clip_ratio <= 1:
            raise RecipeError(f"clip_ratio must be in (0, 1], got {self.clip_ratio!r}")

    @property
    def qmin(self) -> int:
        return int_range(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits, self.symmetric)[1]

    def group(self, dim: int, what: str) -> int:
        """The group size for a last dimension of ``dim``; one that does not divide it is an error."""
        g = self.group_size or dim
        if dim % g:
            raise RecipeError(f"{what}: group_size {g} does not divide its last dimension {dim}")
        return g

    def describe(self) -> str:
        g = "per-token" if self.group_size is None else f"g{self.group_size}"
        clip = "" if self.clip_ratio == 1 else f" clip {self.clip_ratio:g}"
        return f"int{self.bits} {'sym' if self.symmetric else 'asym'} {g}{clip}"

    def to_dict(self) -> dict:
        return {"bits": self.bits, "symmetric": self.symmetric, "group_size": self.group_size,
                "clip_ratio": self.clip_ratio}


def fake_quantize_tokens(x: torch.Tensor, spec: TokenQuantSpec, what: str = "tensor") -> torch.Tensor:
    """Quantize-dequantize ``x`` along its last dimension (see the module docstring); computed in float32,
    returned in ``x``'s dtype."""
    shape = x.shape
    g = spec.group(shape[-1], what)
    xg = x.float().reshape(*shape[:-1], shape[-1] // g, g)
    if spec.symmetric:
        scale = (xg.abs().amax(-1, keepdim=True) * spec.clip_ratio / spec.qmax).clamp(min=MIN_SCALE)
        q = torch.round(xg / scale).clamp(spec.qmin, spec.qmax)
        out = q * scale
    else:
        hi = xg.amax(-1, keepdim=True).clamp(min=0) * spec.clip_ratio
        lo = xg.amin(-1, keepdim=True).clamp(max=0) * spec.clip_ratio
        scale = ((hi - lo) / spec.qmax).clamp(min=MIN_SCALE)
        zero = torch.round(-lo / scale)
        q = (torch.round(xg / scale) + zero).clamp(spec.qmin, spec.qmax)
        out = (q - zero) * scale
    return out.reshape(shape).to(x.dtype)
