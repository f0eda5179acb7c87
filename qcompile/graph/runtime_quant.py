"""Graph pass: the run-time parts of a rotated, activation- and KV-quantized model.

Applied after ``weight_qdq``, in the order the data flows:

1. **online Hadamard R4**: ``x <- x @ H`` on the input of each down_proj MatMul (the pass ``rotate`` folded
   ``H`` into the weight);
2. **activation quantization**: per-token fake quantization (``quant_nodes.fake_quantize_tokens``) on the
   input of each MatMul whose linear has an entry in ``act_quant``; linears reading the same tensor with the
   same spec (q/k/v, gate/up) share one quantizer;
3. **R3 and the KV cache**: queries and keys after RoPE get ``@ H_head`` (the builder names those values
   ``/layers.{i}/attn/q_rope`` and ``k_rope``); the new keys (after R3) and values are fake-quantized per token
   per head before they are concatenated into ``present.*``, except positions ``< prefix`` (from
   ``position_ids``), which stay float: BiSup's prompt mixed precision. ``present.*`` stay float32 tensors
   holding the dequantized grid values, so Optimum's decoder contract (float past in, float present out) holds
   and the graph computes exactly what the torch reference does; the memory saving of a low-bit cache is
   realised by the Triton runtime, which stores the integers.

Every rewrite replaces the uses of one value by a new value computed from it; nothing else in the graph moves.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from qcompile.graph.quant_nodes import Emitter, fake_quantize_tokens, hadamard
from qcompile.quant.activations import TokenQuantSpec


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    out = {v.name: v for v in graph.inputs}
    for node in graph:
        for v in node.outputs:
            if v.name:
                out[v.name] = v
    return out


def _matmul_of(graph: ir.Graph, values: dict[str, ir.Value], linear: str) -> ir.Node:
    """The MatMul computing linear ``linear`` (its weight is ``{linear}.weight_dq`` or the float initializer)."""
    w = values.get(f"{linear}.weight_dq") or graph.initializers.get(f"{linear}.weight")
    if w is None:
        raise ValueError(f"no weight for linear {linear} in the graph")
    users = [n for n, _ in w.uses() if n.op_type == "MatMul"]
    if len(users) != 1:
        raise ValueError(f"linear {linear}: expected one MatMul reading its weight, found {len(users)}")
    return users[0]


def _insert(graph: ir.Graph, e: Emitter, before: ir.Node) -> None:
    if e.nodes:
        graph.insert_before(before, e.nodes)


def _first_user(graph: ir.Graph, users: list[ir.Node]) -> ir.Node:
    users = set(users)
    return next(n for n in graph if n in users)


def online_hadamard_inputs(graph: ir.Graph, linears: list[str], matrix: torch.Tensor, factors, dense: bool) -> int:
    """``x @ matrix`` on the input of each linear in ``linears`` (R4, Ro)."""
    values = _values_by_name(graph)
    for name in linears:
        mm = _matmul_of(graph, values, name)
        x = mm.inputs[0]
        e = Emitter(f"/{name}/online_hadamard")
        y = hadamard(e, x, 3, matrix, factors, dense)
        _insert(graph, e, mm)
        mm.replace_input_with(0, y)
    return len(linears)


def quantize_activations(graph: ir.Graph, act_quant: dict[str, TokenQuantSpec], dims: dict[str, int]) -> int:
    """Per-token fake quantization of each listed linear's input; returns the number of quantizers inserted."""
    values = _values_by_name(graph)
    shared: dict[tuple, ir.Value] = {}
    inserted = 0
    for name, spec in act_quant.items():
        mm = _matmul_of(graph, values, name)
        x = mm.inputs[0]
        key = (id(x), spec)
        if key not in shared:
            readers = [n for n, _ in x.uses() if n.op_type == "MatMul"]
            e = Emitter(f"/{name}/act_quant")
            shared[key] = fake_quantize_tokens(e, x, 3, dims[name], spec)
            _insert(graph, e, _first_user(graph, readers))
            inserted += 1
        mm.replace_input_with(0, shared[key])
    return inserted


def quantize_kv(graph: ir.Graph, num_layers: int, head_dim: int, spec: TokenQuantSpec, prefix: int,
                r3: torch.Tensor | None, r3_factors, dense: bool) -> dict:
    """R3 on queries/keys and fake quantization of new keys/values (positions >= prefix) in every layer."""
    values = _values_by_name(graph)
    keep_float = None
    if prefix > 0:
        e = Emitter("/kv_prefix")
        cond = e.op("Less", values["position_ids"], e.const(np.int64(prefix), np.int64))
        keep_float = e.op("Unsqueeze", cond, e.const([1, 3], np.int64))  # [B, 1, S, 1]
        graph.insert_before(next(iter(graph)), e.nodes)
    for i in range(num_layers):
        q = values[f"/layers.{i}/attn/q_rope"]
        k = values[f"/layers.{i}/attn/k_rope"]
        v = values[f"/layers.{i}/attn/v_heads"]
        e = Emitter(f"/layers.{i}/kv_quant")
        q_uses, k_uses, v_uses = list(q.uses()), list(k.uses()), list(v.uses())
        q2, k_rot = q, k
        if r3 is not None:
            q2, k_rot = hadamard(e, q, 4, r3, r3_factors, dense), hadamard(e, k, 4, r3, r3_factors, dense)
        k2 = fake_quantize_tokens(e, k_rot, 4, head_dim, spec)
        v2 = fake_quantize_tokens(e, v, 4, head_dim, spec)
        if keep_float is not None:
            k2, v2 = e.op("Where", keep_float, k_rot, k2), e.op("Where", keep_float, v, v2)
        _insert(graph, e, _first_user(graph, [n for n, _ in q_uses + k_uses + v_uses]))
        for old, new, uses in ((q, q2, q_uses), (k, k2, k_uses), (v, v2, v_uses)):
            if new is not old:
                for node, idx in uses:
                    node.replace_input_with(idx, new)
    return {"layers": num_layers, "r3": r3 is not None, "kv": spec.describe(), "float_prefix": prefix}


def apply(model: ir.Model, handle, dense_hadamard: bool = False) -> dict:
    """All of the above for what ``handle`` records (``online_rotations``, ``act_quant``, ``kv_quant``)."""
    from qcompile.passes.rotate import ONLINE_INPUT_ROTATIONS, online_rotation_matrix
    from qcompile.quant.hadamard import hadamard_factors

    graph = model.graph
    stats: dict = {}
    for name, (role, _, stat) in ONLINE_INPUT_ROTATIONS.items():
        if name in handle.online_rotations:
            matrix = online_rotation_matrix(handle, name)
            linears = [n for n, r, _ in handle.linears() if r == role]
            stats[stat] = online_hadamard_inputs(graph, linears, matrix, hadamard_factors(matrix.shape[0]),
                                                 dense_hadamard)
    if handle.act_quant:
        dims = {n: handle.model.get_submodule(n).in_features for n in handle.act_quant}
        stats["activation_quantizers"] = quantize_activations(graph, handle.act_quant, dims)
    kv = handle.kv_quant
    if kv is not None:
        head_dim = handle.adapter.geometry(handle.model).head_dim
        stats["kv"] = quantize_kv(graph, len(handle.adapter.layers(handle.model)), head_dim, kv.spec, kv.prefix,
                                  kv.r3, hadamard_factors(head_dim) if kv.r3 is not None else None, dense_hadamard)
    return stats
