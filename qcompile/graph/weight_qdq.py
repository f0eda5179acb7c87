"""Graph pass: float linear weights -> integer initializers + ``DequantizeLinear`` (opset 21).

For each quantized linear ``name``, the ``MatMul`` weight ``{name}.weight`` ([in, out], float32) becomes

* ``{name}.weight_q``: ``qweight^T`` as int4 (symmetric) / uint4 (asymmetric) for bits <= 4, int8 / uint8 for
  5..8 bits. 2- and 3-bit weights live in the 4-bit containers (ONNX has no narrower integer type), so they
  take as much space as 4-bit ones;
* ``{name}.weight_scale``: ``scale^T`` float32 [in/group, out] (per-channel: [out]);
* ``{name}.weight_zero``: ``zero^T`` in the weight's type, asymmetric only (DequantizeLinear's default is 0);

read by ``DequantizeLinear(axis=0, block_size=group)`` (per-channel: ``axis=1``). The integers and scales are
``QuantizedWeight``'s own, never re-rounded, so the graph computes exactly what the torch fake-quant model does,
and ONNX Runtime (1.32) fuses each DequantizeLinear -> MatMul pair into ``MatMulNBits`` when the block size is a
power of two >= 16 (4- and 8-bit alike; per-channel too, as blocks of 32); smaller blocks stay unfused and are
dequantized on every run.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from qcompile.quant.grid import QuantizedWeight

# (bits <= 4, symmetric) -> (numpy dtype, ONNX type)
_CONTAINERS = {
    (True, True): (ml_dtypes.int4, ir.DataType.INT4),
    (True, False): (ml_dtypes.uint4, ir.DataType.UINT4),
    (False, True): (np.int8, ir.DataType.INT8),
    (False, False): (np.uint8, ir.DataType.UINT8),
}


def _container(qw: QuantizedWeight) -> tuple[type, ir.DataType]:
    return _CONTAINERS[(qw.spec.bits <= 4, qw.spec.symmetric)]


def _lazy_transposed(tensor: torch.Tensor, name: str, np_dtype, ir_dtype: ir.DataType, shape: tuple
                     ) -> ir.LazyTensor:
    """``tensor^T`` reshaped to ``shape``, converted (and packed, for 4-bit) only when serialized, so the pass holds
    no second copy of the weights."""

    def materialize() -> ir.Tensor:
        arr = np.ascontiguousarray(tensor.numpy().T.reshape(shape).astype(np_dtype))
        return ir.tensor(arr, dtype=ir_dtype, name=name)

    return ir.LazyTensor(materialize, dtype=ir_dtype, shape=ir.Shape(shape), name=name)


def _check(name: str, qw: QuantizedWeight, weight: ir.Value) -> None:
    out_f, in_f = qw.qweight.shape
    if tuple(weight.shape) != (in_f, out_f):
        raise ValueError(f"{name}: graph weight {weight.name} has shape {tuple(weight.shape)}, quantized weight is "
                         f"[out={out_f}, in={in_f}] (expected the graph to hold it transposed, [{in_f}, {out_f}])")
    q = qw.qweight.numpy()  # numpy: torch's int16 reductions are an order of magnitude slower on CPU
    lo, hi = int(q.min()), int(q.max())
    if lo < qw.spec.qmin or hi > qw.spec.qmax:
        raise ValueError(f"{name}: integers span [{lo}, {hi}], outside the {qw.spec.describe()} grid "
                         f"[{qw.spec.qmin}, {qw.spec.qmax}]")
    if qw.zero is not None and not np.array_equal(qw.zero.numpy(), np.round(qw.zero.numpy())):
        raise ValueError(f"{name}: zero points are not integers")


def _replace(graph: ir.Graph, name: str, qw: QuantizedWeight) -> int:
    """Swap one float initializer for integer + scale (+ zero) initializers and a DequantizeLinear node; returns
    the bytes the new initializers take."""
    weight = graph.initializers[f"{name}.weight"]
    np_dtype, ir_dtype = _container(qw)
    in_f, out_f = weight.shape
    per_channel = qw.spec.group_size is None
    scale_shape = (out_f,) if per_channel else (qw.scale.shape[1], out_f)

    def init(suffix: str, tensor: torch.Tensor, np_dt, ir_dt, shape) -> ir.Value:
        t = _lazy_transposed(tensor, f"{name}.{suffix}", np_dt, ir_dt, shape)
        value = ir.val(t.name, const_value=t)
        graph.register_initializer(value)
        return value

    inputs = [
        init("weight_q", qw.qweight, np_dtype, ir_dtype, (in_f, out_f)),
        init("weight_scale", qw.scale, np.float32, ir.DataType.FLOAT, scale_shape),
    ]
    if qw.zero is not None:
        inputs.append(init("weight_zero", qw.zero, np_dtype, ir_dtype, scale_shape))
    attrs = {"axis": 1} if per_channel else {"axis": 0, "block_size": qw.spec.group_size}
    dq = ir.node("DequantizeLinear", inputs, attributes=attrs, name=f"{name}/DequantizeLinear")
    dq.outputs[0].name = f"{name}.weight_dq"
    dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, ir.Shape((in_f, out_f))

    consumers = set(weight.consumers())
    graph.insert_before(next(n for n in graph if n in consumers), dq)
    weight.replace_all_uses_with(dq.outputs[0])
    del graph.initializers[weight.name]
    return sum(v.const_value.nbytes for v in inputs)


def apply(model: ir.Model, quant_state: dict[str, QuantizedWeight]) -> dict:
    """Rewrite ``model`` in place for every entry of ``quant_state``; returns statistics for the report."""
    graph = model.graph
    missing = [n for n in quant_state if f"{n}.weight" not in graph.initializers]
    if missing:
        raise ValueError(
            f"quantized weights with no float initializer in the graph: {', '.join(sorted(missing))} "
            f"(expected initializers named '<linear>.weight'; is the quant state from another model?)"
        )
    for name, qw in quant_state.items():  # every check before any rewrite: a failure leaves the graph as it was
        _check(name, qw, graph.initializers[f"{name}.weight"])
    float_bytes = quant_bytes = 0
    by_type: dict[str, int] = {}
    for name, qw in quant_state.items():
        float_bytes += graph.initializers[f"{name}.weight"].const_value.nbytes
        quant_bytes += _replace(graph, name, qw)
        kind = _container(qw)[1].name.lower()
        by_type[kind] = by_type.get(kind, 0) + 1
    return {
        "dequantize_linear_nodes": len(quant_state),
        "weights_by_type": by_type,
        "float_weight_bytes_replaced": float_bytes,
        "quantized_weight_bytes": quant_bytes,
    }
