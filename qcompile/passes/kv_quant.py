"""KV-cache quantization with BiSup's prompt mixed precision: keys and values are quantized per token per head
(optionally in groups along the head dimension) when written to the cache, except the first ``prefix`` positions
(a system prompt, attention sinks), which stay in float.

Keys are quantized after RoPE and after the online Hadamard R3 when the rotate pass recorded one
(``handle.online_rotations["r3"]``): queries and keys both get ``H``, so ``q·k`` is unchanged while the keys'
outliers are spread over the head dimension before rounding. Values are quantized as they are (R2, folded into
v/o by ``rotate``, already spreads them).

Torch side: an attention function registered with transformers' ``AttentionInterface`` wraps the model's own
implementation (sdpa or eager) and applies R3 and the quantizer to the full key/value tensors it receives
(past + new). Per-token quantization is independent across positions, so quantizing the whole cache on every
call equals quantizing each token once when it is written, which is what the graph does
(``qcompile.graph.kv_qdq``). Positions are cache indices, so the float prefix assumes no left padding.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from qcompile.errors import RecipeError, require_int
from qcompile.models.handle import ModelHandle
from qcompile.quant.activations import TokenQuantSpec, fake_quantize_tokens, token_spec

ATTN_NAME = "qcompile_kv_quant"


@dataclass
class KVQuantConfig:
    bits: int = 4
    symmetric: bool = False
    group_size: int | None = None  # None: one group per token per head (the whole head dimension)
    clip_ratio: float = 1.0
    prefix: int = 0  # first P cache positions kept in float (BiSup prompt mixed precision)

    def __post_init__(self):
        require_int(self.prefix, "kv_quant prefix")
        self.spec()  # bits, group size and clip ratio: refused when the recipe is read, not after the passes before

    def spec(self) -> TokenQuantSpec:
        return token_spec("kv_quant", self.bits, self.symmetric, self.group_size, self.clip_ratio)


Config = KVQuantConfig


@dataclass(frozen=True)
class KVQuantState:
    """What the exported graph and the torch reference share: the quantizer, the float prefix, and R3."""

    spec: TokenQuantSpec
    prefix: int
    r3: torch.Tensor | None  # [head_dim, head_dim] float32, applied to queries and keys after RoPE

    def quantize(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """``x`` [batch, heads, positions, head_dim] with positions >= prefix quantize-dequantized."""
        q = fake_quantize_tokens(x, self.spec, what)
        if self.prefix > 0:
            q = torch.cat([x[..., : self.prefix, :], q[..., self.prefix :, :]], dim=-2)
        return q

    def to_dict(self) -> dict:
        return {**self.spec.to_dict(), "prefix": self.prefix, "r3": self.r3 is not None}


def _delegate(module, implementation: str):
    from transformers import AttentionInterface

    if implementation == "eager":  # each model file has its own eager function
        return sys.modules[type(module).__module__].eager_attention_forward
    return AttentionInterface()[implementation]


def _attention(module, query, key, value, attention_mask, **kwargs):
    state: KVQuantState | None = getattr(module, "_qcompile_kv", None)
    inner = _delegate(module, getattr(module, "_qcompile_inner_attn", "sdpa"))
    if state is not None:
        if state.r3 is not None:
            h = state.r3.to(query.device, query.dtype)
            query, key = query @ h, key @ h
        key, value = state.quantize(key, "keys"), state.quantize(value, "values")
    return inner(module, query, key, value, attention_mask, **kwargs)


def install(handle: ModelHandle, state: KVQuantState) -> str:
    """Route every attention module of ``handle.model`` through :func:`_attention` with ``state``; returns the
    attention implementation it replaced (for :func:`uninstall`)."""
    from transformers import AttentionInterface, AttentionMaskInterface  # public in transformers 4.56+ and 5.x

    config = handle.model.config
    current = config._attn_implementation or "eager"
    # flash/flex kernels take other mask formats and dtypes; sdpa computes the same function
    inner = current if current in ("sdpa", "eager") else "sdpa"
    AttentionInterface.register(ATTN_NAME, _attention)
    AttentionMaskInterface.register(ATTN_NAME, AttentionMaskInterface()[inner])
    for layer in handle.adapter.layers(handle.model):
        attn = layer.self_attn
        attn._qcompile_kv = state
        attn._qcompile_inner_attn = inner
    config._attn_implementation = ATTN_NAME
    return current


def uninstall(handle: ModelHandle, implementation: str) -> None:
    """Undo :func:`install` (e.g. after a training pass that quantized the cache only while it trained)."""
    for layer in handle.adapter.layers(handle.model):
        for attr in ("_qcompile_kv", "_qcompile_inner_attn"):
            if hasattr(layer.self_attn, attr):
                delattr(layer.self_attn, attr)
    handle.model.config._attn_implementation = implementation


def apply(handle: ModelHandle, config: KVQuantConfig) -> dict:
    if handle.kv_quant is not None:
        raise RecipeError("kv_quant: the KV cache is already quantized by an earlier kv_quant step")
    geo = handle.adapter.geometry(handle.model)
    spec = config.spec()
    spec.group(geo.head_dim, "KV cache (head_dim)")
    r3 = None
    if "r3" in handle.online_rotations:
        from qcompile.passes.rotate import qk_rotation_matrix

        r3 = qk_rotation_matrix(handle).to(torch.float32)
        if tuple(r3.shape) != (geo.head_dim, geo.head_dim):
            raise RecipeError(f"R3 is {tuple(r3.shape)}, head_dim is {geo.head_dim}")
    state = KVQuantState(spec, config.prefix, r3)
    install(handle, state)
    handle.kv_quant = state
    return {"kv_cache": spec.describe(), "float_prefix": config.prefix, "r3": r3 is not None}
