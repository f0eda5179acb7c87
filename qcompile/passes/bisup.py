"""BiSup: quantization-aware parameter-efficient fine-tuning against vertical error accumulation (arXiv
2405.15346). Its other half, prompt mixed precision (the system prompt's KV cache kept in float), is
``kv_quant.prefix``: the graph keeps the first P cache positions float, ``qcompile run`` reports the system
prompt against P, and ``qcompile eval --system-prompt`` measures text that follows a fixed system prompt.

The fine-tuning runs with the whole quantized model in the loop (:mod:`qcompile.learn.end_to_end`: KL to the
float model's output distribution on calibration text), over BiSup's three small parameter spaces:

* **fine-grained clipping**: weights - one learnable magnitude per group (``alpha_g``, the group's clipping
  range scaled; with ``scales: learned`` OmniQuant-style learned clipping instead); activations - one clip
  ratio per quantized input (shared by the linears that read it: q/k/v, gate/up), projected to [0.3, 1] after
  every step and exported as that quantizer's ``clip_ratio``;
* **soft-constrained smoothing**: a per-channel scale ``exp(t)`` between each norm and the linears it feeds
  (``W <- W diag(exp(t))``, norm weight ``<- g * exp(-t)``), regularised by ``smooth_penalty * mean(t^2)``
  instead of SmoothQuant's hard formula; the norm keeps its place in the graph (its weight changes);
* **stabilised low-rank compensation**: ``W + B A`` (``B`` zero at init) merged *before* rounding, so it costs
  nothing at run time.

Readings we chose (the paper leaves them open): initial grid from the previous quantizer when it has the same
spec (the recipes run rotation + GPTQ first, so BiSup starts from the rotation baseline), else RTN; LoRA rank
8; two epochs over 128 x 2048 validation tokens; AdamW. Everything trained merges into the weights, scales,
norm weights and activation clip ratios: no new kind of run-time op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from qcompile.errors import RecipeError, require_int
from qcompile.learn.end_to_end import EndToEndConfig, train_end_to_end
from qcompile.learn.extras import ActivationClipping, Extra
from qcompile.learn.weights import LearnedWeight
from qcompile.models.handle import ModelHandle


@dataclass
class BiSupConfig(EndToEndConfig):
    lora_rank: int = 8
    scales: str = "fixed"  # "fixed" (grid of the previous quantizer, times a learned magnitude) or "learned"
    act_clip: bool = True
    smoothing: bool = True
    smooth_penalty: float = 1e-2
    lr_act_clip: float = 1e-3
    lr_smooth: float = 1e-3
    lr_adjust: float = 2e-4
    lr_magnitude: float = 5e-4

    def __post_init__(self):
        super().__post_init__()
        if self.scales not in ("fixed", "learned"):
            raise RecipeError(f"bisup scales must be 'fixed' or 'learned', got {self.scales!r}")
        require_int(self.lora_rank, "bisup lora_rank")


Config = BiSupConfig


class _DivideByExp(nn.Module):
    """Norm-weight parametrization ``g -> g * exp(-t)``."""

    def __init__(self, t: nn.Parameter):
        super().__init__()
        self.t = t

    def forward(self, g):
        return g * torch.exp(-self.t).to(g.dtype)


class Smoothing(Extra):
    """A learnable per-channel scale between each norm and the linears it feeds (all of them targeted)."""

    def __init__(self, handle: ModelHandle, targeted: set[str], lr: float, penalty: float):
        self.handle, self.lr, self.weight = handle, lr, penalty
        self.pairs: list[tuple[nn.Module, list[str], nn.Parameter]] = []
        ad = handle.adapter
        names = {m: n for n, m in handle.model.named_modules()}
        for layer in ad.layers(handle.model):
            for norm, linears in ad.norm_consumers(layer):
                lin_names = [names[m] for m in linears]
                if all(n in targeted for n in lin_names):
                    t = nn.Parameter(torch.zeros(norm.weight.shape[0]))
                    self.pairs.append((norm, lin_names, t))

    def column_scale(self, name: str) -> nn.Parameter | None:
        return next((t for _, names, t in self.pairs if name in names), None)

    def install(self, device):
        for norm, _, t in self.pairs:
            t.data = t.data.to(device)
            parametrize.register_parametrization(norm, "weight", _DivideByExp(t))

    def param_groups(self):
        return {"smooth": [t for _, _, t in self.pairs]} if self.pairs else {}

    def learning_rates(self):
        return {"smooth": self.lr}

    def penalty(self):
        if not self.pairs:
            return 0.0
        return self.weight * sum(t.pow(2).mean() for _, _, t in self.pairs) / len(self.pairs)

    def finalize(self, handle):
        scales = [t.detach().abs().max().item() for _, _, t in self.pairs]
        for norm, _, _ in self.pairs:
            parametrize.remove_parametrizations(norm, "weight", leave_parametrized=True)
        return {"smoothing_max_abs_log_scale": max(scales) if scales else 0.0, "smoothed_norms": len(scales)}

    def uninstall(self):
        for norm, _, _ in self.pairs:
            if parametrize.is_parametrized(norm, "weight"):
                parametrize.remove_parametrizations(norm, "weight", leave_parametrized=False)


def apply(handle: ModelHandle, config: BiSupConfig) -> dict:
    from qcompile.quant.targets import targets

    targeted = {name for name, _, _, _ in targets(handle, config)}
    extras: list[Extra] = []
    smoothing = None
    if config.smoothing:
        smoothing = Smoothing(handle, targeted, config.lr_smooth, config.smooth_penalty)
        extras.append(smoothing)
    if config.act_clip and handle.act_quant:
        extras.append(ActivationClipping(handle, config.lr_act_clip))

    def make(name, module, spec, init):
        return LearnedWeight(
            module.weight, spec, scales=config.scales, init=init, lora_rank=config.lora_rank,
            magnitude=config.scales == "fixed", name=name, seed=config.seed,
            column_scale=None if smoothing is None else smoothing.column_scale(name),
        )

    return train_end_to_end(handle, config, make, "bisup", extras=extras)
