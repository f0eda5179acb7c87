"""Trainable parameters outside the linears' weights, shared by the learning engines (end to end:
:mod:`qcompile.learn.end_to_end`; block-wise: :mod:`qcompile.learn.blockwise`).

:class:`ActivationClipping` is BiSup's fine-grained activation clipping: one clip ratio per quantized activation,
trained through the quantizer's straight-through rounding, projected to ``ACT_CLIP_RANGE`` after every step and
exported as that quantizer's ``clip_ratio`` (a constant the graph already has: no new run-time op).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from qcompile.models.handle import ModelHandle

ACT_CLIP_RANGE = (0.3, 1.0)


class Extra:
    """Trainable parameters outside the linears' weights (installed before training, folded in after)."""

    def install(self, device) -> None: ...

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {}

    def learning_rates(self) -> dict[str, float]:
        return {}

    def penalty(self) -> torch.Tensor | float:
        return 0.0

    def project(self) -> None:
        """Called after every optimiser step (keep parameters in their valid range)."""

    def finalize(self, handle: ModelHandle) -> dict:
        return {}

    def uninstall(self) -> None: ...


class ActivationClipping(Extra):
    """One learnable clip ratio per quantized activation (the linears reading one tensor share it: q/k/v,
    gate/up), starting from the quantizer's own; ``layers`` (default: every decoder layer) limits it to some."""

    def __init__(self, handle: ModelHandle, lr: float, layers: list[nn.Module] | None = None):
        self.handle, self.lr = handle, lr
        self.sites: list[tuple[list[str], nn.Parameter]] = []
        ad = handle.adapter
        names = {m: n for n, m in handle.model.named_modules()}
        for layer in ad.layers(handle.model) if layers is None else layers:
            for roles in (("q", "k", "v"), ("o",), ("gate", "up"), ("down",)):
                full = [names[ad.linear(layer, r)] for r in roles]
                full = [n for n in full if n in handle.act_quant]
                if full:
                    start = min(handle.act_quant[n].clip_ratio for n in full)
                    self.sites.append((full, nn.Parameter(torch.tensor(float(start)))))

    def install(self, device):
        for names, c in self.sites:
            c.data = c.data.to(device)
            for n in names:
                self.handle.model.get_submodule(n)._qcompile_act_clip = c

    def param_groups(self):
        return {"act_clip": [c for _, c in self.sites]} if self.sites else {}

    def learning_rates(self):
        return {"act_clip": self.lr}

    def project(self):
        with torch.no_grad():
            for _, c in self.sites:
                c.clamp_(*ACT_CLIP_RANGE)

    def learned(self) -> list[tuple[list[str], float]]:
        """The sites and their current ratios (JSON-ready: saved with a block for a resume)."""
        return [(list(names), float(c.detach().cpu())) for names, c in self.sites]

    def finalize(self, handle):
        sites = self.learned()
        set_clip_ratios(handle, sites)
        self.uninstall()
        return {"act_clip_ratios": clip_summary(sites)} if sites else {}

    def uninstall(self):
        for names, _ in self.sites:
            for n in names:
                m = self.handle.model.get_submodule(n)
                if hasattr(m, "_qcompile_act_clip"):
                    del m._qcompile_act_clip


def set_clip_ratios(handle: ModelHandle, sites: list[tuple[list[str], float]]) -> None:
    """Make learned ratios the activation quantizers' ``clip_ratio`` (what the exported graph computes)."""
    for names, ratio in sites:
        for n in names:
            handle.act_quant[n] = dataclasses.replace(handle.act_quant[n], clip_ratio=ratio)


def clip_summary(sites: list[tuple[list[str], float]]) -> dict:
    """min / mean / max over sites (a ratio shared by q/k/v counts once)."""
    ratios = [r for _, r in sites]
    return {"min": min(ratios), "mean": sum(ratios) / len(ratios), "max": max(ratios)} if ratios else {}
