"""Canonicalize: fold RMSNorm scales into the linears that read them; untie embeddings when asked.

``RMSNorm(x) * g`` followed by ``W`` equals ``RMSNorm(x)`` followed by ``W diag(g)``, so the norm's scale moves
into the columns of q/k/v (input norm), gate/up (post-attention norm) and lm_head (final norm, which needs an
untied lm_head). The function is preserved to float tolerance (folded in float64). Rotations need it; for
weight-only recipes it is optional, because it rescales the weight columns that are then quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.models.handle import ModelHandle


@dataclass
class CanonicalizeConfig:
    fuse_norms: bool = True
    untie_embeddings: bool = False


def _fold(norm: torch.nn.Module, linears: list[torch.nn.Linear]) -> None:
    g = norm.weight.detach().double()
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * g.unsqueeze(0)).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


@torch.no_grad()
def apply(handle: ModelHandle, config: CanonicalizeConfig) -> dict:
    if handle.quant_state:
        raise RuntimeError("canonicalize must run before any quantization pass")
    ad, model = handle.adapter, handle.model
    untied = handle.untie_embeddings() if config.untie_embeddings else False
    fused = 0
    if config.fuse_norms:
        for layer in ad.layers(model):
            for norm, linears in ad.norm_consumers(layer):
                _fold(norm, linears)
                fused += 1
        if not ad.ties_embeddings(model):
            _fold(ad.final_norm(model), [ad.lm_head(model)])
            fused += 1
    return {"norms_fused": fused, "untied_embeddings": untied}


Config = CanonicalizeConfig
