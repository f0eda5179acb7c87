"""A linear's weight as the learned passes train it: a parametrization that returns the fake-quantized weight.

One class covers every method's parameter set, as options (``torch.nn.utils.parametrize`` puts it on the
module, so the decoder layer runs unchanged and autograd reaches the parameters):

* **adjust** - what changes the float weight before rounding:
  - ``svd`` (LSI, SDE): ``W' = W + U D V^T`` with ``W = U diag(s) V^T`` (SVD once, float64) and ``D`` learnable,
    zero at init. ``D`` holds the main diagonal (LSI's ``delta sigma``), ``band`` off-diagonals on each side
    (SDE's expansion of the diagonal) and a dense ``corner`` x ``corner`` block over the largest singular
    values (LSI's remedy for group-wise scales). Our reading of the unpublished details: entries are learned in
    units of ``sqrt(s_i s_j)`` (so one learning rate suits every layer and every singular value), and adding
    ``U D V^T`` to the stored ``W`` (rather than rebuilding ``U diag(s) V^T``) keeps ``W'`` bit-equal to ``W`` at
    init.
  - ``lora`` (DL-QAT, BiSup's low-rank compensation): ``W' = W + B A``, ``B`` zero at init, ``A`` Gaussian
    with std ``1/sqrt(in)``; merged before rounding, so it costs nothing at run time.
  - ``column_scale`` (BiSup's smoothing): ``W' = (W + adjust) * exp(t)`` per input column, ``t`` shared with the
    norm that feeds the linear (which gets ``exp(-t)``); owned by the caller, passed in.
* **scales** - where the grid comes from:
  - ``"learned"`` (LWC, OmniQuant): per group ``hi = sigmoid(a) max(W')``, ``lo = sigmoid(b) min(W')``,
    ``a = b = 4`` at init (OmniQuant's), scale and zero point from them as in ``quant.grid``;
  - ``"fixed"`` (DL-QAT): the scales and zero points of ``init`` (a :class:`QuantizedWeight`, e.g. GPTQ's), or
    min/max ones of ``W`` if none.
* **magnitude** (DL-QAT): a learnable multiplier ``alpha`` per group, 1 at init, applied after rounding:
  ``W_hat = alpha * s * (q - z)`` with ``q = clamp(round(W'/s) + z)``.

Rounding is straight-through (:func:`qcompile.quant.activations.round_ste`). :meth:`LearnedWeight.export` turns
the trained state into an ordinary :class:`QuantizedWeight` (integers, scales ``alpha * s``, zero points): the
exported graph is the same kind as an RTN graph, and ``export(...).dequantize()`` equals the weight the
parametrization computes, bit for bit, without autograd.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qcompile.quant.activations import round_ste
from qcompile.quant.grid import QuantizedWeight, QuantSpec, compute_qparams

LWC_INIT = 4.0  # sigmoid(4) = 0.982, OmniQuant's initial clipping


class LearnedWeight(nn.Module):
    def __init__(
        self,
        weight: torch.Tensor,
        spec: QuantSpec,
        *,
        scales: str = "learned",
        init: QuantizedWeight | None = None,
        svd_band: int | None = None,
        svd_corner: int = 0,
        lora_rank: int = 0,
        magnitude: bool = False,
        column_scale: torch.Tensor | None = None,
        name: str = "weight",
        seed: int = 0,
    ):
        super().__init__()
        if scales not in ("learned", "fixed"):
            raise ValueError(f"scales must be 'learned' or 'fixed', got {scales!r}")
        w = weight.detach().float()
        out_f, in_f = w.shape
        self.spec, self.name, self.scales_mode = spec, name, scales
        self.ngroups = spec.groups(in_f, name)
        self.column_scale = column_scale  # not registered: owned (and optimised) by the caller
        if scales == "learned":
            self.clip_hi = nn.Parameter(torch.full((out_f, self.ngroups), LWC_INIT, device=w.device))
            self.clip_lo = None if spec.symmetric else nn.Parameter(torch.full_like(self.clip_hi, LWC_INIT))
        else:
            if init is not None:
                scale, zero = init.scale.to(w.device), None if init.zero is None else init.zero.to(w.device)
            else:
                scale, zero = compute_qparams(w, spec, 1.0, name)
            self.register_buffer("scale", scale.float())
            self.register_buffer("zero", None if zero is None else zero.float())
        self.alpha = nn.Parameter(torch.ones(out_f, self.ngroups, device=w.device)) if magnitude else None

        self.svd = svd_band is not None
        if self.svd:
            u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
            r = s.numel()
            rows, cols = [], []
            for k in range(-svd_band, svd_band + 1):
                idx = torch.arange(max(0, -k), min(r, r - k))
                rows.append(idx)
                cols.append(idx + k)
            rows, cols = torch.cat(rows), torch.cat(cols)
            c = min(svd_corner, r)
            if c:
                cr, cc = torch.meshgrid(torch.arange(c), torch.arange(c), indexing="ij")
                keys = set(zip(rows.tolist(), cols.tolist()))
                extra = [(i, j) for i, j in zip(cr.flatten().tolist(), cc.flatten().tolist()) if (i, j) not in keys]
                if extra:
                    rows = torch.cat([rows, torch.tensor([e[0] for e in extra])])
                    cols = torch.cat([cols, torch.tensor([e[1] for e in extra])])
            self.register_buffer("u", u.float())
            self.register_buffer("v", vh.float())  # [r, in]
            self.register_buffer("d_rows", rows.to(w.device))
            self.register_buffer("d_cols", cols.to(w.device))
            self.register_buffer("d_unit", torch.sqrt(s[rows] * s[cols]).float().to(w.device))
            self.d = nn.Parameter(torch.zeros(rows.numel(), device=w.device))
            self.rank = r
        self.lora_rank = lora_rank
        if lora_rank:
            g = torch.Generator().manual_seed(seed)
            self.lora_a = nn.Parameter((torch.randn(lora_rank, in_f, generator=g) / math.sqrt(in_f)).to(w.device))
            self.lora_b = nn.Parameter(torch.zeros(out_f, lora_rank, device=w.device))

    # -- the float weight before rounding ---------------------------------------------------------------
    def adjusted(self, w: torch.Tensor) -> torch.Tensor:
        w = w.float()
        if self.svd:
            d = torch.zeros(self.rank, self.rank, device=w.device, dtype=torch.float32)
            d = d.index_put((self.d_rows, self.d_cols), self.d * self.d_unit)
            w = w + self.u @ d @ self.v
        if self.lora_rank:
            w = w + self.lora_b @ self.lora_a
        if self.column_scale is not None:
            w = w * torch.exp(self.column_scale).unsqueeze(0)
        return w

    def _qparams(self, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale and zero point ``[out, groups]`` for the grouped adjusted weight ``wg`` [out, groups, size]."""
        spec = self.spec
        if self.scales_mode == "fixed":
            return self.scale, self.zero
        if spec.symmetric:
            amax = wg.abs().amax(-1) * torch.sigmoid(self.clip_hi)
            return (amax / spec.qmax).clamp(min=1e-8), None
        hi = wg.amax(-1).clamp(min=0) * torch.sigmoid(self.clip_hi)
        lo = wg.amin(-1).clamp(max=0) * torch.sigmoid(self.clip_lo)
        scale = ((hi - lo) / spec.qmax).clamp(min=1e-8)
        zero = round_ste(-lo / scale).clamp(0, spec.qmax)
        return scale, zero

    def _quantize(self, w: torch.Tensor):
        """(integers as float, effective scale, zero) of the adjusted weight ``w``."""
        out_f, in_f = w.shape
        wg = w.reshape(out_f, self.ngroups, in_f // self.ngroups)
        scale, zero = self._qparams(wg)
        q = round_ste(wg / scale.unsqueeze(-1))
        if zero is not None:
            q = q + zero.unsqueeze(-1)
        q = q.clamp(self.spec.qmin, self.spec.qmax)
        eff = scale if self.alpha is None else scale * self.alpha
        return q, eff, zero

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # float32 even inside the end-to-end engine's bfloat16 autocast: the adjustment's matmuls (U D V^T, B A)
        # decide roundings, and they must be the ones export() computes
        with torch.autocast(device_type=w.device.type, enabled=False):
            return self._fake_quant(w)

    def _fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        q, eff, zero = self._quantize(self.adjusted(w))
        if zero is not None:
            q = q - zero.unsqueeze(-1)
        return (q * eff.unsqueeze(-1)).reshape(w.shape).to(w.dtype)

    @torch.no_grad()
    def export(self, w: torch.Tensor) -> QuantizedWeight:
        """The trained state as integers, scales (``alpha * s``) and zero points; its ``dequantize()`` is what
        :meth:`forward` computes (checked)."""
        q, eff, zero = self._quantize(self.adjusted(w))
        qw = QuantizedWeight(q.reshape(w.shape).to(torch.int16), eff, zero, self.spec)
        if not torch.equal(qw.dequantize(), self.forward(w).float().cpu()):
            raise RuntimeError(f"internal error: the exported grid of {self.name} does not reproduce the "
                               "trained weight")
        return qw

    def penalty(self, w: torch.Tensor) -> torch.Tensor:
        """``||W' - W||^2 / ||W||^2``: how far the adjustment moved the float weight (SDE's regulariser)."""
        w = w.float()
        return (self.adjusted(w) - w).pow(2).sum() / w.pow(2).sum().clamp(min=1e-12)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name (CPU copies): with the same weight, spec and options,
        :meth:`load_trained_state` rebuilds this parametrization (the SVD factors are recomputed, not stored)."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.named_parameters()}

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        if set(state) != set(params) or any(state[n].shape != p.shape for n, p in params.items()):
            raise ValueError(f"saved parameters of {self.name} ({', '.join(sorted(state))}) do not fit this "
                             f"parametrization ({', '.join(sorted(params))})")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by kind, so a pass can give each kind its own learning rate."""
        groups: dict[str, list[nn.Parameter]] = {"clip": [], "adjust": [], "magnitude": []}
        if self.scales_mode == "learned":
            groups["clip"] += [p for p in (self.clip_hi, self.clip_lo) if p is not None]
        if self.svd:
            groups["adjust"].append(self.d)
        if self.lora_rank:
            groups["adjust"] += [self.lora_a, self.lora_b]
        if self.alpha is not None:
            groups["magnitude"].append(self.alpha)
        return {k: v for k, v in groups.items() if v}
