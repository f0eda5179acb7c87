"""Write the decoder as an ONNX graph straight from the weights, one standard op at a time.

No tracing: the graph is built from what the family adapter says (layers, roles, norms, attention geometry), so
it does not depend on how a transformers version implements the model, and it uses only default-domain ops
(opset 21) so it runs on every ONNX Runtime build. The interface is Optimum's decoder-with-past contract, so
``optimum.onnxruntime.ORTModelForCausalLM`` loads the exported folder as it is:

* inputs ``input_ids`` int64 [batch, seq], ``attention_mask`` int64 [batch, past+seq], ``position_ids`` int64
  [batch, seq], ``past_key_values.{i}.key|value`` float32 [batch, kv_heads, past, head_dim];
* outputs ``logits`` float32 [batch, seq, vocab], ``present.{i}.key|value`` [batch, kv_heads, past+seq, head_dim].

Linear weights are initializers named ``{module}.weight`` and stored transposed ([in, out]) so each linear is one
``MatMul``; ``qcompile.graph.weight_qdq`` later swaps them for integers + ``DequantizeLinear``. The returned
``onnx_ir.Model`` holds the weights lazily (read from the torch model when saved), so building a graph for a large
model does not copy its weights; save it before changing the model.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from qcompile.errors import RecipeError
from qcompile.models.adapters import AttentionGeometry
from qcompile.models.handle import ModelHandle

IR_VERSION = 10  # int4/uint4 initializers need IR version 10
MASKED = float(np.finfo(np.float32).min)  # finite, so a fully masked row gives a uniform softmax, not NaN
FLOAT = ir.DataType.FLOAT
INT64 = ir.DataType.INT64

# Optimum's dynamic dimension names (optimum/exporters/onnx/base.py)
BATCH, SEQ, PAST = "batch_size", "sequence_length", "past_sequence_length"
TOTAL = "past_sequence_length + sequence_length"


def _lazy_weight(param: torch.Tensor, name: str, transpose: bool) -> ir.LazyTensor:
    """A float32 initializer read from ``param`` only when the model is serialized (one tensor at a time)."""
    shape = tuple(param.shape[::-1]) if transpose else tuple(param.shape)

    def materialize() -> ir.Tensor:
        t = param.detach().to("cpu", torch.float32)
        return ir.tensor(np.ascontiguousarray((t.t() if transpose else t).numpy()), name=name)

    return ir.LazyTensor(materialize, dtype=FLOAT, shape=ir.Shape(shape), name=name)


class _Builder:
    """Records nodes and initializers; small constants are ``Constant`` nodes, shared by value."""

    def __init__(self):
        self.tape = ir.tape.Tape()
        self.scope = ""
        self._count = 0
        self._consts: dict[tuple, ir.Value] = {}

    def op(self, op_type: str, *inputs: ir.Value | None, **attrs) -> ir.Value:
        self._count += 1
        name = f"{self.scope}/{op_type}_{self._count}"
        return self.tape.op(op_type, list(inputs), attributes=attrs or None, name=name)

    def const(self, value, dtype=np.int64) -> ir.Value:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._count += 1
            self._consts[key] = self.tape.op("Constant", [], attributes={"value": ir.tensor(arr)},
                                             name=f"/Constant_{self._count}")
        return self._consts[key]

    def weight(self, param: torch.Tensor, name: str, transpose: bool = False) -> ir.Value:
        return self.tape.initializer(_lazy_weight(param, name, transpose), name=name)


ATTENTION_KINDS = ("standard", "gqa")


class _DecoderWriter:
    def __init__(self, handle: ModelHandle, attention: str = "standard"):
        self.model, self.ad = handle.model, handle.adapter
        self.geo: AttentionGeometry = self.ad.geometry(self.model)
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if attention == "gqa" and self.geo.sliding_window is not None:
            raise RecipeError("export.attention=gqa does not handle sliding-window attention yet "
                                      f"(this model's window: {self.geo.sliding_window}); use 'standard'")
        self.attention_kind = attention
        # GroupQueryAttention can apply RoPE itself (do_rotary) unless a graph pass must reach the rotated q/k
        # (R3 and KV-cache fake quantization, graph.runtime_quant): then RoPE stays a subgraph before it
        self.fused_rotary = attention == "gqa" and handle.kv_quant is None and "r3" not in handle.online_rotations
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 4096)
        if 2 * len(self.geo.inv_freq) != self.geo.head_dim:
            raise NotImplementedError(f"partial rotary embeddings ({2 * len(self.geo.inv_freq)} of "
                                      f"{self.geo.head_dim} head dims) are not supported")
        self.names = {m: n for n, m in self.model.named_modules()}
        self.b = _Builder()

    # -- building blocks --------------------------------------------------------------------------
    def linear(self, x: ir.Value, module: nn.Linear) -> ir.Value:
        name = self.names[module]
        y = self.b.op("MatMul", x, self.b.weight(module.weight, f"{name}.weight", transpose=True))
        if module.bias is not None:
            y = self.b.op("Add", y, self.b.weight(module.bias, f"{name}.bias"))
        return y

    def rms_norm(self, x: ir.Value, norm: nn.Module) -> ir.Value:
        """x / sqrt(mean(x^2) + eps), times the norm weight unless it is all ones (folded by canonicalize)."""
        b = self.b
        # Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul: the pattern ORT fuses into SimplifiedLayerNormalization
        # (and, with the residual Add before it, SkipSimplifiedLayerNormalization)
        var = b.op("ReduceMean", b.op("Pow", x, b.const(2.0, np.float32)), b.const([-1]), keepdims=1)
        y = b.op("Div", x, b.op("Sqrt", b.op("Add", var, b.const(self.geo.rms_eps, np.float32))))
        if torch.all(norm.weight == 1):
            return y
        return b.op("Mul", y, b.weight(norm.weight, f"{self.names[norm]}.weight"))

    def rope(self, x: ir.Value, cos: ir.Value, sin: ir.Value) -> ir.Value:
        """x*cos + rotate_half(x)*sin, HF's convention (halves, not interleaved pairs)."""
        b = self.b
        half = self.geo.head_dim // 2
        x1, x2 = b.tape.op_multi_out("Split", [x, b.const([half, half])], attributes={"axis": -1}, num_outputs=2)
        rotated = b.op("Concat", b.op("Neg", x2), x1, axis=-1)
        return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))

    # -- shared per-step tensors ------------------------------------------------------------------
    def rope_tables(self, position_ids: ir.Value) -> tuple[ir.Value, ir.Value]:
        """cos/sin [batch, 1, seq, head_dim] from the position ids, once for all layers."""
        b = self.b
        b.scope = "/rope"
        inv_freq = self.geo.inv_freq.numpy().astype(np.float32)
        pos = b.op("Unsqueeze", b.op("Cast", position_ids, to=FLOAT), b.const([-1]))  # [B, S, 1]
        freqs = b.op("Mul", pos, b.const(inv_freq, np.float32))  # [B, S, D/2]
        emb = b.op("Unsqueeze", b.op("Concat", freqs, freqs, axis=-1), b.const([1]))  # [B, 1, S, D]
        cos, sin = b.op("Cos", emb), b.op("Sin", emb)
        if self.geo.rope_scaling != 1.0:
            scale = b.const(self.geo.rope_scaling, np.float32)
            cos, sin = b.op("Mul", cos, scale), b.op("Mul", sin, scale)
        return cos, sin

    def attention_bias(self, input_ids: ir.Value, attention_mask: ir.Value) -> ir.Value:
        """Additive mask [batch, 1, seq, past+seq]: 0 where key j is visible to query i, else MASKED.

        Query i sits at cache slot past+i; key j is visible iff j <= past+i, attention_mask[b, j] == 1, and (with a
        sliding window w) j > past+i-w, as in transformers' masking_utils.
        """
        b = self.b
        b.scope = "/mask"
        seq = b.op("Gather", b.op("Shape", input_ids), b.const(1))
        total = b.op("Gather", b.op("Shape", attention_mask), b.const(1))
        past = b.op("Sub", total, seq)
        q_pos = b.op("Unsqueeze", b.op("Range", past, total, b.const(1)), b.const([-1]))  # [S, 1]
        k_pos = b.op("Range", b.const(0), total, b.const(1))  # [T]
        allowed = b.op("LessOrEqual", k_pos, q_pos)  # [S, T]
        if self.geo.sliding_window is not None:
            window_start = b.op("Sub", q_pos, b.const(self.geo.sliding_window))
            allowed = b.op("And", allowed, b.op("Greater", k_pos, window_start))
        keep = b.op("Unsqueeze", b.op("Cast", attention_mask, to=ir.DataType.BOOL), b.const([1, 2]))  # [B, 1, 1, T]
        allowed = b.op("And", allowed, keep)  # [B, 1, S, T]
        return b.op("Where", allowed, b.const(0.0, np.float32), b.const(MASKED, np.float32))

    def gqa_lengths(self, attention_mask: ir.Value) -> tuple[ir.Value, ir.Value]:
        """GroupQueryAttention's ``seqlens_k`` (int32 [batch]: attended keys per row - 1) and
        ``total_sequence_length`` (int32 scalar: the mask's width), as onnxruntime-genai's builder derives them."""
        b = self.b
        b.scope = "/gqa_lengths"
        seqlens = b.op("Cast", b.op("Sub", b.op("ReduceSum", attention_mask, b.const([1]), keepdims=0), b.const(1)),
                       to=ir.DataType.INT32)
        total = b.op("Cast", b.op("Gather", b.op("Shape", attention_mask), b.const(1)), to=ir.DataType.INT32)
        return seqlens, total

    # -- layers -----------------------------------------------------------------------------------
    def attention(self, x, layer, i, cos, sin, bias, past_k, past_v) -> tuple[ir.Value, ir.Value, ir.Value]:
        b, g, ad = self.b, self.geo, self.ad
        nh, nkv, d = g.num_heads, g.num_kv_heads, g.head_dim
        if self.fused_rotary:
            return self.gqa_fused_rotary(x, layer, i, cos, sin, bias, past_k, past_v)
        q = b.op("Reshape", self.linear(x, ad.linear(layer, "q")), b.const([0, 0, nh, d]))  # [B, S, nh, D]
        k = b.op("Reshape", self.linear(x, ad.linear(layer, "k")), b.const([0, 0, nkv, d]))
        v = b.op("Reshape", self.linear(x, ad.linear(layer, "v")), b.const([0, 0, nkv, d]))
        qk_norms = ad.qk_norms(layer)
        if qk_norms is not None:
            q, k = self.rms_norm(q, qk_norms[0]), self.rms_norm(k, qk_norms[1])
        q = self.rope(b.op("Transpose", q, perm=[0, 2, 1, 3]), cos, sin)  # [B, nh, S, D]
        k = self.rope(b.op("Transpose", k, perm=[0, 2, 1, 3]), cos, sin)  # [B, nkv, S, D]
        v = b.op("Transpose", v, perm=[0, 2, 1, 3])
        # stable names for the graph passes that rotate/quantize queries, keys and values (graph.runtime_quant)
        q.name, k.name, v.name = f"/layers.{i}/attn/q_rope", f"/layers.{i}/attn/k_rope", f"/layers.{i}/attn/v_heads"
        if self.attention_kind == "gqa":
            # ORT's contrib GroupQueryAttention: causal attention, cache append, and (with onnxruntime-genai's
            # past_present_share_buffer) in-place writes into a max-length cache. RoPE stays outside it
            # (do_rotary=0) so the graph passes still find q_rope/k_rope/v_heads; the op takes [B, S, H*D].
            flat = [b.op("Reshape", b.op("Transpose", t, perm=[0, 2, 1, 3]), b.const([0, 0, heads * d]))
                    for t, heads in ((q, nh), (k, nkv), (v, nkv))]
            ctx, present_k, present_v = self.group_query_attention(i, *flat, past_k, past_v, bias)
            return self.linear(ctx, ad.linear(layer, "o")), present_k, present_v
        present_k = b.tape.op("Concat", [past_k, k], attributes={"axis": 2}, output=ir.val(f"present.{i}.key"))
        present_v = b.tape.op("Concat", [past_v, v], attributes={"axis": 2}, output=ir.val(f"present.{i}.value"))
        # GQA without repeating K/V: query head h = kv*rep + r reads kv head h // rep, so [B, nh, S, D] viewed as
        # [B, nkv, rep*S, D] lines each group of rep query heads up with its kv head.
        q_grouped = b.op("Reshape", q, b.const([0, nkv, -1, d]))
        scores = b.op("MatMul", q_grouped, b.op("Transpose", present_k, perm=[0, 1, 3, 2]))  # [B, nkv, rep*S, T]
        scores = b.op("Mul", b.op("Reshape", scores, b.const([0, nh, -1, 0])), b.const(d**-0.5, np.float32))
        probs = b.op("Softmax", b.op("Add", scores, bias), axis=-1)  # [B, nh, S, T]
        ctx = b.op("MatMul", b.op("Reshape", probs, b.const([0, nkv, -1, 0])), present_v)  # [B, nkv, rep*S, D]
        ctx = b.op("Transpose", b.op("Reshape", ctx, b.const([0, nh, -1, d])), perm=[0, 2, 1, 3])
        out = self.linear(b.op("Reshape", ctx, b.const([0, 0, nh * d])), ad.linear(layer, "o"))
        return out, present_k, present_v

    def gqa_fused_rotary(self, x, layer, i, cos_cache, sin_cache, lengths, past_k, past_v):
        """GroupQueryAttention with RoPE inside (do_rotary=1, HF's half rotation): q/k/v go in as the linears
        write them, [B, S, H*D] (reshaped per head only for Qwen3's q/k norms), and the op rotates them at the
        positions seqlens_k implies (unpadded rows), reading the cos/sin tables of every position."""
        b, g, ad = self.b, self.geo, self.ad
        nh, nkv, d = g.num_heads, g.num_kv_heads, g.head_dim
        q, k, v = (self.linear(x, ad.linear(layer, role)) for role in ("q", "k", "v"))
        qk_norms = ad.qk_norms(layer)
        if qk_norms is not None:
            q = b.op("Reshape", self.rms_norm(b.op("Reshape", q, b.const([0, 0, nh, d])), qk_norms[0]),
                     b.const([0, 0, nh * d]))
            k = b.op("Reshape", self.rms_norm(b.op("Reshape", k, b.const([0, 0, nkv, d])), qk_norms[1]),
                     b.const([0, 0, nkv * d]))
        ctx, present_k, present_v = self.group_query_attention(i, q, k, v, past_k, past_v, lengths,
                                                               (cos_cache, sin_cache))
        return self.linear(ctx, ad.linear(layer, "o")), present_k, present_v

    def group_query_attention(self, i, q, k, v, past_k, past_v, lengths, rotary_tables=None):
        """One ``com.microsoft.GroupQueryAttention`` node: q/k/v [B, S, H*D] -> (context, present.i.key/value);
        with ``rotary_tables`` (cos, sin) the op applies HF's half-rotation RoPE itself."""
        g = self.geo
        attrs = {"num_heads": g.num_heads, "kv_num_heads": g.num_kv_heads, "scale": float(g.head_dim**-0.5),
                 "do_rotary": int(rotary_tables is not None)}
        if rotary_tables is not None:
            attrs["rotary_interleaved"] = 0
        return self.b.tape.op_multi_out(
            "GroupQueryAttention", [q, k, v, past_k, past_v, *lengths, *(rotary_tables or ())], attributes=attrs,
            domain="com.microsoft", outputs=[ir.val(f"/layers.{i}/attn/gqa_out"), ir.val(f"present.{i}.key"),
                                             ir.val(f"present.{i}.value")],
            name=f"/layers.{i}/attn/GroupQueryAttention")

    def rotary_caches(self) -> tuple[ir.Value, ir.Value]:
        """cos/sin [max_positions, head_dim / 2] for GroupQueryAttention's own RoPE (times HF's attention
        scaling), as initializers."""
        pos = np.arange(self.max_positions, dtype=np.float64)[:, None]
        ang = pos * self.geo.inv_freq.double().numpy()[None, :]
        scale = float(self.geo.rope_scaling)
        cos = ir.tensor((np.cos(ang) * scale).astype(np.float32), name="rope.cos_cache")
        sin = ir.tensor((np.sin(ang) * scale).astype(np.float32), name="rope.sin_cache")
        return (self.b.tape.initializer(cos, name="rope.cos_cache"),
                self.b.tape.initializer(sin, name="rope.sin_cache"))

    def mlp(self, x: ir.Value, layer: nn.Module) -> ir.Value:
        b, ad = self.b, self.ad
        gate = self.linear(x, ad.linear(layer, "gate"))
        up = self.linear(x, ad.linear(layer, "up"))
        return self.linear(b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up), ad.linear(layer, "down"))

    # -- whole model ------------------------------------------------------------------------------
    def build(self, opset: int) -> ir.Model:
        b, g, ad, model = self.b, self.geo, self.ad, self.model
        embed = ad.embed(model)
        vocab = embed.weight.shape[0]
        input_ids = ir.val("input_ids", INT64, [BATCH, SEQ])
        attention_mask = ir.val("attention_mask", INT64, [BATCH, TOTAL])
        position_ids = ir.val("position_ids", INT64, [BATCH, SEQ])
        inputs, presents = [input_ids, attention_mask, position_ids], []

        cos, sin = self.rotary_caches() if self.fused_rotary else self.rope_tables(position_ids)
        # what attention needs besides q/k/v: the additive mask, or GroupQueryAttention's lengths
        bias = (self.gqa_lengths(attention_mask) if self.attention_kind == "gqa"
                else self.attention_bias(input_ids, attention_mask))
        b.scope = "/embed"
        embed_w = b.weight(embed.weight, f"{self.names[embed]}.weight")
        h = b.op("Gather", embed_w, input_ids)
        # Optimum sizes the empty first-step past as hidden_size // num_heads per head (huggingface/optimum#2379);
        # where the model's head_dim differs (e.g. Qwen3-0.6B), leave that past dim symbolic: ORT's Concat skips
        # empty inputs, so the wrongly sized empty tensors still work and real caches keep their true shape.
        past_dim = g.head_dim if embed.weight.shape[1] // g.num_heads == g.head_dim else "head_dim"
        past_shape = [BATCH, g.num_kv_heads, PAST, past_dim]
        for i, layer in enumerate(ad.layers(model)):
            b.scope = f"/layers.{i}"
            past_k = ir.val(f"past_key_values.{i}.key", FLOAT, past_shape)
            past_v = ir.val(f"past_key_values.{i}.value", FLOAT, past_shape)
            inputs += [past_k, past_v]
            attn, pk, pv = self.attention(self.rms_norm(h, ad.input_norm(layer)), layer, i, cos, sin, bias,
                                          past_k, past_v)
            h = b.op("Add", h, attn)
            h = b.op("Add", h, self.mlp(self.rms_norm(h, ad.post_attn_norm(layer)), layer))
            presents += [pk, pv]
        b.scope = "/lm_head"
        h = self.rms_norm(h, ad.final_norm(model))
        if ad.ties_embeddings(model):  # one shared initializer: Gather reads it, the head reads its transpose
            logits = b.op("MatMul", h, b.op("Transpose", embed_w, perm=[1, 0]))
        else:
            logits = self.linear(h, ad.lm_head(model))
        logits.name = "logits"

        for v in presents:
            v.dtype, v.shape = FLOAT, ir.Shape([BATCH, g.num_kv_heads, TOTAL, g.head_dim])
        logits.dtype, logits.shape = FLOAT, ir.Shape([BATCH, SEQ, vocab])
        graph = ir.Graph(
            inputs=inputs,
            outputs=[logits, *presents],
            nodes=b.tape.nodes,
            initializers=b.tape.initializers,
            opset_imports={"": opset, **({"com.microsoft": 1} if self.attention_kind == "gqa" else {})},
            name="qcompile_decoder",
        )
        return ir.Model(graph, ir_version=IR_VERSION, producer_name="qcompile")


def build_graph(handle: ModelHandle, opset: int = 21, attention: str = "standard") -> ir.Model:
    """The float32 decoder-with-past graph of ``handle.model`` (an ``onnx_ir.Model``; weights read lazily).

    ``attention="standard"``: default-domain ops only (MatMul/Softmax, the cache grown by Concat), any padding.
    ``"gqa"``: one ``com.microsoft.GroupQueryAttention`` per layer (ORT's CPU and CUDA builds have it), which
    onnxruntime-genai can run with a shared max-length cache; it assumes unpadded (or right-padded) rows."""
    if opset < 21:
        raise ValueError(f"opset must be >= 21 (blocked int4 DequantizeLinear), got {opset}")
    with torch.no_grad():
        return _DecoderWriter(handle, attention).build(opset)
