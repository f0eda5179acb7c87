"""onnxsim 0.8.1's ``apply_spinquant``, transcribed with LAPACK's eigensolver in place of its hand-rolled Jacobi.

Why this exists: the tool's own C++ port (``onnxsim/spinquant_entry.cpp``, ``ApplySpinquant``) fits one dense
K x K rotation per MatMul as the eigenvector basis of that MatMul's calibration-activation covariance, and
computes it with a cyclic Jacobi eigenvalue loop that sweeps until the squared off-diagonal sum is below 1e-28
(absolute) or 100 sweeps have run. On SmolLM2-135M (210 MatMuls, K = 576 or 1536) it did not finish in 143 min
on one core of this CPU (``bench/results/peers_onnxsim_spinquant_time.log``). The tool's docstring names the
eigensolver as its one divergence from its own Python reference ("individual columns need not match
sign-for-sign or order-for-order, only that the rotation stays orthogonal"); this module is that reference
rebuilt from the C++ source, step for step, with ``numpy.linalg.eigh`` (LAPACK ``syevd``) as the solver:

1. candidates: every MatMul (2 inputs) and every Gemm (transA 0, alpha 1, beta 1) whose weight input is a 2-D
   float32 initializer, in node order;
2. calibration: the graph with each candidate's activation input added as an output, run on every calibration
   batch; the rows of all batches (last axis = K) stacked;
3. cov = X^T X / rows (float64), eigenvectors U in ascending eigenvalue order;
4. W~ = W_nk @ U, quantized per row in blocks of ``block_size`` along K: scale = max(max |w|, 1e-12) / 7,
   codes = round-half-to-even(w / scale) clamped to [-7, 7], stored int4 [K, N] (low nibble first) with a float32
   scale [K / block, N];
5. the MatMul becomes MatMul(X, U) -> MatMul(., DequantizeLinear(codes, scale, axis 0, block_size)) -> Identity
   (Add for a Gemm bias), under the tool's own names (``<weight>_spinquant_codes``, ``..._u``, ``..._x_rotated``,
   ...), so the two graphs differ only in the eigenvectors' signs (and the order within repeated eigenvalues).

``bench/onnxsim_spinquant_check.py`` checks it against the tool itself: the whole graph on a tiny model, and one
real SmolLM2 layer at a time, where the Jacobi loop finishes.
"""

from __future__ import annotations

from typing import Sequence

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper


def matmul_like(node: onnx.NodeProto) -> tuple[str, str, str, bool] | None:
    """(activation, weight, bias, weight transposed) of a MatMul or a plain Gemm, as MatchMatMulLike reads them."""
    if node.op_type == "MatMul":
        return (node.input[0], node.input[1], "", False) if len(node.input) == 2 else None
    if node.op_type != "Gemm" or len(node.input) not in (2, 3):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) != 0 or attrs.get("alpha", 1.0) != 1.0:
        return None
    if len(node.input) == 3 and attrs.get("beta", 1.0) != 1.0:
        return None
    return node.input[0], node.input[1], node.input[2] if len(node.input) == 3 else "", attrs.get("transB", 0) != 0


def candidates(graph: onnx.GraphProto) -> list[tuple[int, str, str, str, bool]]:
    inits = {t.name: t for t in graph.initializer}
    found = []
    for i, node in enumerate(graph.node):
        m = matmul_like(node)
        if m is None or m[1] not in inits:
            continue
        w = inits[m[1]]
        if w.data_type == onnx.TensorProto.FLOAT and len(w.dims) == 2:
            found.append((i, *m))
    return found


def probe_session(model: onnx.ModelProto, names, threads: int | None = None):
    """An ORT session of ``model`` with the tensors ``names`` added as graph outputs (the tool's probe model)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in sorted(set(names) - existing):
        probe.graph.output.add().name = name
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    # the tool's executor runs the graph as it is: no graph optimisation that could change the probed values
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def activation_covariances(model: onnx.ModelProto, names: set[str], calibration_data: Sequence[dict],
                           threads: int | None = None) -> dict[str, tuple[np.ndarray, int]]:
    """name -> (X^T X summed over every calibration row in float64, row count), for each float activation >= 2-D."""
    sess = probe_session(model, names, threads)
    wanted = [o.name for o in sess.get_outputs() if o.name in names]
    acc: dict[str, tuple[np.ndarray, int]] = {}
    for batch in calibration_data:
        values = dict(zip(wanted, sess.run(wanted, {i.name: batch[i.name] for i in sess.get_inputs()})))
        for name, v in values.items():
            if v.dtype != np.float32 or v.ndim < 2 or v.shape[-1] <= 0:
                continue
            rows = v.reshape(-1, v.shape[-1]).astype(np.float64)
            if name in acc:
                cov, n = acc[name]
                if cov.shape[0] != rows.shape[1]:
                    continue
                acc[name] = (cov + rows.T @ rows, n + rows.shape[0])
            else:
                acc[name] = (rows.T @ rows, rows.shape[0])
    return acc


def quantize_blockwise_int4(w_nk: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes [N, K] in [-7, 7], scale [N, K / block]) as QuantizeBlockwiseInt4WithClip with clip ratio 1."""
    n, k = w_nk.shape
    blocks = w_nk.reshape(n, k // block_size, block_size)
    scale = np.maximum(np.abs(blocks).max(axis=2), 1e-12) / 7.0
    codes = np.clip(np.rint(blocks / scale[..., None]), -7, 7)  # np.rint rounds half to even, as the C++ does
    return codes.reshape(n, k), scale


def apply_spinquant_eigh(model: onnx.ModelProto, calibration_data: Sequence[dict], block_size: int = 32,
                         threads: int | None = None) -> onnx.ModelProto:
    """The tool's ApplySpinquant with eigh in place of its Jacobi loop."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not any(o.domain in ("", "ai.onnx") and o.version >= 21 for o in out.opset_import):
        return out  # the tool returns the model unchanged below opset 21
    graph = out.graph
    found = candidates(graph)
    if not found:
        return out
    covs = activation_covariances(out, {c[1] for c in found}, calibration_data, threads)

    taken = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {v.name for v in graph.output}
    taken |= {v.name for v in graph.value_info}
    for n in graph.node:
        taken |= ({n.name} if n.name else set()) | set(n.input) | set(n.output)

    def unique(base: str) -> str:
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name

    inits = {t.name: t for t in graph.initializer}
    replacement: dict[int, list[onnx.NodeProto]] = {}
    for index, x_name, w_name, bias, transposed in found:
        if x_name not in covs:
            continue
        cov_sum, rows = covs[x_name]
        w = numpy_helper.to_array(inits[w_name]).astype(np.float64)
        w_nk = w if transposed else w.T
        n_rows, k = w_nk.shape
        if k % block_size or cov_sum.shape[0] != k:
            continue
        _, u = np.linalg.eigh(cov_sum / rows)  # ascending eigenvalues, eigenvectors in columns
        codes, scale = quantize_blockwise_int4(w_nk @ u, block_size)

        prefix = w_name + "_spinquant"
        codes_name = unique(prefix + "_codes")
        # onnx packs int4 two codes a byte, low nibble first: the tool's PackInt4
        codes_t = numpy_helper.from_array(codes.T.astype(ml_dtypes.int4), codes_name)
        scale_name = unique(prefix + "_scale")
        u_name = unique(prefix + "_u")
        graph.initializer.extend([codes_t, numpy_helper.from_array(scale.T.astype(np.float32), scale_name),
                                  numpy_helper.from_array(u.astype(np.float32), u_name)])

        nodes = []

        def add(op, inputs, suffix, **attrs):
            output = unique(f"{prefix}_{suffix}")
            nodes.append(helper.make_node(op, inputs, [output], name=unique(f"{prefix}_{suffix}_node"), **attrs))
            return output

        x_rot = add("MatMul", [x_name, u_name], "x_rotated")
        w_dq = add("DequantizeLinear", [codes_name, scale_name], "w_dequant", axis=0, block_size=block_size)
        core = add("MatMul", [x_rot, w_dq], "core")
        old_output = graph.node[index].output[0]
        if bias:
            nodes.append(helper.make_node("Add", [core, bias], [old_output], name=unique(prefix + "_bias_add_node")))
        else:
            nodes.append(helper.make_node("Identity", [core], [old_output], name=unique(prefix + "_identity_node")))
        replacement[index] = nodes

    new_nodes = []
    for i, node in enumerate(graph.node):
        new_nodes.extend(replacement.get(i, [node]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    return out
