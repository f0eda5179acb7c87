"""One adapter per model family: the only place that knows how a family names its layers and roles.

Passes, export and evaluation ask an adapter for "the q projection of layer 3" or "the norm feeding gate/up";
they never look at ``model_type``. Llama, Mistral, Qwen2 and Qwen3 share Hugging Face's module layout, so each
adapter is a small declarative record; a family with another layout adds its own subclass here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qcompile.errors import UnsupportedModelError

ATTN_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")
LINEAR_ROLES = ATTN_ROLES + MLP_ROLES


@dataclass(frozen=True)
class AttentionGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    sliding_window: int | None
    inv_freq: torch.Tensor  # [head_dim // 2] float32 (after any RoPE scaling)
    rope_scaling: float  # multiplies cos/sin (HF's ``attention_scaling``)


@dataclass(frozen=True)
class FamilyAdapter:
    family: str
    architectures: tuple[str, ...]
    # role -> dotted path inside one decoder layer
    linear_paths: dict = field(
        default_factory=lambda: {
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj",
            "up": "mlp.up_proj",
            "down": "mlp.down_proj",
        }
    )
    input_norm_path: str = "input_layernorm"
    post_attn_norm_path: str = "post_attention_layernorm"
    # per-head RMSNorm on queries/keys after the projection (Qwen3); None where the family has none
    q_norm_path: str | None = None
    k_norm_path: str | None = None
    uses_sliding_window_flag: str | None = None  # config flag that switches the sliding window on (Qwen2)

    # -- model-level ---------------------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        return model.model

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self.decoder(model).layers)

    def embed(self, model: nn.Module) -> nn.Embedding:
        return self.decoder(model).embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.decoder(model).norm

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.lm_head

    def ties_embeddings(self, model: nn.Module) -> bool:
        return self.lm_head(model).weight is self.embed(model).weight

    # -- layer-level ---------------------------------------------------------------------------------
    def linear(self, layer: nn.Module, role: str) -> nn.Linear:
        return layer.get_submodule(self.linear_paths[role])

    def input_norm(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.input_norm_path)

    def post_attn_norm(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.post_attn_norm_path)

    def qk_norms(self, layer: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        if self.q_norm_path is None:
            return None
        return layer.get_submodule(self.q_norm_path), layer.get_submodule(self.k_norm_path)

    def norm_consumers(self, layer: nn.Module) -> list[tuple[nn.Module, list[nn.Linear]]]:
        """Each RMSNorm of the layer with the linears that read its output (what norm fusion folds into)."""
        return [
            (self.input_norm(layer), [self.linear(layer, r) for r in ("q", "k", "v")]),
            (self.post_attn_norm(layer), [self.linear(layer, r) for r in ("gate", "up")]),
        ]

    def residual_readers(self, layer: nn.Module) -> list[nn.Linear]:
        """Linears whose input is a (normed) copy of the residual stream: what a rotation of it folds W <- W Q into."""
        return [self.linear(layer, r) for r in ("q", "k", "v", "gate", "up")]

    def residual_writers(self, layer: nn.Module) -> list[nn.Linear]:
        """Linears whose output is added to the residual stream: what a rotation of it folds W <- Qᵀ W into."""
        return [self.linear(layer, r) for r in ("o", "down")]

    def residual_norms(self, model: nn.Module) -> list[nn.Module]:
        """Every RMSNorm applied to the residual stream (per layer, then the final one)."""
        return [n for layer in self.layers(model) for n in (self.input_norm(layer), self.post_attn_norm(layer))] + [
            self.final_norm(model)
        ]

    def linear_names(self, model: nn.Module, include_lm_head: bool = False) -> list[tuple[str, str, nn.Linear]]:
        """(qualified module name, role, module) for every quantizable linear, in execution order."""
        names = {m: n for n, m in model.named_modules()}
        out = []
        for layer in self.layers(model):
            for role in LINEAR_ROLES:
                mod = self.linear(layer, role)
                out.append((names[mod], role, mod))
        if include_lm_head:
            head = self.lm_head(model)
            out.append((names[head], "lm_head", head))
        return out

    # -- attention geometry --------------------------------------------------------------------------
    def geometry(self, model: nn.Module) -> AttentionGeometry:
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        window = getattr(cfg, "sliding_window", None)
        if self.uses_sliding_window_flag is not None and not getattr(cfg, self.uses_sliding_window_flag, False):
            window = None
        rotary = self.decoder(model).rotary_emb
        inv_freq = rotary.inv_freq.detach().float().cpu().clone()
        return AttentionGeometry(
            num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            rms_eps=float(cfg.rms_norm_eps),
            sliding_window=window,
            inv_freq=inv_freq,
            rope_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
        )


LLAMA = FamilyAdapter(family="llama", architectures=("LlamaForCausalLM",))
MISTRAL = FamilyAdapter(family="mistral", architectures=("MistralForCausalLM",))
QWEN2 = FamilyAdapter(family="qwen2", architectures=("Qwen2ForCausalLM",),
                      uses_sliding_window_flag="use_sliding_window")
QWEN3 = FamilyAdapter(
    family="qwen3",
    architectures=("Qwen3ForCausalLM",),
    q_norm_path="self_attn.q_norm",
    k_norm_path="self_attn.k_norm",
    uses_sliding_window_flag="use_sliding_window",
)

ADAPTERS: tuple[FamilyAdapter, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3)
SUPPORTED_ARCHITECTURES = tuple(a for ad in ADAPTERS for a in ad.architectures)


def adapter_for_architecture(architecture: str | None) -> FamilyAdapter:
    for ad in ADAPTERS:
        if architecture in ad.architectures:
            return ad
    raise UnsupportedModelError(
        f"unsupported architecture {architecture!r}: qcompile supports {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def adapter_for_config(config) -> FamilyAdapter:
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:
        raise UnsupportedModelError(
            "the model config names no architecture (config.architectures is empty); "
            f"qcompile supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return adapter_for_architecture(archs[0])
