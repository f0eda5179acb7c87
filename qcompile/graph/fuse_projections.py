"""Graph pass: linears that read the same input become one MatMul (``export.fuse_projections``).

Per layer, each group of linears the family adapter lists as readers of one norm's output (q|k|v after the
input norm, gate|up after the post-attention norm) gets its weights concatenated along the output dimension N and
computed by one ``MatMul``; a ``Split`` hands the columns back to the old readers. Blockwise (and per-channel)
quantization runs along K within each output column, so the concatenation is exact: the same integers, scales and
zero points side by side behind one ``DequantizeLinear``, and ONNX Runtime fuses one ``MatMulNBits`` per group
instead of three (or two). Biases (Qwen2's q/k/v) are concatenated into one ``Add`` after the MatMul. Where q|k|v
go straight into ``GroupQueryAttention`` (RoPE inside the op, no q/k norms), the op reads them packed, as
onnxruntime-genai's builder writes it, and there is no Split.

Applied last, after ``weight_qdq`` and ``runtime_quant``: the KV-cache rewrites act on tensors after the
projections (untouched here), and q/k/v (gate/up) with the same activation-quantization spec already share one
quantized input. Groups whose members read different inputs or store their weights differently (float vs
integer, other bits, group size, zero points) are refused: fusing them would change what the graph computes.

Fused linears are named after their members, ``{first}+{sibling}...`` with siblings relative to the first one's
parent module (``model.layers.0.self_attn.q_proj+k_proj+v_proj``); their initializers follow ``weight_qdq``'s
names (``{fused}.weight_q|weight_scale|weight_zero``, or ``{fused}.weight``) plus ``{fused}.bias``.
:func:`member_names` parses a fused name back (the Triton runner reads fused graphs with it).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.errors import RecipeError
from qcompile.graph.quant_nodes import Emitter
from qcompile.graph.runtime_quant import _first_user, _matmul_of, _values_by_name

SEPARATOR = "+"


def fused_name(members: list[str]) -> str:
    parent = members[0].rsplit(".", 1)[0] + "."
    tails = [m.removeprefix(parent) if m.startswith(parent) and "." not in m.removeprefix(parent) else m
             for m in members[1:]]
    return SEPARATOR.join([members[0], *tails])


def member_names(name: str) -> list[str]:
    """The linears a fused name stands for (a name without ``+`` stands for itself)."""
    head, *tails = name.split(SEPARATOR)
    parent = head.rsplit(".", 1)[0]
    return [head] + [t if "." in t else f"{parent}.{t}" for t in tails]


def _concat(graph: ir.Graph, values: list[ir.Value], name: str) -> ir.Value:
    """One initializer holding ``values`` side by side along their last axis (N), built only when saved."""
    tensors = [v.const_value for v in values]
    dtype = tensors[0].dtype
    shape = (*tensors[0].shape[:-1], sum(t.shape[-1] for t in tensors))

    def materialize() -> ir.Tensor:
        return ir.tensor(np.concatenate([t.numpy() for t in tensors], axis=-1), dtype=dtype, name=name)

    value = ir.val(name, const_value=ir.LazyTensor(materialize, dtype=dtype, shape=ir.Shape(shape), name=name))
    graph.register_initializer(value)
    return value


def _layout(mm: ir.Node) -> tuple:
    """What must agree for two weights to be concatenated: float, or the integer type, DequantizeLinear's
    attributes and whether there is a zero point; and the input dimension K."""
    w = mm.inputs[1]
    dq = w.producer()
    if dq is None:
        return ("float", w.shape[0])
    q = dq.inputs[0]
    attrs = tuple(sorted((k, a.value) for k, a in dq.attributes.items()))
    return (q.dtype.name.lower(), attrs, len(dq.inputs) > 2 and dq.inputs[2] is not None, q.shape[0])


def _bias_add(graph: ir.Graph, mm: ir.Node, name: str) -> ir.Node | None:
    """The ``Add`` of ``{name}.bias`` when it is the MatMul output's only reader."""
    uses = list(mm.outputs[0].uses())
    bias = graph.initializers.get(f"{name}.bias")
    if bias is None or len(uses) != 1 or uses[0][0].op_type != "Add" or bias not in uses[0][0].inputs:
        return None
    return uses[0][0]


def _fuse(graph: ir.Graph, values: dict[str, ir.Value], members: list[str]) -> bool:
    """Rewrite one group; returns whether GroupQueryAttention now reads it packed."""
    fused = fused_name(members)
    mms = [_matmul_of(graph, values, m) for m in members]
    x = mms[0].inputs[0]
    if any(mm.inputs[0] is not x for mm in mms):
        raise RecipeError(f"export.fuse_projections: {', '.join(members)} read different inputs (e.g. activation "
                          "quantizers with different specs); export them unfused (export.fuse_projections=false)")
    layouts = [_layout(mm) for mm in mms]
    if len(set(layouts)) != 1:
        raise RecipeError(f"export.fuse_projections: {', '.join(members)} store their weights differently "
                          f"({'; '.join(map(str, layouts))}); export them unfused (export.fuse_projections=false)")
    dqs = [mm.inputs[1].producer() for mm in mms]
    old_inits = [v for dq, mm in zip(dqs, mms) for v in (dq.inputs if dq is not None else [mm.inputs[1]])
                 if v is not None]
    widths = [mm.inputs[1].shape[1] for mm in mms]
    e = Emitter(f"/{fused}")
    if dqs[0] is None:
        w = _concat(graph, [mm.inputs[1] for mm in mms], f"{fused}.weight")
    else:
        parts = [_concat(graph, [dq.inputs[i] for dq in dqs], f"{fused}.{suffix}")
                 for i, suffix in enumerate(("weight_q", "weight_scale", "weight_zero")[: len(dqs[0].inputs)])]
        w = e.tape.op("DequantizeLinear", parts, attributes={k: a.value for k, a in dqs[0].attributes.items()},
                      name=f"{fused}/DequantizeLinear", output=ir.val(f"{fused}.weight_dq"))
        w.dtype, w.shape = ir.DataType.FLOAT, ir.Shape((mms[0].inputs[1].shape[0], sum(widths)))
    y = e.op("MatMul", x, w)
    adds = [_bias_add(graph, mm, m) for mm, m in zip(mms, members)]
    outs = [mm.outputs[0] for mm in mms]
    if all(a is not None for a in adds):
        biases = [graph.initializers[f"{m}.bias"] for m in members]
        old_inits += biases
        y = e.op("Add", y, _concat(graph, biases, f"{fused}.bias"))
        outs = [a.outputs[0] for a in adds]
    else:
        adds = []
    readers = [list(o.uses()) for o in outs]
    gqa = readers[0][0][0] if readers[0] else None
    packed = (len(outs) == 3 and gqa is not None and gqa.op_type == "GroupQueryAttention"
              and all(r == [(gqa, i)] for i, r in enumerate(readers)))
    if not packed:
        split = e.tape.op_multi_out("Split", [y, e.const(widths, np.int64)], attributes={"axis": -1},
                                    num_outputs=len(outs), name=f"/{fused}/Split")
    graph.insert_before(_first_user(graph, mms), e.nodes)
    if packed:  # GroupQueryAttention's packed form: query holds q|k|v, key and value are left empty
        gqa.replace_input_with(0, y)
        gqa.replace_input_with(1, None)
        gqa.replace_input_with(2, None)
    else:
        for old, new in zip(outs, split):
            old.replace_all_uses_with(new)
    graph.remove([*adds, *mms, *(dq for dq in dqs if dq is not None)], safe=True)
    for v in old_inits:
        if not v.uses():
            del graph.initializers[v.name]
    return packed


def apply(model: ir.Model, handle) -> dict:
    """Fuse every layer's groups of ``handle.adapter.norm_consumers``; returns statistics for the report."""
    graph = model.graph
    values = _values_by_name(graph)
    names = {m: n for n, m in handle.model.named_modules()}
    groups = packed = removed = 0
    for layer in handle.adapter.layers(handle.model):
        for _, linears in handle.adapter.norm_consumers(layer):
            if len(linears) < 2:
                continue
            packed += _fuse(graph, values, [names[m] for m in linears])
            groups += 1
            removed += len(linears) - 1
    return {"groups": groups, "matmuls_removed": removed, "gqa_reads_packed_qkv": packed}
