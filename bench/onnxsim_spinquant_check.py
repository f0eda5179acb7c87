"""Check ``onnxsim_spinquant_eigh.apply_spinquant_eigh`` against onnxsim's own ``apply_spinquant``, and time the tool.

Two checks, both through the same comparison (``compare``):

* ``--tiny``: the whole graph of a tiny random Llama (hidden 64, 2 layers; ``tests/tiny_models.py``) exported by
  ``qcompile export --recipe fp32``, random token batches as calibration. Node list, initializer names and
  shapes must be identical; rotations equal up to each eigenvector's sign; codes equal up to that sign;
  logits of the two graphs compared.
* ``--layers``: single SmolLM2 MatMuls (e.g. ``model.layers.3.mlp.down_proj.weight``). Each layer's real
  activation rows (captured from the fp32 export on the peer run's calibration windows) and real weight go into a
  one-MatMul graph, which both implementations rotate and quantize; the tool's seconds per layer are what the
  whole model would cost it (210 such MatMuls: 180 with K = 576, 30 with K = 1536).

    python bench/onnxsim_spinquant_check.py --tiny --out bench/results/onnxsim_spinquant_check_tiny.json
    python bench/onnxsim_spinquant_check.py --layers model.layers.3.mlp.down_proj.weight --threads 1 \\
        --fp32 out/bench/fp32 --out bench/results/onnxsim_spinquant_check_layers.json

Needs onnxsim 0.8.1 importable (``PYTHONPATH=<its site dir>``).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from onnxsim_spinquant_eigh import apply_spinquant_eigh, probe_session  # noqa: E402

from qcompile.fsutil import atomic_write_text  # noqa: E402


def compare(tool: onnx.ModelProto, ours: onnx.ModelProto) -> dict:
    """Structure identical? rotations equal up to column signs? codes and scales equal once the signs are aligned?"""
    sig = [(n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in tool.graph.node]
    same_nodes = sig == [(n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in ours.graph.node]
    ti = {t.name: t for t in tool.graph.initializer}
    oi = {t.name: t for t in ours.graph.initializer}
    same_inits = {k: (v.data_type, tuple(v.dims)) for k, v in ti.items()} == {
        k: (v.data_type, tuple(v.dims)) for k, v in oi.items()}
    layers = []
    for name in sorted(n for n in ti if n.endswith("_u") and "_spinquant" in n):
        prefix = name[: -len("_u")]
        ut, uo = numpy_helper.to_array(ti[name]).astype(np.float64), numpy_helper.to_array(oi[name]).astype(np.float64)
        dots = np.einsum("ij,ij->j", ut, uo)
        sign = np.where(dots < 0, -1, 1)
        ct, co = (numpy_helper.to_array(i[prefix + "_codes"]).astype(np.int8) for i in (ti, oi))  # [K, N]
        co_aligned = co * sign[:, None]
        st, so = numpy_helper.to_array(ti[prefix + "_scale"]), numpy_helper.to_array(oi[prefix + "_scale"])
        layers.append({
            "weight": prefix[: -len("_spinquant")], "k": int(ut.shape[0]),
            "orthogonality_tool": float(np.abs(ut.T @ ut - np.eye(len(ut))).max()),
            "min_abs_cos": float(np.abs(dots).min()),  # 1: every eigenvector the same line
            "columns_below_0.999": int((np.abs(dots) < 0.999).sum()),
            "codes_equal": float((ct == co_aligned).mean()),
            "codes_max_diff": int(np.abs(ct.astype(int) - co_aligned).max()),
            "scale_max_rel_diff": float(np.abs(st - so).max() / np.abs(st).max()),
        })
    return {"same_nodes": same_nodes, "same_initializers": same_inits, "layers": layers}


def tiny_check(work: Path, threads: int) -> dict:
    import onnxsim
    from tiny_models import make_tiny_model

    src = make_tiny_model("llama", work / "tiny")
    exp = work / "tiny-fp32"
    subprocess.run(["qcompile", "export", str(src), "-o", str(exp), "--recipe", "fp32"], check=True,
                   capture_output=True)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(exp / "model.onnx")))
    sess = ort.InferenceSession(str(exp / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)

    def feed(seq):
        f = {}
        for i in sess.get_inputs():
            if i.name == "input_ids":
                f[i.name] = rng.integers(3, 300, (1, seq)).astype(np.int64)
            elif i.name == "attention_mask":
                f[i.name] = np.ones((1, seq), np.int64)
            elif i.name == "position_ids":
                f[i.name] = np.arange(seq, dtype=np.int64)[None]
            else:  # an empty past: [batch, kv heads, 0, head dim]
                f[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        return f

    feeds = [feed(64) for _ in range(4)]
    t0 = time.perf_counter()
    tool = onnxsim.apply_spinquant(model, calibration_data=feeds, seed=0, block_size=32)
    tool_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = apply_spinquant_eigh(model, feeds, block_size=32, threads=threads)
    ours_s = time.perf_counter() - t0
    row = compare(tool, ours)
    test = feed(48)
    logits = []
    for m in (tool, ours, model):
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        logits.append(s.run(["logits"], test)[0])
    row.update({"tool_seconds": tool_s, "ours_seconds": ours_s,
                "max_abs_logit_diff_tool_vs_ours": float(np.abs(logits[0] - logits[1]).max()),
                "max_abs_logit_diff_tool_vs_fp32": float(np.abs(logits[0] - logits[2]).max())})
    return row


def layer_check(fp32_dir: Path, weights: list[str], args) -> list[dict]:
    import onnxsim

    from peers_onnxsim import calibration_feeds

    model = onnx.load(str(fp32_dir / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    x_of = {n.input[1]: n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    feeds = calibration_feeds(fp32_dir, args)
    # the activation rows themselves (not their covariance): the one-MatMul graph is fed them as one batch
    names = list(dict.fromkeys(x_of[w] for w in weights))  # q/k/v (and gate/up) read the same activation
    sess = probe_session(model, names, args.threads)
    rows = {n: [] for n in names}
    for f in feeds:
        for n, v in zip(names, sess.run(names, f)):
            rows[n].append(v.reshape(-1, v.shape[-1]))
    del sess
    out = []
    for w in weights:
        x = np.concatenate(rows[x_of[w]]).astype(np.float32)
        weight = numpy_helper.to_array(inits[w])
        k, n = weight.shape
        g = helper.make_graph(
            [helper.make_node("MatMul", ["x", w], ["y"], name="mm")], "one_matmul",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["rows", k])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["rows", n])],
            [numpy_helper.from_array(weight, w)])
        one = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
        one.ir_version = 10
        calib = [{"x": x}]
        print(f"{w}: K={k}, {len(x)} rows; running onnxsim.apply_spinquant ...", flush=True)
        t0 = time.perf_counter()
        tool = onnxsim.apply_spinquant(one, calibration_data=calib, seed=0, block_size=32)
        tool_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = apply_spinquant_eigh(one, calib, block_size=32)
        ours_s = time.perf_counter() - t0
        row = compare(tool, ours)
        y = x.astype(np.float64) @ weight.astype(np.float64)
        errs = {}
        for label, m in (("tool", tool), ("ours", ours)):
            s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            errs[label] = float(np.linalg.norm(s.run(["y"], {"x": x})[0] - y) / np.linalg.norm(y))
        row.update({"rows": len(x), "tool_seconds": tool_s, "ours_seconds": ours_s,
                    "relative_output_error": errs})
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--layers", default="", help="comma list of SmolLM2 MatMul weight names")
    ap.add_argument("--fp32", default="out/bench/fp32")
    ap.add_argument("--calib-samples", type=int, default=4)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/onnxsim_spinquant_check.json")
    args = ap.parse_args()
    import onnxsim

    result = {"command": " ".join(["python"] + sys.argv), "machine": platform.platform(),
              "onnxsim": getattr(onnxsim, "__version__", "0.8.x"), "onnxruntime": ort.__version__,
              "calibration": {"split": "valid", "samples": args.calib_samples, "seq_len": args.calib_seq_len}}
    out_path = Path(args.out)
    if args.tiny:
        with tempfile.TemporaryDirectory() as d:
            result["tiny"] = tiny_check(Path(d), args.threads)
        print(json.dumps(result["tiny"], indent=1), flush=True)
        atomic_write_text(out_path, json.dumps(result, indent=2))
    if args.layers:
        result["layers"] = []
        for row in layer_check(Path(args.fp32), args.layers.split(","), args):
            result["layers"].append(row)
        atomic_write_text(out_path, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
