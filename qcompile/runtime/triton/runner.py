"""``TritonCausalLM``: an exported folder on an NVIDIA GPU through qcompile's Triton kernels.

Reads only the artifact: ``config.json`` for the attention geometry (through the family adapter's declarative
fields: which config flag turns the sliding window on, where each linear sits in a layer) and ``model.onnx`` for
every tensor: the integer weights, scales and zero points of the ``DequantizeLinear`` initializers, float
weights, norm scales (absent where canonicalize folded them), the RoPE inverse frequencies and attention scaling
(constants of the graph's rope subgraph), tied or separate lm_head. No pass and no torch model is involved, so
what runs here is what ORT runs (the graph's weights, bit for bit), computed on other kernels.

Per layer: RMSNorm -> q|k|v in one GEMV/GEMM (the three packed weights side by side) -> q/k norm + RoPE + KV-cache
store -> attention -> o_proj (+ residual in the epilogue) -> RMSNorm -> gate|up -> down_proj reading
``silu(gate) * up`` in its prologue (+ residual). Decode (batch 1) is captured once as a CUDA graph: the token,
position and length live in device tensors that the graph itself advances, so a step is one replay. Prefill runs
eagerly (GEMM kernels, PyTorch SDPA over the prompt).

Run-time rewrites (``graph.runtime_quant``: the rotation / activation / KV-cache recipes such as w8a8, w4a8,
w4a4kv4, w3a3-g64 and their learned variants) are matched node by node in the graph (``runtime.triton.rewrites``)
and checked against ``qcompile.json``'s ``runtime_quantization``; every constant comes from the graph:

* a linear's input rewrites run before its kernel: online Hadamard R4 (``hadamard.hadamard_transform`` with the
  graph's base matrix, non-power-of-two orders included), then per-token fake quantization
  (``act_quant.fake_quantize``: 2-8 bits, sym/asym, per token or grouped, clip ratio; the graph's arithmetic, bit
  for bit). A symmetric 4/8-bit per-token input to an 8-bit weight (per channel or groups of 32k) takes the int8
  GEMM instead (``w8a8.quantize_rows`` + ``int_linear``: the same products, summed exactly);
* R3: queries and keys after RoPE get the head-size Hadamard before the cache store (``rope_store(store=False)``,
  then ``store_kv``) and before attention;
* the KV cache holds what the graph writes into ``present.*``: 8- or 4-bit codes per token per head (sym/asym,
  clip ratio) from position P on, float before it (P is the graph's; ``float_prefix`` cannot change it); decode
  attends over the codes (``kv_attention.decode_attention``), prefill over the fake-quantized keys/values. Other
  cache layouts (groups within a head, 2/3 bits) are refused with one error.

Anything else (an op the exporter does not write, a MatMul beyond the linears, attention and the mapped
rotations) is refused: such graphs run on ONNX Runtime (``--device cpu``).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qcompile.errors import QCompileError
from qcompile.fsutil import read_json
from qcompile.graph.fuse_projections import SEPARATOR, member_names
from qcompile.runtime.triton._env import check_device, interpreting, require_triton
from qcompile.runtime.triton.rewrites import FloatPrefix, Hadamard, Rewrites, Step, const_value, describe

MODEL_FILE = "model.onnx"
ROLES = ("q", "k", "v", "o", "gate", "up", "down")
# greedy generate's device-fed steps between host reads: a streamed token shows at most this many steps late, and
# at most this many - 1 steps run past an eos
GREEDY_CHUNK = 16
# every op the exporter (export.onnx_builder) and the weight pass (graph.weight_qdq) write; the run-time rewrites
# of graph.runtime_quant (online Hadamard, activation and KV fake quantization, the KV float prefix) are matched
# node by node (runtime.triton.rewrites) and mapped; any other node is refused
KNOWN_OPS = {"Cast", "Constant", "Unsqueeze", "Mul", "Concat", "Cos", "Sin", "Shape", "Gather", "Sub", "Range",
             "LessOrEqual", "Greater", "And", "Where", "ReduceMean", "Add", "Sqrt", "Reciprocal", "MatMul", "Reshape",
             "Transpose", "Split", "Neg", "Softmax", "Sigmoid", "DequantizeLinear",
             "Pow", "Div",  # RMSNorm as ORT fuses it
             "ReduceSum", "GroupQueryAttention"}  # export.attention=gqa: the same attention, as ORT's contrib op


# -- what the artifact holds ---------------------------------------------------------------------------------


@dataclass
class ExportedLinear:
    """One linear as the graph stores it (``[in, out]``): a float ``weight``, or integers ``qweight`` with
    ``scale``/``zero`` ``[in / G, out]`` (per-channel: ``[out]``) in a ``bits``-wide container (4 or 8, as the
    graph's int4/uint4/int8/uint8); ``zero`` None means symmetric. Optional ``bias`` [out]."""

    weight: np.ndarray | None = None
    qweight: np.ndarray | None = None
    scale: np.ndarray | None = None
    zero: np.ndarray | None = None
    bits: int | None = None
    bias: np.ndarray | None = None
    # what the graph computes on the input before this linear's MatMul, in order: an online Hadamard (R4), then
    # per-token fake quantization (a TokenQuantSpec); () for a plain input
    input_steps: tuple[Step, ...] = ()

    @property
    def quantized(self) -> bool:
        return self.qweight is not None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple((self.qweight if self.quantized else self.weight).shape)

    @property
    def group_size(self) -> int | None:
        if not self.quantized:
            return None
        k, n = self.shape
        return k // (self.scale.size // n)

    def columns(self, lo: int, hi: int) -> ExportedLinear:
        """Output columns ``lo:hi`` (one member of a fused linear): the same integers, scales and zero points."""
        def cut(a):
            return None if a is None else np.ascontiguousarray(np.asarray(a)[..., lo:hi])

        return ExportedLinear(weight=cut(self.weight), qweight=cut(self.qweight), scale=cut(self.scale),
                              zero=cut(self.zero), bits=self.bits, bias=cut(self.bias), input_steps=self.input_steps)

    def dequantize(self) -> np.ndarray:
        """float32 [in, out]: the weight ORT's DequantizeLinear produces."""
        if not self.quantized:
            return np.asarray(self.weight, np.float32)
        k, n = self.shape
        g = self.group_size
        s = np.repeat(np.asarray(self.scale, np.float32).reshape(-1, n), g, 0)
        q = np.asarray(self.qweight, np.float32)
        if self.zero is not None:
            q = q - np.repeat(np.asarray(self.zero, np.float32).reshape(-1, n), g, 0)
        return q * s


@dataclass
class LayerWeights:
    linears: dict[str, ExportedLinear]
    input_norm: np.ndarray | None = None  # None: folded into the next linears (unit scale)
    post_attn_norm: np.ndarray | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    r3: Hadamard | None = None  # online rotation of queries and keys after RoPE (before the K cache)


@dataclass
class ModelWeights:
    """Everything the runner needs, read from an exported folder (or built by a benchmark)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    inv_freq: np.ndarray  # [head_dim / 2]
    embed: np.ndarray  # [vocab, hidden]
    lm_head: ExportedLinear | None  # None: tied to the embeddings
    layers: list[LayerWeights] = field(default_factory=list)
    final_norm: np.ndarray | None = None
    rope_scaling: float = 1.0  # multiplies cos and sin (HF's attention_scaling)
    sliding_window: int | None = None
    max_position: int = 4096
    has_qk_norm: bool = False
    # the graph's KV-cache quantization (per token per head over head_dim) of positions >= kv_prefix; None: float
    kv_quant: object | None = None  # TokenQuantSpec
    kv_prefix: int = 0
    head_input_steps: tuple[Step, ...] = ()  # the lm_head's input rewrites when the head is tied (else on lm_head)

    @property
    def hidden_size(self) -> int:
        return self.embed.shape[1]


_const = const_value


def load_exported(folder: str | os.PathLike) -> ModelWeights:
    """Read an exported folder into ``ModelWeights`` (CPU numpy arrays)."""
    import onnx_ir as ir

    from qcompile.models.adapters import adapter_for_architecture

    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file() or not (folder / "config.json").is_file():
        raise QCompileError(f"{folder} is not an exported folder (needs model.onnx and config.json)")
    cfg = json.loads((folder / "config.json").read_text())
    adapter = adapter_for_architecture((cfg.get("architectures") or [None])[0])
    model = ir.load(folder / MODEL_FILE)
    if model.producer_name != "qcompile":
        raise QCompileError(f"{folder / MODEL_FILE} was written by {model.producer_name!r}; the CUDA runtime maps "
                            "graphs written by `qcompile export` onto its kernels")
    graph = model.graph
    inits = graph.initializers
    dq_nodes = {n.inputs[0].name: n for n in graph if n.op_type == "DequantizeLinear"}

    def arr(name: str) -> np.ndarray:
        return inits[name].const_value.numpy()

    def linear(base: str) -> ExportedLinear | None:
        if base in fused_parts:
            return fused_parts[base]
        bias = arr(f"{base}.bias").astype(np.float32) if f"{base}.bias" in inits else None
        if f"{base}.weight_q" in inits:
            node = dq_nodes.get(f"{base}.weight_q")
            if node is None:
                raise QCompileError(f"{base}.weight_q is not read by a DequantizeLinear node")
            qv = inits[f"{base}.weight_q"].const_value
            dtype = qv.dtype
            bits = 4 if dtype in (ir.DataType.INT4, ir.DataType.UINT4) else 8
            q = qv.numpy().astype(np.int16)
            scale = arr(f"{base}.weight_scale").astype(np.float32)
            zero = arr(f"{base}.weight_zero").astype(np.int16) if len(node.inputs) > 2 and node.inputs[2] else None
            axis = node.attributes["axis"].value if "axis" in node.attributes else 1
            if axis == 0 and "block_size" not in node.attributes:
                raise QCompileError(f"{base}: DequantizeLinear along axis 0 without block_size is not a linear "
                                    "weight layout the runtime knows")
            return ExportedLinear(qweight=q, scale=scale, zero=zero, bits=bits, bias=bias)
        if f"{base}.weight" in inits:
            return ExportedLinear(weight=arr(f"{base}.weight").astype(np.float32), bias=bias)
        return None

    def optional(name: str) -> np.ndarray | None:
        return arr(name).astype(np.float32) if name in inits else None

    # export.fuse_projections: one weight for q|k|v (gate|up), sliced back per member here (the modules below
    # concatenate them again); the widths come from the Split after it, or GroupQueryAttention's packed input
    fused_parts: dict[str, ExportedLinear] = {}
    fused_of: dict[str, str] = {}  # member linear -> the fused linear whose MatMul computes it
    fused_groups = 0
    for name in [n for n in inits if SEPARATOR in n and n.endswith((".weight", ".weight_q"))]:
        base = name.removesuffix("_q").removesuffix(".weight")
        whole = linear(base)
        members = member_names(base)
        widths = _fused_widths(graph, inits, base, whole.shape[1], len(members))
        for member, lo, hi in zip(members, np.cumsum([0, *widths[:-1]]), np.cumsum(widths)):
            fused_parts[member] = whole.columns(int(lo), int(hi))
            fused_of[member] = base
        fused_groups += len(members) - 1

    def matmul_of(base: str):
        base = fused_of.get(base, base)
        node = dq_nodes.get(f"{base}.weight_q")
        w = node.outputs[0] if node is not None else graph.initializers.get(f"{base}.weight")
        users = [n for n, _ in w.uses() if n.op_type == "MatMul"] if w is not None else []
        if len(users) != 1:
            raise QCompileError(f"{base}: expected one MatMul reading its weight, found {len(users)}")
        return users[0]

    rewrites = Rewrites()  # collects the nodes of every run-time rewrite mapped below

    q_path = adapter.linear_paths["q"]
    pattern = re.compile(rf"^(.*)\.(\d+)\.{re.escape(q_path)}\.(weight|weight_q)$")
    found = [(m.group(1), int(m.group(2))) for m in map(pattern.match, [*inits, *(f"{n}.weight" for n in fused_parts)])
             if m]
    if not found:
        raise QCompileError(f"no '{q_path}' weights in the graph: not a {adapter.family} decoder export")
    prefix = found[0][0]
    n_layers = max(i for _, i in found) + 1
    layers = []
    kv_layers = []
    for i in range(n_layers):
        base = f"{prefix}.{i}"
        linears = {}
        for role in ROLES:
            name = f"{base}.{adapter.linear_paths[role]}"
            lin = linear(name)
            if lin is None:
                raise QCompileError(f"layer {i}: no weight for {adapter.linear_paths[role]} in the graph")
            lin.input_steps = _linear_steps(name, rewrites.chain(matmul_of(name).inputs[0])[1])
            linears[role] = lin
        r3, kv_spec, kv_prefix = _kv_rewrites(rewrites, graph, i)
        kv_layers.append((kv_spec, kv_prefix))
        layers.append(LayerWeights(
            linears=linears,
            input_norm=optional(f"{base}.{adapter.input_norm_path}.weight"),
            post_attn_norm=optional(f"{base}.{adapter.post_attn_norm_path}.weight"),
            q_norm=optional(f"{base}.{adapter.q_norm_path}.weight") if adapter.q_norm_path else None,
            k_norm=optional(f"{base}.{adapter.k_norm_path}.weight") if adapter.k_norm_path else None,
            r3=r3,
        ))
    if len(set(kv_layers)) > 1:
        raise QCompileError("the layers quantize their KV caches differently (" + ", ".join(
            f"layer {i}: {'float' if s is None else s.describe()} prefix {p}" for i, (s, p) in enumerate(kv_layers))
            + "); the CUDA runtime needs one cache layout")
    kv_spec, kv_prefix = kv_layers[0] if kv_layers else (None, 0)

    # embeddings: the Gather reading input_ids; head and final norm: what produces the logits
    gather = next((n for n in graph if n.op_type == "Gather" and n.inputs[1].name == "input_ids"), None)
    if gather is None or gather.inputs[0].name not in inits:
        raise QCompileError("the graph's embedding is not a Gather over a float initializer")
    embed_name = gather.inputs[0].name
    embed = arr(embed_name).astype(np.float32)
    logits = next(v for v in graph.outputs if v.name == "logits")
    node = logits.producer()
    head_bias = None
    if node.op_type == "Add":
        head_bias = next(_const(v) for v in node.inputs if _const(v) is not None)
        node = next(v.producer() for v in node.inputs if _const(v) is None)
    if node.op_type != "MatMul":
        raise QCompileError(f"the logits come from {node.op_type}, expected the lm_head MatMul")
    h_in, w_in = node.inputs
    h_in, head_steps = rewrites.chain(h_in)
    head_steps = _linear_steps("lm_head", head_steps)
    w_node = w_in.producer()
    if w_node is not None and w_node.op_type == "Transpose" and w_node.inputs[0].name == embed_name:
        lm_head = None
    elif w_node is not None and w_node.op_type == "DequantizeLinear":
        lm_head = linear(w_node.inputs[0].name.removesuffix(".weight_q"))
    elif w_in.name in inits:
        lm_head = ExportedLinear(weight=arr(w_in.name).astype(np.float32))
    else:
        raise QCompileError("the lm_head weight is neither the tied embedding, an initializer nor a "
                            "DequantizeLinear output")
    if lm_head is not None and head_bias is not None:
        lm_head.bias = np.asarray(head_bias, np.float32)
    if lm_head is not None:
        lm_head.input_steps = head_steps
    _check_mapped(graph, n_layers, fused_groups, rewrites.nodes)
    final_norm = None
    h_node = h_in.producer()
    if h_node is not None and h_node.op_type == "Mul":
        consts = [v for v in h_node.inputs if v.name in inits]
        if consts:
            final_norm = arr(consts[0].name).astype(np.float32)

    # RoPE: Cos(Unsqueeze(Concat(Mul(pos, inv_freq), ...))) [* attention scaling]
    cos = next((n for n in graph if n.op_type == "Cos"), None)
    if cos is None and "rope.cos_cache" in inits:  # GroupQueryAttention applies RoPE from cos/sin tables
        cos_t, sin_t = arr("rope.cos_cache").astype(np.float64), arr("rope.sin_cache").astype(np.float64)
        inv_freq = np.arctan2(sin_t[1], cos_t[1]).astype(np.float32)  # the angles at position 1
        rope_scaling = float(cos_t[0, 0])  # cos(0) times the attention scaling
    else:
        try:
            mul = cos.inputs[0].producer().inputs[0].producer().inputs[0].producer()
            inv_freq = next(c for c in map(_const, mul.inputs) if c is not None).astype(np.float32).reshape(-1)
        except (AttributeError, StopIteration) as e:
            raise QCompileError("could not find the RoPE inverse frequencies in the graph's rope subgraph") from e
        rope_scaling = 1.0
        for use in cos.outputs[0].uses():
            consumer = use[0]
            if consumer.op_type == "Mul":
                c = [_const(v) for v in consumer.inputs]
                if any(x is not None and np.size(x) == 1 for x in c):
                    rope_scaling = float(next(x for x in c if x is not None).reshape(()))

    hidden = embed.shape[1]
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    window = cfg.get("sliding_window")
    if adapter.uses_sliding_window_flag is not None and not cfg.get(adapter.uses_sliding_window_flag, False):
        window = None
    if 2 * inv_freq.size != head_dim:
        raise QCompileError(f"rope has {inv_freq.size} frequencies for head_dim {head_dim}")
    weights = ModelWeights(
        num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=head_dim,
        rms_eps=float(cfg["rms_norm_eps"]), inv_freq=inv_freq, embed=embed, lm_head=lm_head, layers=layers,
        final_norm=final_norm, rope_scaling=rope_scaling, sliding_window=window,
        max_position=int(cfg.get("max_position_embeddings") or 4096), has_qk_norm=adapter.q_norm_path is not None,
        kv_quant=kv_spec, kv_prefix=kv_prefix, head_input_steps=head_steps if lm_head is None else (),
    )
    _check_metadata(folder, weights)
    return weights


def _linear_steps(name: str, steps: tuple[Step, ...]) -> tuple[Step, ...]:
    """A linear's input rewrites, if they are what graph.runtime_quant writes: [online Hadamard] [fake quant]."""
    from qcompile.quant.activations import TokenQuantSpec

    kinds = tuple(type(s) for s in steps)
    if kinds not in ((), (TokenQuantSpec,), (Hadamard,), (Hadamard, TokenQuantSpec)):
        raise QCompileError(f"{name}: its input goes through {describe(steps)}, not a layout the CUDA runtime maps "
                            "(an online Hadamard, then per-token quantization); run this graph on ONNX Runtime "
                            "(--device cpu)")
    return steps


def _attention_inputs(graph, i: int):
    """(q, k, v) as attention reads them in layer ``i`` (after any R3 / KV rewrite), or None where the graph
    has no separate q/k/v values (GroupQueryAttention applying RoPE itself: nothing to rewrite there)."""
    outputs = {v.name: v for v in graph.outputs}
    pk, pv = outputs.get(f"present.{i}.key"), outputs.get(f"present.{i}.value")
    node = pk.producer() if pk is not None else None
    try:
        if node is not None and node.op_type == "Concat":
            k, v = node.inputs[1], pv.producer().inputs[1]
            trans = next(u for u, _ in pk.uses() if u.op_type == "Transpose")
            scores = next(u for u, _ in trans.outputs[0].uses() if u.op_type == "MatMul")
            reshape = scores.inputs[0].producer()
            if reshape.op_type != "Reshape":
                return None
            return reshape.inputs[0], k, v
        if node is not None and node.op_type == "GroupQueryAttention":
            out = []
            for x in node.inputs[:3]:  # Reshape(Transpose(t, [0, 2, 1, 3]), [0, 0, H * D])
                flat = x.producer()
                trans = flat.inputs[0].producer() if flat is not None and flat.op_type == "Reshape" else None
                if trans is None or trans.op_type != "Transpose":
                    return None
                out.append(trans.inputs[0])
            return tuple(out)
    except (StopIteration, AttributeError):
        return None
    return None


def _kv_rewrites(rewrites: Rewrites, graph, i: int):
    """Layer ``i``'s R3 (Hadamard on q and k after RoPE), KV quantization spec and float prefix."""
    from qcompile.quant.activations import TokenQuantSpec

    names = {v.name for node in graph for v in node.outputs}
    if f"/layers.{i}/attn/q_rope" not in names:
        return None, None, 0
    qkv = _attention_inputs(graph, i)
    if qkv is None:
        return None, None, 0  # unmapped rewrites there stay in the graph check's way
    chains = []
    for x, what in zip(qkv, ("q_rope", "k_rope", "v_heads")):
        root, steps = rewrites.chain(x)
        if root.name != f"/layers.{i}/attn/{what}":
            raise QCompileError(f"layer {i}: attention reads {what} through nodes the CUDA runtime does not map; "
                                "run this graph on ONNX Runtime (--device cpu)")
        chains.append(steps)
    sq, sk, sv = chains
    if len(sq) > 1 or any(not isinstance(s, Hadamard) for s in sq) or sk[:len(sq)] != sq or (
            sk[len(sq):len(sq) + 1] and isinstance(sk[len(sq)], Hadamard)):
        raise QCompileError(f"layer {i}: queries ({describe(sq)}) and keys ({describe(sk)}) are not rotated alike "
                            "(R3 on both after RoPE); the CUDA runtime cannot map that")
    kv = sk[len(sq):]
    if kv != sv:
        raise QCompileError(f"layer {i}: keys ({describe(kv)}) and values ({describe(sv)}) are quantized "
                            "differently; the CUDA runtime's cache has one layout for both")
    if tuple(type(s) for s in kv) not in ((), (TokenQuantSpec,), (TokenQuantSpec, FloatPrefix)):
        raise QCompileError(f"layer {i}: KV rewrites {describe(kv)} are not per-token quantization with an optional "
                            "float prefix")
    return (sq[0] if sq else None), (kv[0] if kv else None), (kv[1].prefix if len(kv) == 2 else 0)


def _check_metadata(folder: Path, w: ModelWeights) -> None:
    """The rewrites read from the graph must be what qcompile.json says export wrote (when it says so)."""
    from qcompile.quant.activations import TokenQuantSpec

    path = folder / "qcompile.json"
    rq = read_json(path).get("runtime_quantization")
    if not rq:
        return
    linears = [lin for layer in w.layers for lin in layer.linears.values()]
    steps = [s for lin in linears for s in lin.input_steps]
    steps += list(w.head_input_steps) + (list(w.lm_head.input_steps) if w.lm_head is not None else [])
    r4 = any(isinstance(s, Hadamard) for s in steps)
    r3 = any(layer.r3 is not None for layer in w.layers)

    def base(desc: str) -> str:
        # bits and symmetry: groups and clip ratios come from the graph's own constants (a group as wide as the
        # input is written without one, and a learned clip ratio is rounded in the metadata's text)
        return " ".join(desc.split()[:2])

    acts: dict[str, int] = {}
    for s in steps:
        if isinstance(s, TokenQuantSpec):
            acts[base(s.describe())] = acts.get(base(s.describe()), 0) + 1
    meta_acts: dict[str, int] = {}
    for desc, count in (rq.get("activations") or {}).items():
        meta_acts[base(desc)] = meta_acts.get(base(desc), 0) + int(count)
    problems = []
    kv = rq.get("kv_cache")
    # R3 is recorded by `rotate` whether or not a KV quantizer made the graph apply it: the KV entry says
    meta_r3, meta_r4 = bool(kv and kv.get("r3")), bool({"r4", "ro"} & set(rq.get("online_rotations") or []))
    if (r3, r4) != (meta_r3, meta_r4):
        problems.append(f"online R3/R4 {r3}/{r4} in the graph, {meta_r3}/{meta_r4} in the metadata")
    if acts != meta_acts:
        problems.append(f"activation quantizers {acts} in the graph, {meta_acts} in the metadata")
    graph_kv = None if w.kv_quant is None else {"bits": w.kv_quant.bits, "symmetric": w.kv_quant.symmetric,
                                                "group_size": w.kv_quant.group_size, "prefix": w.kv_prefix}
    meta_kv = None if not kv else {k: kv.get(k) for k in ("bits", "symmetric", "group_size", "prefix")}
    if graph_kv is not None and graph_kv["group_size"] is None and meta_kv is not None and meta_kv["group_size"]:
        graph_kv["group_size"] = meta_kv["group_size"] if meta_kv["group_size"] == w.head_dim else None
    if graph_kv != meta_kv:
        problems.append(f"KV cache {graph_kv} in the graph, {meta_kv} in the metadata")
    if problems:
        raise QCompileError(f"{folder}: the graph's run-time rewrites disagree with qcompile.json ("
                            + "; ".join(problems) + ")")


def _fused_widths(graph, inits, base: str, width: int, parts: int) -> list[int]:
    """Output widths of a fused linear's members: the sizes of the Split reading its MatMul (after the bias Add),
    or q|k|v packed into GroupQueryAttention (num_heads and kv_num_heads heads of one width)."""
    w = next((n.outputs[0] for n in graph
              if n.op_type == "DequantizeLinear" and n.inputs[0].name == f"{base}.weight_q"),
             inits.get(f"{base}.weight"))
    y = next((n.outputs[0] for n, _ in w.uses() if n.op_type == "MatMul"), None) if w is not None else None
    readers = [n for n, _ in y.uses()] if y is not None else []
    if len(readers) == 1 and readers[0].op_type == "Add":
        readers = [n for n, _ in readers[0].outputs[0].uses()]
    node = readers[0] if len(readers) == 1 else None
    if node is not None and node.op_type == "Split" and _const(node.inputs[1]) is not None:
        widths = [int(x) for x in _const(node.inputs[1])]
    elif node is not None and node.op_type == "GroupQueryAttention" and parts == 3:
        heads, kv = node.attributes["num_heads"].value, node.attributes["kv_num_heads"].value
        d = width // (heads + 2 * kv)
        widths = [heads * d, kv * d, kv * d]
    else:
        raise QCompileError(f"fused linear {base}: its MatMul is not read by a Split or GroupQueryAttention")
    if len(widths) != parts or sum(widths) != width:
        raise QCompileError(f"fused linear {base}: {parts} members, split {widths} of {width} outputs")
    return widths


def _check_mapped(graph, n_layers: int, fused: int = 0, rewrites: set | None = None) -> None:
    """Refuse graphs with nodes the runner would silently skip. ``rewrites``: the nodes of the run-time rewrites
    matched and mapped (``runtime.triton.rewrites``); every other node must be an op the exporter writes, and the
    MatMuls among them exactly the 7 linears and 2 attention products per layer plus the head, less the ``fused``
    ones that share a MatMul (a GroupQueryAttention layer has no attention MatMuls). An unmapped rewrite leaves
    unknown ops (Round, Clip, ...) or extra MatMuls (a rotation) behind."""
    rewrites = rewrites or set()
    rest = [n for n in graph if n not in rewrites]
    ops = {n.op_type for n in rest}
    unknown = sorted(ops - KNOWN_OPS)
    matmuls = sum(1 for n in rest if n.op_type == "MatMul")
    attention_matmuls = 0 if "GroupQueryAttention" in ops else 2
    expected = (7 + attention_matmuls) * n_layers + 1 - fused
    if unknown or matmuls != expected:
        what = f"ops {', '.join(unknown)}" if unknown else f"{matmuls - expected} extra MatMuls"
        raise QCompileError(f"the graph has run-time rewrites the CUDA runtime does not map yet ({what}); it maps "
                            "weight-only graphs and graph.runtime_quant's online Hadamard rotations (R4 on a "
                            "linear's input, R3 on queries/keys), per-token activation fake quantization and the "
                            "per-token KV-cache quantization with a float prefix. Run this one on ONNX Runtime "
                            "(--device cpu)")


# -- modules -------------------------------------------------------------------------------------------------


def _silu_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` from a gate | up row, in the graph's order: ``(gate * sigmoid(gate)) * up``."""
    gate, up = x.float().chunk(2, -1)
    return (gate * torch.sigmoid(gate) * up).to(x.dtype)


class _Prologue:
    """What the graph computes on a linear's input before its MatMul (``ExportedLinear.input_steps``): an online
    Hadamard (``hadamard.hadamard_transform``, the graph's base matrix H_m), then per-token fake quantization
    (``act_quant.fake_quantize``), or, for the integer GEMM, the codes and scales themselves
    (``w8a8.quantize_rows``; fused into the Hadamard kernel's epilogue when the clip ratio is 1)."""

    def __init__(self, steps: tuple[Step, ...]):
        from qcompile.quant.activations import TokenQuantSpec

        self.steps = steps
        had = next((s for s in steps if isinstance(s, Hadamard)), None)
        self.n = had.n if had is not None else None
        # the kernel's own H_m for m = 1 (Sylvester); otherwise the graph's, as a CPU tensor
        self.left = None if had is None or had.m == 1 else torch.tensor(had.left, dtype=torch.float64)
        self.spec = next((s for s in steps if isinstance(s, TokenQuantSpec)), None)

    def __bool__(self) -> bool:
        return bool(self.steps)

    def integer_ready(self, k: int) -> bool:
        """Whether ``quantized`` can produce these inputs: symmetric, one group per token, 4 or 8 bits."""
        s = self.spec
        return s is not None and s.symmetric and s.group_size in (None, k) and s.bits in (4, 8)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        from qcompile.runtime.triton.hadamard import hadamard_transform

        return x if self.n is None else hadamard_transform(x, left=self.left)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from qcompile.runtime.triton.act_quant import fake_quantize

        x = self.rotate(x)
        s = self.spec
        return x if s is None else fake_quantize(x, s.bits, s.symmetric, s.group_size, s.clip_ratio)

    def quantized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes [M, K], float32 scales [M]) with ``codes * scale`` = ``self(x)``."""
        from qcompile.runtime.triton.hadamard import hadamard_transform
        from qcompile.runtime.triton.w8a8 import quantize_rows

        s = self.spec
        if self.n is not None and s.clip_ratio == 1.0:
            return hadamard_transform(x, left=self.left, quant_bits=s.bits)
        return quantize_rows(self.rotate(x), s.bits, clip_ratio=s.clip_ratio)


class _Linear:
    """Several linears reading the same input, side by side: one packed weight-only kernel when they share a
    quantization layout, else one float matmul over their (dequantized) weights. With run-time input rewrites
    (``steps``, shared by the parts): the prologue first, then that kernel; or, when the input is quantized
    symmetrically per token to 4/8 bits and the weight has 8-bit codes per channel (or in groups of 32k), the int8
    GEMM on the codes (``w8a8.int_linear``: the same products, accumulated exactly in int32)."""

    def __init__(self, parts: list[ExportedLinear], device, dtype, name: str, notes: list[str],
                 steps: tuple[Step, ...] = (), integer: list[str] | None = None, pdl: bool = False,
                 mma_gemv: bool = False):
        from qcompile.runtime.triton.packing import concat_packed, pack_from_export, pack_int_gemm

        self.pdl = pdl
        self.packed = None
        self.int_packed = None
        self.digits = None  # the weight in gemv_digits' layout too (``use_digits``): decode reads digit planes
        self.prologue = _Prologue(steps)
        self.out_features = sum(p.shape[1] for p in parts)
        same = len({(p.bits, p.group_size, p.zero is None, p.shape[0]) for p in parts}) == 1
        k = parts[0].shape[0]
        if (self.prologue and self.prologue.integer_ready(k) and same and all(p.quantized and p.bits == 8
                                                                              for p in parts)
                and (parts[0].group_size >= k or parts[0].group_size % 32 == 0)):
            def cat(field):
                vals = [getattr(p, field) for p in parts]
                return None if vals[0] is None else np.concatenate([np.asarray(v) for v in vals], -1)

            biased = any(p.bias is not None for p in parts)
            bias = None if not biased else np.concatenate(
                [p.bias if p.bias is not None else np.zeros(p.shape[1], np.float32) for p in parts])
            try:
                self.int_packed = pack_int_gemm(cat("qweight"), cat("scale"), cat("zero"), bits=8, layout="in_out",
                                                bias=bias, name=name).to(device)
                if integer is not None:
                    integer.append(name)
                return
            except ValueError as e:
                notes.append(f"{name}: {e}; fake-quantizing its input for the weight-only kernel")
        if all(p.quantized for p in parts) and same:
            try:
                packed = [pack_from_export(p.qweight, p.scale, p.zero, bits=p.bits, layout="in_out", dtype=dtype,
                                           bias=p.bias, name=name) for p in parts]
                self.packed = concat_packed(packed).to(device, dtype)
                if mma_gemv:  # the tensor-core GEMV's words beside the row-major ones (gemv_mma)
                    from qcompile.runtime.triton.gemv_mma import attach

                    self.packed = attach(self.packed)
                return
            except ValueError as e:  # e.g. a group size the kernels cannot pack: run it dequantized
                notes.append(f"{name}: {e}; running it as a float matmul")
        elif any(p.quantized for p in parts):
            notes.append(f"{name}: mixed quantization layouts; running it as a float matmul")
        self.weight = torch.from_numpy(np.concatenate([p.dequantize() for p in parts], 1).T.copy()).to(device, dtype)
        biased = any(p.bias is not None for p in parts)
        self.bias = None if not biased else torch.from_numpy(np.concatenate(
            [p.bias if p.bias is not None else np.zeros(p.shape[1], np.float32) for p in parts])).to(device, dtype)

    def use_digits(self, name: str, notes: list[str]) -> None:
        """Also keep the int4 weight in ``gemv_digits``' layout (another copy of its int4 memory): the decode step
        then hands this linear its input as digit planes, written by the RMSNorm before it (``from_planes``)."""
        from qcompile.runtime.triton.gemv_digits import digit_weight

        if self.packed is None or self.prologue:
            notes.append(f"{name}: not a plain weight-only linear; its decode GEMV stays the pointer GEMV")
            return
        try:
            # one slice (at default_layout's warps where it gives one: K = 2048 at 2): more slices made the 1.2B
            # Llama's K = 2048 GEMVs slower in PDL chains on the H100, also where N / 32 programs leave
            # multiprocessors idle (3072 x 2048 at 4 warps: 2.82 µs, in 2 slices 4.27 µs; docs/BENCHMARKS.md,
            # twenty-ninth session)
            self.digits = digit_weight(self.packed, splits=1)
        except ValueError as e:
            notes.append(f"{name}: {e}; its decode GEMV stays the pointer GEMV")

    def from_planes(self, planes: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The batch-1 output [1, N] (plus ``residual``) from the input's digit planes (int8 [8, K],
        ``use_digits``)."""
        from qcompile.runtime.triton.gemv_digits import gemv_digits

        return gemv_digits(planes, self.digits, bias=self.packed.bias, residual=residual, pdl=self.pdl)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None, act: str | None = None):
        if self.prologue:
            if act == "silu_mul":  # the rewrites read silu(gate) * up: compute it first
                x, act = _silu_mul(x), None
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1])
            if self.int_packed is not None:
                from qcompile.runtime.triton.w8a8 import int_linear

                xq, xs = self.prologue.quantized(x2)
                y = int_linear(xq, xs, self.int_packed, out_dtype=x.dtype).reshape(*lead, self.out_features)
                return y if residual is None else y + residual
            x = self.prologue(x2).reshape(*lead, x.shape[-1])
        if self.packed is not None:
            from qcompile.runtime.triton.wq_matmul import wq_linear

            return wq_linear(x, self.packed, residual=residual, act=act, pdl=self.pdl)
        if act == "silu_mul":
            gate, up = x.float().chunk(2, -1)
            x = (F.silu(gate) * up).to(x.dtype)
        y = F.linear(x, self.weight, self.bias)
        return y if residual is None else y + residual


class _Concat:
    """Linears reading one input with different input rewrites (e.g. q/k/v with their own learned clip ratios):
    each with its own prologue, outputs side by side."""

    def __init__(self, parts: list[_Linear]):
        self.parts = parts
        self.out_features = sum(p.out_features for p in parts)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None, act: str | None = None):
        y = torch.cat([p(x, act=act) for p in self.parts], -1)
        return y if residual is None else y + residual


@dataclass
class _Layer:
    qkv: _Linear | _Concat
    o: _Linear
    gate_up: _Linear | _Concat
    down: _Linear
    input_norm: torch.Tensor | None
    post_attn_norm: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    r3: _Prologue | None = None  # R3: the Hadamard on queries and keys after RoPE


class TritonCausalLM:
    """A causal LM on CUDA from ``ModelWeights``; ``generate`` mirrors ``OrtCausalLM.generate`` (batch 1).

    ``dtype``: float16 (fast) or float32 (exact path: fp32 activations, IEEE dots). ``kv_bits``: for a graph that
    quantizes its KV cache, that cache (its bits, symmetry, clip ratio and float prefix P, read from the graph;
    ``kv_bits`` may only repeat its bits); otherwise 16 (float cache, what the graph computes, the default), 8 or 4
    (quantized by this runner per token per head, the first ``float_prefix`` positions of each prompt kept in
    float, at most ``prefix_capacity``). ``cuda_graph`` captures the decode step. ``integer_linears`` lists the
    linears that run on the int8 GEMM (quantized inputs, 8-bit weights). ``pdl`` (default ``None``: on where the
    device supports it, sm_90+ and compiled kernels; ``True`` refuses other devices): the RMSNorms, RoPE and cache
    stores, decode attention and weight-only GEMVs (of prefill too) are launched as programmatic dependents (each
    may launch while the kernel before drains and waits in-kernel for its writes; the GEMVs stream their first
    weight tile before that wait), sm_90+; the rotations' kernels (R3's RoPE and store included), the int8 GEMMs
    and torch's ops launch as usual. Without it the attention's tuner may still pick a PDL launch of its own.
    ``mma_gemv`` (sm_90+): int4 weights in groups of 64 or 128 also kept in the tensor-core GEMV's layout
    (``gemv_mma``; twice their int4 memory), which the batch-1 GEMV's tuner then times beside the pointer GEMV, keeping
    the faster per shape (on the H100, a 7-10 % faster PDL chain at 4096 x 14336; docs/BENCHMARKS.md).
    ``digit_gemv`` (sm_90+, float16): the decode step's q|k|v, o and gate|up GEMVs run ``gemv_digits`` (the exact
    int4 GEMV on the int8 tensor cores) on digit planes that the RMSNorm or the attention before them writes beside
    its output, where the weight fits it (int4 in groups of 128, K of 512, 1024, 2048 or 4096, no input rewrites;
    the others are listed in ``notes``); those weights are kept a second time in its layout. down keeps the pointer
    GEMV (its input is SwiGLU's, computed in the GEMV's prologue). Prefill never uses it.
    """

    def __init__(self, weights: ModelWeights, *, device="cuda", dtype: torch.dtype = torch.float16,
                 kv_bits: int | None = None, prefix_capacity: int = 1024, max_seq_len: int | None = None,
                 cuda_graph: bool = True, pdl: bool | None = None, mma_gemv: bool = False,
                 digit_gemv: bool = False):
        require_triton()
        check_device(device)
        from qcompile.runtime.triton._tune import supports_pdl
        from qcompile.runtime.triton.kv_attention import KVCache

        if pdl is None:  # 5.9-14.7 % faster decode on the H100 (docs/BENCHMARKS.md); a plain launch elsewhere
            pdl = supports_pdl(device)
        if pdl and not supports_pdl(device) and not interpreting():
            raise QCompileError("pdl (programmatic dependent launch) needs an sm_90 or newer GPU")
        self.pdl = bool(pdl)
        if mma_gemv and dtype != torch.float16:  # its words would sit unused beside the fp32 / bf16 GEMV's
            raise QCompileError(f"mma_gemv runs the float16 decode's GEMV; this runner's dtype is {dtype}")
        if mma_gemv and not (supports_pdl(device) and not interpreting()):  # sm_90+ as PDL, compiled kernels
            raise QCompileError("mma_gemv (the tensor-core int4 GEMV) needs an sm_90 or newer GPU and compiled kernels")
        self.mma_gemv = mma_gemv
        if digit_gemv and (dtype != torch.float16 or not (supports_pdl(device) or interpreting())):
            raise QCompileError(f"digit_gemv (the int4 GEMV on digit planes) needs float16 ({dtype} asked) and an "
                                "sm_90 or newer GPU (or Triton's interpreter)")

        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise QCompileError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        self.w = weights
        self.device = torch.device(device)
        self.dtype = dtype
        self.kv_spec = weights.kv_quant  # the graph's KV quantization (TokenQuantSpec) or None
        kv_symmetric, kv_clip = False, 1.0
        if self.kv_spec is not None:
            spec = self.kv_spec
            if kv_bits not in (None, spec.bits):
                raise QCompileError(f"the graph quantizes its KV cache to {spec.describe()}; kv_bits {kv_bits} "
                                    f"cannot change that (leave it out)")
            if spec.bits not in (4, 8) or spec.group_size not in (None, weights.head_dim):
                raise QCompileError(f"the graph's KV cache is {spec.describe()}; the CUDA runtime's cache holds 8- or "
                                    "4-bit codes with one scale and zero point per token and head (no groups "
                                    "within a head). Run this graph on ONNX Runtime (--device cpu)")
            kv_bits, kv_symmetric, kv_clip = spec.bits, spec.symmetric, spec.clip_ratio
            prefix_capacity = max(1, weights.kv_prefix)
        self.kv_bits = 16 if kv_bits is None else kv_bits
        self.notes: list[str] = []
        self.integer_linears: list[str] = []
        self.max_seq_len = int(max_seq_len or min(weights.max_position, 4096))
        w = weights
        self.num_heads, self.num_kv_heads, self.head_dim = w.num_heads, w.num_kv_heads, w.head_dim

        def t(a):
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dtype)

        self.embed = t(w.embed)
        self.lm_head = None if w.lm_head is None else self._linear([w.lm_head], "lm_head")
        self.head_prologue = _Prologue(w.head_input_steps)  # a tied head's input rewrites
        self.final_norm = t(w.final_norm)
        unit = torch.ones(w.head_dim, device=self.device, dtype=torch.float32)
        self.layers = []
        for i, lw in enumerate(w.layers):
            lin = lw.linears
            if lw.r3 is not None and lw.r3.n != w.head_dim:
                raise QCompileError(f"layer {i}: R3 of order {lw.r3.n} on heads of {w.head_dim}")
            self.layers.append(_Layer(
                qkv=self._linear([lin["q"], lin["k"], lin["v"]], f"layers.{i}.qkv"),
                o=self._linear([lin["o"]], f"layers.{i}.o"),
                gate_up=self._linear([lin["gate"], lin["up"]], f"layers.{i}.gate_up"),
                down=self._linear([lin["down"]], f"layers.{i}.down"),
                input_norm=t(lw.input_norm), post_attn_norm=t(lw.post_attn_norm),
                # a q/k norm whose scale was all ones has no weight in the graph but still normalizes
                q_norm=t(lw.q_norm) if lw.q_norm is not None else unit if w.has_qk_norm else None,
                k_norm=t(lw.k_norm) if lw.k_norm is not None else unit if w.has_qk_norm else None,
                r3=_Prologue((lw.r3,)) if lw.r3 is not None else None,
            ))
        # digit_gemv: the digit planes of the RMSNorms' outputs and of the attention's, read by the next GEMV
        self._planes = self._attn_planes = None
        if digit_gemv:
            for i, layer in enumerate(self.layers):
                for role in ("qkv", "o", "gate_up"):
                    lin = getattr(layer, role)
                    if isinstance(lin, _Linear):
                        lin.use_digits(f"layers.{i}.{role}", self.notes)
                    else:
                        self.notes.append(f"layers.{i}.{role}: parts with their own input rewrites; its decode "
                                          "GEMV stays the pointer GEMV")
            self._planes = torch.zeros(8, w.hidden_size, dtype=torch.int8, device=self.device)
            self._attn_planes = torch.zeros(8, w.num_heads * w.head_dim, dtype=torch.int8, device=self.device)
        q_out = self.layers[0].qkv.out_features if self.layers else 0
        if q_out != (w.num_heads + 2 * w.num_kv_heads) * w.head_dim:
            raise QCompileError(f"q/k/v weights have {q_out} outputs, the config says "
                                f"{(w.num_heads + 2 * w.num_kv_heads) * w.head_dim}")
        pos = torch.arange(self.max_seq_len, dtype=torch.float32)[:, None] * torch.from_numpy(w.inv_freq)[None]
        self.cos = (pos.cos() * w.rope_scaling).to(self.device).contiguous()
        self.sin = (pos.sin() * w.rope_scaling).to(self.device).contiguous()
        self.window = int(w.sliding_window) if w.sliding_window else 0
        self.caches = [KVCache.allocate(1, w.num_kv_heads, w.head_dim, self.max_seq_len, self.kv_bits,
                                        prefix_capacity, dtype, self.device, symmetric=kv_symmetric,
                                        clip_ratio=kv_clip) for _ in self.layers]
        self._check_rotations()
        # decode state, advanced by the step itself (and so by the captured graph)
        self._tok = torch.zeros(1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._lens = torch.ones(1, dtype=torch.int32, device=self.device)
        self._prefix = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._logits = None
        self._next = torch.zeros(1, dtype=torch.long, device=self.device)  # the step's argmax
        self._graph = None
        self._host_pos = 0
        if cuda_graph and self.device.type == "cuda":
            self._capture()

    @classmethod
    def from_dir(cls, folder: str | os.PathLike, **kwargs) -> TritonCausalLM:
        require_triton()
        check_device(kwargs.get("device", "cuda"))  # before reading the weights
        return cls(load_exported(folder), **kwargs)

    def _linear(self, parts: list[ExportedLinear], name: str):
        """One module for linears reading the same input: a single ``_Linear`` when their input rewrites agree
        (always, unless e.g. learned clip ratios differ between q, k and v), else one per run of equal ones."""
        runs: list[list[ExportedLinear]] = []
        for p in parts:
            if runs and runs[-1][0].input_steps == p.input_steps:
                runs[-1].append(p)
            else:
                runs.append([p])
        mods = [_Linear(run, self.device, self.dtype, name if len(runs) == 1 else f"{name}[{j}]", self.notes,
                        run[0].input_steps, self.integer_linears, pdl=self.pdl, mma_gemv=self.mma_gemv)
                for j, run in enumerate(runs)]
        return mods[0] if len(mods) == 1 else _Concat(mods)

    def _check_rotations(self) -> None:
        """Every online Hadamard once on a zero row: an order the kernel cannot tile fails here, not mid-decode."""
        from qcompile.runtime.triton.hadamard import hadamard_transform

        seen = set()
        for layer in self.layers:
            mods = [layer.r3] + [m for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)
                                 for m in (lin.parts if isinstance(lin, _Concat) else [lin])]
            for pro in [m if isinstance(m, _Prologue) else getattr(m, "prologue", None) for m in mods]:
                if pro is None or pro.n is None or (pro.n, pro.steps[0]) in seen:
                    continue
                seen.add((pro.n, pro.steps[0]))
                try:
                    hadamard_transform(torch.zeros(1, pro.n, device=self.device, dtype=self.dtype), left=pro.left)
                except ValueError as e:
                    raise QCompileError(f"online {pro.steps[0].describe()}: {e}") from e

    # -- forward pieces ------------------------------------------------------------------------------------
    def _norm(self, x, w, planes=None):
        from qcompile.runtime.triton.norm import rms_norm

        return rms_norm(x, w, self.w.rms_eps, pdl=self.pdl, planes=planes)

    def _norm_linear(self, h: torch.Tensor, w, linear):
        """``linear(norm(h))`` for one decode token (not prefill: the planes hold one row); a linear that reads digit
        planes (``digit_gemv``) gets them from the norm instead of its fp16 output."""
        if getattr(linear, "digits", None) is None:
            return linear(self._norm(h, w))
        self._norm(h, w, planes=self._planes)
        return linear.from_planes(self._planes)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        x = self._norm(h, self.final_norm)
        if self.lm_head is not None:
            return self.lm_head(x)
        if self.head_prologue:
            x = self.head_prologue(x)
        return F.linear(x, self.embed)

    def _qkv_rope(self, layer: _Layer, cache, qkv: torch.Tensor, pos: torch.Tensor, t: int, out_kv: bool):
        """RoPE (and q/k norms) and the cache store; with R3, the Hadamard on q and k after RoPE first, then the
        store (``store_kv``), as the graph rotates before its KV quantizer. Returns q, or (q, k, v) with
        ``out_kv`` (k after R3, float: the cache's float view is taken by the caller)."""
        from qcompile.runtime.triton.kv_attention import rope_store, store_kv

        nh, nkv = self.num_heads, self.num_kv_heads
        kw = dict(q_norm=layer.q_norm, k_norm=layer.k_norm, eps=self.w.rms_eps)
        if layer.r3 is None:
            return rope_store(qkv, pos, t, self.cos, self.sin, cache, self._prefix, nh, nkv, out_kv=out_kv,
                              pdl=self.pdl, **kw)
        q, k, v = rope_store(qkv, pos, t, self.cos, self.sin, cache, self._prefix, nh, nkv, out_kv=True,
                             store=False, **kw)
        q, k = layer.r3.rotate(q), layer.r3.rotate(k)
        store_kv(k, v, pos, t, cache, self._prefix)
        return (q, k, v) if out_kv else q

    def _step(self) -> None:
        """One decode token: reads ``_tok``/``_pos``/``_lens``, writes ``_logits``/``_next``, advances the state."""
        from qcompile.runtime.triton.argmax import argmax
        from qcompile.runtime.triton.kv_attention import decode_attention

        nh, d = self.num_heads, self.head_dim
        h = self.embed.index_select(0, self._tok)
        for layer, cache in zip(self.layers, self.caches):
            qkv = self._norm_linear(h, layer.input_norm, layer.qkv)
            q = self._qkv_rope(layer, cache, qkv, self._pos, 1, out_kv=False)
            planes = self._attn_planes if layer.o.digits is not None else None  # o reads the attention's planes
            attn = decode_attention(q.view(1, nh, d), cache, self._lens, self._prefix, window=self.window,
                                    pdl=self.pdl, planes=planes)
            h = (layer.o(attn.view(1, nh * d), residual=h) if planes is None
                 else layer.o.from_planes(planes, residual=h))
            h = layer.down(self._norm_linear(h, layer.post_attn_norm, layer.gate_up), act="silu_mul", residual=h)
        self._logits = self._head(h)
        # torch's pick, one launch of about a program per SM (argmax.py), whose last program also feeds the pick
        # back as the next token and advances the position and the length
        argmax(self._logits[0], out=self._next, copy_to=self._tok, advance=(self._pos, self._lens))

    def _capture(self) -> None:
        """Warm up (tunes every kernel for these shapes, sizes the workspaces), then capture one decode step."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self._graph = graph
        self._reset()
        # the warm-up steps wrote positions 0 and 1 with no float prefix set (quantized codes and scales where a
        # prefill would keep floats): start from what allocate() gave, as the eager runner does
        for cache in self.caches:
            cache.clear()

    def _reset(self) -> None:
        self._tok.zero_()
        self._pos.zero_()
        self._lens.fill_(1)

    @torch.inference_mode()
    def prefill(self, input_ids, float_prefix: int = 0, all_logits: bool = False) -> torch.Tensor:
        """Run the prompt from position 0, fill the caches; returns the last token's logits [vocab] (float32), or
        every position's [T, vocab] with ``all_logits``. ``float_prefix`` positions stay in float (kv_bits < 16);
        a graph that quantizes its KV cache fixes that prefix itself (P, from the graph), and ``float_prefix`` is
        ignored, as ORT ignores it. Attention over the prompt reads what the graph's attention reads: its keys
        and values fake-quantized from position P on, when the graph quantizes them."""
        from qcompile.runtime.triton.act_quant import fake_quantize

        ids = torch.as_tensor(list(input_ids), dtype=torch.long, device=self.device)
        t = ids.numel()
        if t == 0 or t > self.max_seq_len:
            raise QCompileError(f"prompt of {t} tokens does not fit the {self.max_seq_len}-token cache")
        spec = self.kv_spec
        if spec is not None:
            prefix = min(self.w.kv_prefix, self.max_seq_len)
        else:
            cap = self.caches[0].prefix_capacity if self.kv_bits < 16 else self.max_seq_len
            prefix = min(max(0, int(float_prefix)), cap)
        self._prefix.fill_(prefix)
        nh, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        pos = torch.arange(t, dtype=torch.int32, device=self.device)
        mask = None
        if self.window and t > self.window:
            i = torch.arange(t, device=self.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)
        h = self.embed.index_select(0, ids)
        for layer, cache in zip(self.layers, self.caches):
            qkv = layer.qkv(self._norm(h, layer.input_norm))
            q, k, v = self._qkv_rope(layer, cache, qkv, pos, t, out_kv=True)
            if spec is not None:  # what the cache holds: fake-quantized from position P on
                kq, vq = (fake_quantize(x, spec.bits, spec.symmetric, spec.group_size, spec.clip_ratio) for x in (k, v))
                if prefix > 0:
                    keep = (pos < prefix)[:, None, None]
                    kq, vq = torch.where(keep, k, kq), torch.where(keep, v, vq)
                k, v = kq, vq
            q, k, v = (x.view(1, t, -1, d).transpose(1, 2) for x in (q, k, v))
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                  scale=1.0 / math.sqrt(d), enable_gqa=nh != nkv)
            h = layer.o(attn.transpose(1, 2).reshape(t, nh * d), residual=h)
            h = layer.down(layer.gate_up(self._norm(h, layer.post_attn_norm)), act="silu_mul", residual=h)
        logits = self._head(h if all_logits else h[-1:]).float()
        self._pos.fill_(t)
        self._lens.fill_(t + 1)
        self._host_pos = t
        return logits if all_logits else logits[0]

    @torch.inference_mode()
    def decode(self, token: int) -> torch.Tensor:
        """Feed one token after the current position; returns its logits [vocab] (float32, a tensor of its own: the
        step's buffer is overwritten by the next step)."""
        if self._host_pos >= self.max_seq_len:
            raise QCompileError(f"the {self.max_seq_len}-token cache is full")
        self._host_pos += 1
        self._tok.fill_(int(token))
        self._advance()
        return self._logits[0].to(torch.float32, copy=True)

    def _advance(self) -> None:
        """One decode step from the state on the device: the captured graph where there is one, else eager."""
        if self._graph is not None:
            self._graph.replay()
        else:
            self._step()

    @torch.inference_mode()
    def greedy_steps(self, token: int, steps: int) -> torch.Tensor:
        """``steps`` greedy decode steps after the current position, the first fed ``token``, with no host round trip
        between them: the step itself feeds its argmax to the next (as the captured step does). Returns the tokens
        it chose [steps] (int64, on the device; reading them is the one synchronization): those that ``decode``
        and an argmax of each step's logits give, without waiting for each token on the host."""
        if steps < 1:
            raise QCompileError(f"steps must be at least 1, got {steps}")
        if self._host_pos + steps > self.max_seq_len:
            raise QCompileError(f"{steps} steps after position {self._host_pos} exceed the {self.max_seq_len}-token "
                                "cache (max_seq_len)")
        out = torch.empty(steps, dtype=torch.long, device=self.device)
        self._tok.fill_(int(token))
        for i in range(steps):
            self._advance()
            out[i:i + 1].copy_(self._next)
        self._host_pos += steps
        return out

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens: int, *, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, eos_token_id=None, on_token=None,
                 float_prefix: int = 0) -> list[int]:
        """New tokens after the prompt (eos included when reached), as ``OrtCausalLM.generate``. Greedy decoding runs
        its steps in device-fed chunks (``greedy_steps``), so ``on_token`` hears of them a chunk at a time."""
        ids = list(input_ids)
        if len(ids) + max_new_tokens > self.max_seq_len:
            raise QCompileError(f"{len(ids)} prompt + {max_new_tokens} new tokens exceed the {self.max_seq_len}-"
                                "token cache (max_seq_len)")
        eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        logits = self.prefill(ids, float_prefix)
        if not (do_sample and temperature > 0):
            return self._generate_greedy(int(torch.argmax(logits).item()), max_new_tokens, eos, on_token)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        out: list[int] = []
        for i in range(max_new_tokens):
            token = _sample(logits, temperature, top_p, gen)
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token in eos or i == max_new_tokens - 1:
                break
            logits = self.decode(token)
        return out

    def _generate_greedy(self, first: int, max_new_tokens: int, eos: set, on_token) -> list[int]:
        """``first`` and the greedy tokens after it, in chunks of ``GREEDY_CHUNK`` device-fed steps (``greedy_steps``):
        the host waits once a chunk instead of once a token. A chunk may run a few steps past an eos; those are
        dropped."""
        out: list[int] = []
        chunk = [first] if max_new_tokens > 0 else []
        while chunk:
            for token in chunk:
                out.append(token)
                if on_token is not None:
                    on_token(token)
                if token in eos or len(out) == max_new_tokens:
                    return out
            chunk = self.greedy_steps(out[-1], min(GREEDY_CHUNK, max_new_tokens - len(out))).tolist()
        return out


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    probs = torch.softmax(logits.double().cpu() / temperature, -1)
    if top_p < 1.0:  # smallest set of most likely tokens whose mass reaches top_p
        sorted_p, order = torch.sort(probs, descending=True)
        keep = int(torch.searchsorted(torch.cumsum(sorted_p, 0), torch.tensor([top_p], dtype=torch.float64))) + 1
        mask = torch.zeros_like(probs)
        mask[order[:keep]] = probs[order[:keep]]
        probs = mask / mask.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


def system_prefix_length(tokenizer, system: str | None, ids: list[int]) -> int:
    """Tokens of the chat template's system turn when they start ``ids`` (the prompt part BiSup keeps in float)."""
    if not system:
        return 0
    sys_ids = tokenizer.apply_chat_template([{"role": "system", "content": system}], tokenize=True)
    if isinstance(sys_ids, dict) or hasattr(sys_ids, "keys"):
        sys_ids = sys_ids["input_ids"]
    sys_ids = list(sys_ids)
    return len(sys_ids) if ids[:len(sys_ids)] == sys_ids else 0
