"""Small ONNX subgraphs the graph passes insert: per-token fake quantization and Hadamard rotations.

Each emitter records its nodes on an ``onnx_ir`` tape (:class:`Emitter`); a pass then inserts the tape's nodes
into the graph before the first consumer it rewires. Only default-domain ops, so the result runs on every ONNX
Runtime build and loads in any ONNX tool.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import torch

from qcompile.quant.activations import MIN_SCALE, TokenQuantSpec


class Emitter:
    """Records nodes (named under ``scope``) and shares small constants by value."""

    def __init__(self, scope: str):
        self.tape = ir.tape.Tape()
        self.scope = scope
        self._count = 0
        self._consts: dict[tuple, ir.Value] = {}

    def op(self, op_type: str, *inputs: ir.Value | None, **attrs) -> ir.Value:
        self._count += 1
        return self.tape.op(op_type, list(inputs), attributes=attrs or None,
                            name=f"{self.scope}/{op_type}_{self._count}")

    def const(self, value, dtype=np.float32) -> ir.Value:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._count += 1
            self._consts[key] = self.tape.op("Constant", [], attributes={"value": ir.tensor(arr)},
                                             name=f"{self.scope}/Constant_{self._count}")
        return self._consts[key]

    @property
    def nodes(self) -> list[ir.Node]:
        return list(self.tape.nodes)


def fake_quantize_tokens(e: Emitter, x: ir.Value, rank: int, dim: int, spec: TokenQuantSpec) -> ir.Value:
    """``qcompile.quant.activations.fake_quantize_tokens`` as nodes: ``x`` (float32, ``rank`` dims, last dim
    ``dim``) quantize-dequantized along its last dimension in groups of ``spec.group_size``."""
    g = spec.group(dim, x.name or "tensor")
    grouped = g != dim
    xg = e.op("Reshape", x, e.const([0] * (rank - 1) + [dim // g, g], np.int64)) if grouped else x
    axes = e.const([-1], np.int64)
    qmax = e.const(float(spec.qmax))
    floor = e.const(MIN_SCALE)
    clip = e.const(float(spec.clip_ratio))
    if spec.symmetric:
        amax = e.op("ReduceMax", e.op("Abs", xg), axes, keepdims=1)
        scale = e.op("Max", e.op("Div", e.op("Mul", amax, clip), qmax), floor)
        q = e.op("Clip", e.op("Round", e.op("Div", xg, scale)), e.const(float(spec.qmin)), qmax)
        out = e.op("Mul", q, scale)
    else:
        zero_f = e.const(0.0)
        hi = e.op("Mul", e.op("Max", e.op("ReduceMax", xg, axes, keepdims=1), zero_f), clip)
        lo = e.op("Mul", e.op("Min", e.op("ReduceMin", xg, axes, keepdims=1), zero_f), clip)
        scale = e.op("Max", e.op("Div", e.op("Sub", hi, lo), qmax), floor)
        zero = e.op("Round", e.op("Div", e.op("Neg", lo), scale))
        q = e.op("Clip", e.op("Add", e.op("Round", e.op("Div", xg, scale)), zero), zero_f, qmax)
        out = e.op("Mul", e.op("Sub", q, zero), scale)
    return e.op("Reshape", out, e.op("Shape", x)) if grouped else out


def hadamard(e: Emitter, x: ir.Value, rank: int, matrix: torch.Tensor, factors: tuple[int, int] | None,
             dense: bool) -> ir.Value:
    """``x @ matrix`` on the last dimension. ``dense``: one MatMul with the [n, n] constant. Otherwise the
    Kronecker form of ``qcompile.quant.hadamard`` (``matrix = (H_m ⊗ S_s) / sqrt(n)``, ``factors = (m, s)``): view
    the row as ``X [m, s]`` and compute ``H_mᵀ X S_s`` with two small MatMuls (O(n (m + s)) instead of O(n²))."""
    n = matrix.shape[0]
    if dense or factors is None:
        return e.op("MatMul", x, e.const(matrix.to(torch.float32).numpy()))
    m, s = factors
    h = matrix.to(torch.float64).numpy() * math.sqrt(n)  # ±1 entries: H_m ⊗ S_s
    s_mat = h[:s, :s] * (h[0, 0])  # top-left block: H_m[0, 0] * S_s; H_m[0, 0] = ±1
    h_m = h[::s, ::s] * s_mat[0, 0]  # entries (a*s, b*s): H_m[a, b] * S_s[0, 0]; S_s[0, 0] = 1
    if not np.allclose(np.kron(h_m, s_mat), h):
        raise ValueError(f"the rotation of order {n} is not the Kronecker product of orders {m} and {s}")
    y = e.op("Reshape", x, e.const([0] * (rank - 1) + [m, s], np.int64))
    y = e.op("MatMul", y, e.const((s_mat / math.sqrt(s)).astype(np.float32)))
    if m > 1:
        y = e.op("MatMul", e.const((h_m.T / math.sqrt(m)).astype(np.float32)), y)
    return e.op("Reshape", y, e.const([0] * (rank - 1) + [n], np.int64))
