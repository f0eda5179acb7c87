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

Training passes (the learned ones in ``qcompile.learn``) need two more things from the torch side:

* **Straight-through rounding.** When autograd records (``x.requires_grad`` under grad mode), the rounding passes
  gradients through as if it were the identity (STE); otherwise the values are bit-identical to plain rounding.
* **A float reference.** :func:`runtime_quant_disabled` turns every run-time quantizer (activation hooks, the KV
  cache) into the identity for the ``with`` block, so the same module computes the float teacher.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from qcompile.errors import RecipeError
from qcompile.quant.grid import check_bits_and_group, int_range

MIN_SCALE = 1e-8
_disabled = 0  # nesting depth of runtime_quant_disabled()


@contextlib.contextmanager
def runtime_quant_disabled():
    """Run-time quantizers (activations, KV cache) compute the identity inside the block (float teacher)."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def runtime_quant_enabled() -> bool:
    return _disabled == 0


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)``; under autograd its gradient is the identity's (straight-through). Without autograd the
    result is ``torch.round(x)`` itself, bit for bit."""
    r = torch.round(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return x + (r - x).detach()
    return r


@dataclass(frozen=True)
class TokenQuantSpec:
    """How a run-time tensor is quantized: bits, symmetry, group size along the last dim, clip ratio."""

    bits: int = 8
    symmetric: bool = True
    group_size: int | None = None  # None: one group per token (the whole last dimension)
    clip_ratio: float = 1.0

    def __post_init__(self):
        check_bits_and_group(self.bits, self.group_size, what="activation/KV")
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


def token_spec(where: str, bits: int, symmetric: bool, group_size: int | None, clip_ratio: float) -> TokenQuantSpec:
    """A :class:`TokenQuantSpec` whose errors name ``where`` (the pass whose fields these are)."""
    try:
        return TokenQuantSpec(bits, symmetric, group_size, clip_ratio)
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None


def fake_quantize_tokens(
    x: torch.Tensor, spec: TokenQuantSpec, what: str = "tensor", clip: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize-dequantize ``x`` along its last dimension (see the module docstring); computed in float32,
    returned in ``x``'s dtype. ``clip`` (a scalar tensor, e.g. one being learned) replaces ``spec.clip_ratio``."""
    if not runtime_quant_enabled():
        return x
    shape = x.shape
    g = spec.group(shape[-1], what)
    xg = x.float().reshape(*shape[:-1], shape[-1] // g, g)
    ratio = spec.clip_ratio if clip is None else clip
    if spec.symmetric:
        scale = (xg.abs().amax(-1, keepdim=True) * ratio / spec.qmax).clamp(min=MIN_SCALE)
        q = round_ste(xg / scale).clamp(spec.qmin, spec.qmax)
        out = q * scale
    else:
        hi = xg.amax(-1, keepdim=True).clamp(min=0) * ratio
        lo = xg.amin(-1, keepdim=True).clamp(max=0) * ratio
        scale = ((hi - lo) / spec.qmax).clamp(min=MIN_SCALE)
        zero = round_ste(-lo / scale)
        q = (round_ste(xg / scale) + zero).clamp(spec.qmin, spec.qmax)
        out = (q - zero) * scale
    return out.reshape(shape).to(x.dtype)
