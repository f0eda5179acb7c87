"""The run-time rewrites of ``graph.runtime_quant``, read back out of an exported graph for the Triton runner.

``graph.runtime_quant`` replaces the uses of a value by a new value computed from it: an online Hadamard
(``graph.quant_nodes.hadamard``: one MatMul with the dense matrix, or Reshape -> MatMul [-> MatMul] -> Reshape in
Kronecker form), a per-token fake quantization (``graph.quant_nodes.fake_quantize_tokens``: Reduce/Div/Round/
Clip/Mul, optionally grouped by a Reshape), and for keys/values a ``Where(position_ids < P, float, quantized)``
keeping the first P positions in float. :class:`Rewrites` walks back from a value (a linear's input, the q/k/v
that attention reads) through such subgraphs and returns the value they start from and the steps in data-flow
order; every constant (quantization bits, symmetry, group, clip ratio, scale floor, the Hadamard matrix) comes
from the graph, each subgraph is matched node by node, and its nodes are collected so that the runner's graph
check can tell the mapped rewrites from anything else (which it refuses).

Pure numpy / onnx_ir: nothing here needs Triton or a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qcompile.errors import QCompileError
from qcompile.quant.activations import MIN_SCALE, TokenQuantSpec
from qcompile.quant.hadamard import sylvester


@dataclass(frozen=True)
class Hadamard:
    """``x @ kron(H_m, S_p) / sqrt(n)`` on the last dimension (n = m p, ``S_p`` Sylvester's, ``left`` = ``H_m``, a
    ±1 matrix as nested tuples): what ``runtime.triton.hadamard.hadamard_transform(x, left=...)`` computes."""

    n: int
    left: tuple[tuple[int, ...], ...]

    @property
    def m(self) -> int:
        return len(self.left)

    def matrix(self) -> np.ndarray:
        """The orthonormal [n, n] matrix (float64)."""
        return np.kron(np.asarray(self.left, np.float64), sylvester(self.n // self.m)) / math.sqrt(self.n)

    def describe(self) -> str:
        return f"Hadamard {self.n}" + (f" ({self.m} x Sylvester {self.n // self.m})" if self.m > 1 else "")


@dataclass(frozen=True)
class FloatPrefix:
    """The preceding quantization applies only at positions >= ``prefix`` (``position_ids``); earlier positions
    keep the value from before it (BiSup's prompt mixed precision on the KV cache)."""

    prefix: int


Step = Hadamard | TokenQuantSpec | FloatPrefix


def const_value(value) -> np.ndarray | None:
    """The numpy value of an initializer or a Constant node's output, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].value.numpy()
    return None


class _NoMatch(Exception):
    pass


class _Matcher:
    """Collects the nodes of one candidate subgraph; any mismatch raises ``_NoMatch``."""

    def __init__(self):
        self.nodes: list = []

    def node(self, value, op: str):
        n = value.producer() if value is not None else None
        if n is None or n.op_type != op:
            raise _NoMatch
        self.nodes.append(n)
        return n

    def const(self, value) -> np.ndarray:
        c = const_value(value)
        if c is None:
            raise _NoMatch
        if value.producer() is not None:
            self.nodes.append(value.producer())
        return np.asarray(c)

    @staticmethod
    def same(a, b) -> None:
        if a is not b:
            raise _NoMatch


def _scalar(a: np.ndarray) -> float:
    if a.size != 1:
        raise _NoMatch
    return float(a.reshape(()))


def _reduce(m: _Matcher, value, op: str):
    """``op(x, axes=[-1], keepdims=1)``; returns x."""
    n = m.node(value, op)
    keep = n.attributes["keepdims"].value if "keepdims" in n.attributes else 1
    if len(n.inputs) < 2 or m.const(n.inputs[1]).reshape(-1).tolist() != [-1] or keep != 1:
        raise _NoMatch
    return n.inputs[0]


def match_fake_quant(out):
    """``graph.quant_nodes.fake_quantize_tokens`` ending in ``out`` -> (input value, spec, nodes)."""
    m = _Matcher()
    top = out.producer()
    shape_in = top.inputs[1].producer() if top is not None and top.op_type == "Reshape" and len(top.inputs) > 1 \
        else None
    grouped = shape_in is not None and shape_in.op_type == "Shape"
    if grouped:
        m.node(out, "Reshape")
        x = m.node(top.inputs[1], "Shape").inputs[0]
        inner = top.inputs[0]
    else:
        inner, x = out, None
    mul = m.node(inner, "Mul")
    a, scale = mul.inputs
    head = a.producer()
    symmetric = head is not None and head.op_type == "Clip"
    if symmetric:  # q * scale, q = Clip(Round(x / scale), qmin, qmax), scale = Max(amax * clip / qmax, floor)
        clip_node = m.node(a, "Clip")
        div = m.node(m.node(clip_node.inputs[0], "Round").inputs[0], "Div")
        xg = div.inputs[0]
        m.same(div.inputs[1], scale)
        floor_node = m.node(scale, "Max")
        by_qmax = m.node(floor_node.inputs[0], "Div")
        times_clip = m.node(by_qmax.inputs[0], "Mul")
        clip = _scalar(m.const(times_clip.inputs[1]))
        m.same(m.node(_reduce(m, times_clip.inputs[0], "ReduceMax"), "Abs").inputs[0], xg)
    else:  # (q - zero) * scale, q = Clip(Round(x / scale) + zero, 0, qmax), zero = Round(-lo / scale)
        sub = m.node(a, "Sub")
        q, zero = sub.inputs
        clip_node = m.node(q, "Clip")
        add = m.node(clip_node.inputs[0], "Add")
        m.same(add.inputs[1], zero)
        div = m.node(m.node(add.inputs[0], "Round").inputs[0], "Div")
        xg = div.inputs[0]
        m.same(div.inputs[1], scale)
        zdiv = m.node(m.node(zero, "Round").inputs[0], "Div")
        m.same(zdiv.inputs[1], scale)
        lo = m.node(zdiv.inputs[0], "Neg").inputs[0]
        floor_node = m.node(scale, "Max")
        by_qmax = m.node(floor_node.inputs[0], "Div")
        span = m.node(by_qmax.inputs[0], "Sub")
        hi = span.inputs[0]
        m.same(span.inputs[1], lo)
        clips = []
        for v, clamp, red in ((hi, "Max", "ReduceMax"), (lo, "Min", "ReduceMin")):
            times_clip = m.node(v, "Mul")
            clips.append(_scalar(m.const(times_clip.inputs[1])))
            clamp_node = m.node(times_clip.inputs[0], clamp)
            if _scalar(m.const(clamp_node.inputs[1])) != 0.0:
                raise _NoMatch
            m.same(_reduce(m, clamp_node.inputs[0], red), xg)
        if clips[0] != clips[1]:
            raise _NoMatch
        clip = clips[0]
    qmin, qmax = _scalar(m.const(clip_node.inputs[1])), _scalar(m.const(clip_node.inputs[2]))
    if _scalar(m.const(by_qmax.inputs[1])) != qmax:
        raise _NoMatch
    if np.float32(_scalar(m.const(floor_node.inputs[1]))) != np.float32(MIN_SCALE):
        raise _NoMatch  # another scale floor: not the arithmetic the kernels implement
    levels = qmax + 1  # 2^(b-1) symmetric, 2^b asymmetric
    bits = int(round(math.log2(max(levels, 1)))) + (1 if symmetric else 0)
    if 2 ** (bits - 1 if symmetric else bits) != levels or qmin != (-(qmax + 1) if symmetric else 0):
        raise _NoMatch
    group = None
    if grouped:  # xg = Reshape(x, [0, .., dim / g, g])
        reshape = m.node(xg, "Reshape")
        m.same(reshape.inputs[0], x)
        shape = m.const(reshape.inputs[1]).reshape(-1).tolist()
        if len(shape) < 2 or any(s != 0 for s in shape[:-2]) or shape[-1] < 1:
            raise _NoMatch
        group = int(shape[-1])
    else:
        x = xg
    if not 0 < clip <= 1:
        raise _NoMatch
    return x, TokenQuantSpec(bits=bits, symmetric=symmetric, group_size=group, clip_ratio=clip), m.nodes


def _factor_hadamard(h: np.ndarray, candidates: list[int]) -> Hadamard | None:
    """``h`` (±1, [n, n]) as ``kron(H_m, S_{n/m})`` for the first candidate m that fits."""
    n = h.shape[0]
    for m in candidates:
        if m < 1 or n % m or (n // m) & (n // m - 1):
            continue
        p = n // m
        left = h[::p, ::p]
        if np.array_equal(np.kron(left, sylvester(p)), h):
            return Hadamard(n, tuple(tuple(int(v) for v in row) for row in left))
    return None


def _pm_one(a: np.ndarray, norm: float) -> np.ndarray:
    """``a * norm`` rounded, if it is a ±1 matrix up to float32 rounding of the graph's constant; else no match."""
    h = np.asarray(a, np.float64) * norm
    r = np.round(h)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or not np.all(np.abs(r) == 1) or np.abs(h - r).max() > 1e-5:
        raise _NoMatch
    return r


def match_hadamard(out):
    """``graph.quant_nodes.hadamard`` ending in ``out`` -> (input value, Hadamard, nodes)."""
    m = _Matcher()
    top = out.producer()
    if top is None:
        raise _NoMatch
    if top.op_type == "MatMul":  # dense: x @ H / sqrt(n)
        m.node(out, "MatMul")
        if const_value(top.inputs[0]) is not None:
            raise _NoMatch
        mat = m.const(top.inputs[1])
        n = mat.shape[-1]
        h = _pm_one(mat, math.sqrt(n))
        x, graph_m = top.inputs[0], None
    else:  # Reshape(x, [.., m, s]) @ S_s / sqrt(s) [then H_m^T / sqrt(m) @], Reshape back to [.., n]
        back = m.node(out, "Reshape")
        n = int(m.const(back.inputs[1]).reshape(-1)[-1])
        y = back.inputs[0]
        first = y.producer()
        if first is not None and first.op_type == "MatMul" and const_value(first.inputs[0]) is not None:
            m.node(y, "MatMul")
            left_t = m.const(first.inputs[0])
            h_m = _pm_one(left_t.T, math.sqrt(left_t.shape[0]))
            y = first.inputs[1]
        else:
            h_m = np.ones((1, 1))
        inner = m.node(y, "MatMul")
        s_mat = m.const(inner.inputs[1])
        s_pm = _pm_one(s_mat, math.sqrt(s_mat.shape[0]))
        split = m.node(inner.inputs[0], "Reshape")
        shape = m.const(split.inputs[1]).reshape(-1).tolist()
        if shape[-2:] != [h_m.shape[0], s_pm.shape[0]] or h_m.shape[0] * s_pm.shape[0] != n:
            raise _NoMatch
        h = np.kron(h_m, s_pm)
        x, graph_m = split.inputs[0], h_m.shape[0]
    candidates = [c for c in (graph_m, _default_base(n)) if c]
    had = _factor_hadamard(h, candidates)
    if had is None:
        raise QCompileError(f"an online Hadamard rotation of order {n} in the graph is not H_m (x) Sylvester with "
                            f"m in {candidates}: the Triton kernel cannot apply it; run this graph on ONNX Runtime "
                            "(--device cpu)")
    return x, had, m.nodes


def _default_base(n: int) -> int | None:
    try:
        from qcompile.quant.hadamard import hadamard_factors

        return hadamard_factors(n)[0]
    except Exception:  # noqa: BLE001 - an order the rotation pass cannot build: only the graph's own factor
        return None


def match_float_prefix(out):
    """``Where(Unsqueeze(position_ids < P, [1, 3]), float, quantized)`` -> (float value, quantized value, P, nodes)."""
    m = _Matcher()
    where = m.node(out, "Where")
    cond, keep, quantized = where.inputs
    unsq = m.node(cond, "Unsqueeze")
    if m.const(unsq.inputs[1]).reshape(-1).tolist() != [1, 3]:
        raise _NoMatch
    less = m.node(unsq.inputs[0], "Less")
    if less.inputs[0] is None or less.inputs[0].name != "position_ids":
        raise _NoMatch
    prefix = _scalar(m.const(less.inputs[1]))
    return keep, quantized, int(prefix), m.nodes


class Rewrites:
    """Walks back through the rewrites of one graph; ``nodes`` holds every node of every rewrite matched."""

    def __init__(self):
        self.nodes: set = set()

    def chain(self, value) -> tuple[object, tuple[Step, ...]]:
        """(the value the rewrites start from, their steps in data-flow order) for ``value``."""
        steps: list[Step] = []
        while value is not None and value.producer() is not None:
            node = value.producer()
            try:
                if node.op_type == "Where":
                    keep, quantized, prefix, nodes = match_float_prefix(value)
                    root, before = self.chain(keep)
                    root_q, after = self.chain(quantized)
                    if root_q is not root or after[:-1] != before or not isinstance(after[-1], TokenQuantSpec):
                        raise _NoMatch
                    self.nodes.update(nodes)
                    return root, (*after, FloatPrefix(prefix), *reversed(steps))
                try:
                    x, step, nodes = match_fake_quant(value)
                except _NoMatch:
                    x, step, nodes = match_hadamard(value)
            except _NoMatch:
                break
            self.nodes.update(nodes)
            steps.append(step)
            value = x
        return value, tuple(reversed(steps))


def describe(steps: tuple[Step, ...]) -> str:
    parts = []
    for s in steps:
        parts.append(s.describe() if not isinstance(s, FloatPrefix) else f"positions < {s.prefix} kept float")
    return " -> ".join(parts) or "none"
