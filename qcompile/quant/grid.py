"""The integer grid every weight quantizer shares.

Conventions (the same numbers are written into the ONNX graph, so torch fake-quant and ORT agree bit for bit):

* weights are ``[out_features, in_features]``; groups run along the input dimension, ``group_size`` columns each
  (``None`` = one group per output row, i.e. per-channel);
* symmetric: signed integers in ``[-2^(b-1), 2^(b-1)-1]``, no zero point, ``w ~ s * q``;
* asymmetric: unsigned integers in ``[0, 2^b-1]`` with an integer zero point, ``w ~ s * (q - z)``;
  the range always contains 0 so that ``z`` fits the same unsigned type (ONNX ``DequantizeLinear`` requires it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.errors import RecipeError

MIN_BITS, MAX_BITS = 2, 8


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer grid of ``bits``: signed ``[-2^(b-1), 2^(b-1)-1]`` if symmetric, else unsigned ``[0, 2^b-1]``."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def check_bits_and_group(bits, group_size, what: str = "", null_means: str = "") -> None:
    """Refuse bits outside MIN_BITS..MAX_BITS and a group size that is neither a positive integer nor None
    (``what`` names the tensor kind in the message, ``null_means`` says what None stands for)."""
    prefix = f"{what} " if what else ""
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise RecipeError(f"{prefix}bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        null = f" ({null_means})" if null_means else ""
        raise RecipeError(f"{prefix}group_size must be a positive integer or null{null}, got {group_size!r}")


@dataclass(frozen=True)
class QuantSpec:
    """How one weight tensor is quantized: bit width, symmetry, group size along the input dimension."""

    bits: int = 4
    symmetric: bool = False
    group_size: int | None = 64

    def __post_init__(self):
        check_bits_and_group(self.bits, self.group_size, null_means="per-channel")

    @property
    def qmin(self) -> int:
        return int_range(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits, self.symmetric)[1]

    def groups(self, in_features: int, name: str = "weight") -> int:
        """Number of groups per row; a group size that does not divide the row is an error naming the tensor."""
        if self.group_size is None:
            return 1
        if in_features % self.group_size:
            divisors = [d for d in (16, 32, 64, 128, 256) if in_features % d == 0]
            raise RecipeError(
                f"group_size {self.group_size} does not divide in_features {in_features} of {name}; "
                f"group sizes that fit this model: {divisors or 'none of 16..256'} (or null for per-channel)"
            )
        return in_features // self.group_size

    def describe(self) -> str:
        g = "per-channel" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits} {'sym' if self.symmetric else 'asym'} {g}"


def _grouped(w: torch.Tensor, spec: QuantSpec, name: str) -> torch.Tensor:
    out_f, in_f = w.shape
    ng = spec.groups(in_f, name)
    return w.reshape(out_f, ng, in_f // ng)


def compute_qparams(
    w: torch.Tensor, spec: QuantSpec, clip: float | torch.Tensor = 1.0, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min/max scales (and zero points) per group, shrunk by ``clip`` (a float or a ``[out, groups]`` tensor).

    Returns ``scale`` as float32 ``[out, groups]`` and ``zero`` as float32 integers ``[out, groups]`` (None if
    symmetric).
    """
    g = _grouped(w.detach().float(), spec, name)
    if spec.symmetric:
        amax = g.abs().amax(-1) * clip
        scale = (amax / spec.qmax).clamp(min=1e-10)
        return scale, None
    wmax = g.amax(-1).clamp(min=0) * clip
    wmin = g.amin(-1).clamp(max=0) * clip
    scale = ((wmax - wmin) / spec.qmax).clamp(min=1e-10)
    zero = torch.round(-wmin / scale).clamp(0, spec.qmax)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Integers on the grid, shape of ``w``, dtype int16 (wide enough for signed and unsigned 8-bit)."""
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, scale.shape[1], -1)
    q = torch.round(g / scale.unsqueeze(-1))
    if zero is not None:
        q = q + zero.unsqueeze(-1)
    return q.clamp(spec.qmin, spec.qmax).reshape(out_f, in_f).to(torch.int16)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Float32 weights ``s * (q - z)``, computed exactly as ONNX ``DequantizeLinear`` does."""
    out_f, in_f = q.shape
    g = q.float().reshape(out_f, scale.shape[1], -1)
    if zero is not None:
        g = g - zero.unsqueeze(-1)
    return (g * scale.unsqueeze(-1)).reshape(out_f, in_f)


def fake_quantize(w: torch.Tensor, spec: QuantSpec, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    scale, zero = compute_qparams(w, spec, clip)
    return dequantize(quantize(w, scale, zero, spec), scale, zero).to(w.dtype)


@dataclass
class QuantizedWeight:
    """The quantized state of one linear weight: what export writes and what torch fake-quant computes with.

    ``qweight`` int16 ``[out, in]`` on the grid of ``spec``; ``scale`` float32 ``[out, groups]``; ``zero`` float32
    integers ``[out, groups]`` or None (symmetric).
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec

    def __post_init__(self):
        self.qweight = self.qweight.detach().to("cpu", torch.int16)
        self.scale = self.scale.detach().to("cpu", torch.float32)
        self.zero = None if self.zero is None else self.zero.detach().to("cpu", torch.float32)

    @classmethod
    def from_float(cls, w: torch.Tensor, spec: QuantSpec, clip: float | torch.Tensor = 1.0, name: str = "weight"):
        scale, zero = compute_qparams(w, spec, clip, name)
        return cls(quantize(w, scale, zero, spec), scale, zero, spec)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.zero)

    @property
    def nbytes(self) -> int:
        """Bytes as stored in the graph: packed integers (4-bit containers for <=4 bits) plus scales/zeros."""
        container = 4 if self.spec.bits <= 4 else 8
        n = self.qweight.numel() * container // 8 + self.scale.numel() * 4
        if self.zero is not None:
            n += self.zero.numel() * container // 8
        return n


def search_clip(
    w: torch.Tensor, spec: QuantSpec, steps: int = 100, max_shrink: float = 0.8, norm: float = 2.4,
    name: str = "weight",
) -> torch.Tensor:
    """Per-group clip ratio minimising ``sum |Q(w) - w|^norm`` over a grid of shrink factors.

    The search GPTQ's reference code runs with ``mse=True`` (norm 2.4, 100 steps, shrink down to 0.2); used by
    RTN and GPTQ when ``mse_clip`` is on. Returns float32 ``[out, groups]``.
    """
    wf = w.detach().float()
    out_f, in_f = wf.shape
    ng = spec.groups(in_f, name)
    best_err = torch.full((out_f, ng), float("inf"), device=wf.device)
    best_clip = torch.ones((out_f, ng), device=wf.device)
    grouped = wf.reshape(out_f, ng, -1)
    for i in range(int(max_shrink * steps)):
        c = 1.0 - i / steps
        scale, zero = compute_qparams(wf, spec, c, name)
        err = (dequantize(quantize(wf, scale, zero, spec), scale, zero).reshape(out_f, ng, -1) - grouped)
        err = err.abs().pow(norm).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_clip = torch.where(better, torch.full_like(best_clip, c), best_clip)
    return best_clip
