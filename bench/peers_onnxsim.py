"""onnxsim's ONNX-level quantization passes on our fp32 export, beside our own graphs: perplexity and decode speed.

The peer named in issues 4 and 5: `onnxsim` (PyPI, 0.8.x) rewrites an opset-21 ONNX graph directly. Each method
runs on the folder `qcompile export <model> --recipe fp32` wrote and is saved as a loadable folder of its own
(<work-dir>/<method>/: model.onnx + data, the config and tokenizer files); every graph, theirs and ours (the
folders given with --ours), is then scored by the same code: WikiText-2 test perplexity on the first --limit
windows of 2048 tokens with our OrtCausalLM, and greedy decode speed at batch 1 (a --prompt-len token prompt,
then --new-tokens steps; rounds interleaved over the graphs, median), in one process, so the ratios compare.

Methods:

* ``quarot``: ``onnxsim.apply_quarot`` (block --block-size): per MatMul, a dense Haar-random K x K rotation of the
  activation at run time (a MatMul with a K x K constant before each quantized MatMul), int4 round-to-nearest per
  token (symmetric) on the rotated activation, int4 RTN weights (symmetric, blockwise). No KV-cache quantization:
  the QuaRot "W4A4 (KV16)" row. No calibration.
* ``quarot-gptq``: ``onnxsim.apply_quarot_gptq``: ``quarot``'s rotations and activation quantizer, the rotated
  weights quantized by GPTQ with Hessians from the same calibration windows as ``gptq`` below.
* ``wo-int4``: ``onnxsim.quantize_weight_only_int4``: RTN int4 symmetric, blocks of 32 (fixed by the tool).
* ``gptq``: ``wo-int4`` then ``onnxsim.apply_gptq`` with Hessians from --calib-samples windows of
  --calib-seq-len tokens of the WikiText-2 *validation* split (the tool's defaults otherwise).
* ``omniquant``: ``wo-int4`` then ``onnxsim.apply_omniquant`` on the same calibration windows: per-block clip ratio
  (LWC) and a per-channel shift and scale of the activation (LET), both grid-searched (the tool's defaults: 20 clip
  steps over [0.5, 1], 20 alpha steps; --omniquant-steps sets both); where LET helps it inserts a Sub/Mul before
  the MatMul and an Add after.
* ``spinquant``: ``onnxsim.apply_spinquant``: per MatMul a rotation fitted in closed form on the same calibration
  windows (its "R1-only" reading), applied at run time as a dense K x K MatMul on the activation, then int4
  symmetric weights in blocks of 32: weight-only, to compare with our rotated W4A16 rows.
* ``spinquant-eigh``: ``spinquant`` transcribed from the tool's C++ source with LAPACK's eigensolver in place of
  its cyclic Jacobi loop, which does not finish on SmolLM2 on this CPU (``onnxsim_spinquant_eigh.py`` says why;
  ``onnxsim_spinquant_check.py`` compares the two: same graph, same codes up to each eigenvector's sign).

* ``kv8``: ``onnxsim.quantize_kv_cache``, the tool's only KV-cache quantizer: int8 symmetric, keys with one static
  per-channel (head-dim) scale calibrated on the same windows, values with a per-token scale kept as a third
  cache stream (``past_key_values.N.value_scale``); the caches become int8 graph inputs/outputs. New tokens are
  quantized before attention reads them, so a single-pass perplexity shows the cache's error. Weights stay float:
  compare with our KV8-only graph (``bench/recipes/kv8.yaml``).

The tied lm_head of the fp32 export (a MatMul on a Transpose of the embedding) is not a constant 2-D weight to the
tool, so it stays float in every method; each row lists the MatMul/MatMulNBits counts.

    qcompile export smollm2-135m -o out/bench/fp32 --recipe fp32
    python bench/peers_onnxsim.py out/bench/fp32 --methods quarot --ours out/peers_onnxsim/ours-w4a4-rot-rtn \\
        --limit 8 --out bench/results/peers_onnxsim.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_speed import prompt_tokens, timed_decode  # noqa: E402

from qcompile.data import CalibrationConfig, resolve_text, token_stream, windows  # noqa: E402
from qcompile.eval.perplexity import ort_logits_fn, perplexity  # noqa: E402
from qcompile.fsutil import atomic_write_text  # noqa: E402
from qcompile.runtime.ort import MODEL_FILE, OrtCausalLM  # noqa: E402

DATA_FILE = MODEL_FILE + "_data"
SKIP_FILES = {MODEL_FILE, DATA_FILE, "qcompile.json", "report.json"}
METHODS = ("quarot", "quarot-gptq", "wo-int4", "gptq", "omniquant", "spinquant", "spinquant-eigh", "kv8")
CALIBRATED = {"quarot-gptq", "gptq", "omniquant", "spinquant", "spinquant-eigh", "kv8"}  # read calibration_feeds
# onnxsim's weight-only matchers need shape inference; spinquant-eigh gets it too, to read the graph the tool reads
WEIGHT_ONLY = {"wo-int4", "gptq", "omniquant", "spinquant", "spinquant-eigh"}


def calibration_feeds(fp32_dir: Path, args) -> list[dict[str, np.ndarray]]:
    """Prefill feeds (no cache) of WikiText-2 validation windows, as the graph takes them."""
    from transformers import AutoTokenizer

    cfg = CalibrationConfig(calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len)
    ids = cfg.load(AutoTokenizer.from_pretrained(fp32_dir)).numpy().astype(np.int64)
    empty_past = OrtCausalLM.from_dir(fp32_dir, threads=args.threads).empty_past(1)
    feeds = []
    for w in ids:
        feed = {"input_ids": w[None], "attention_mask": np.ones((1, len(w)), np.int64),
                "position_ids": np.arange(len(w), dtype=np.int64)[None]}
        for i, (k, v) in enumerate(empty_past):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
        feeds.append(feed)
    return feeds


def calibration_settings(args) -> dict:
    """What calibration_feeds reads, as recorded beside each calibrated method's figures."""
    return {"split": "valid", "samples": args.calib_samples, "seq_len": args.calib_seq_len}


def run_method(method: str, fp32_dir: Path, folder: Path, args, row: dict) -> None:
    import onnxsim

    model = onnx.load(str(fp32_dir / MODEL_FILE))
    t0 = time.perf_counter()
    feeds = calibration_feeds(fp32_dir, args) if method in CALIBRATED else None
    if method in WEIGHT_ONLY:
        # the weight-only matchers need the activations' dtype: without shape inference they quantize nothing
        model = onnx.shape_inference.infer_shapes(model)
    if method == "quarot":
        row["tool_settings"] = {"function": "apply_quarot", "block_size": args.block_size, "seed": 0}
        out = onnxsim.apply_quarot(model, seed=0, block_size=args.block_size)
    elif method == "quarot-gptq":
        row["tool_settings"] = {"function": "apply_quarot_gptq", "block_size": args.block_size, "seed": 0}
        out = onnxsim.apply_quarot_gptq(model, calibration_data=feeds, seed=0, block_size=args.block_size)
    elif method == "wo-int4":
        row["tool_settings"] = {"function": "quantize_weight_only_int4", "block_size": 32}
        out = onnxsim.quantize_weight_only_int4(model)
    elif method == "gptq":
        row["tool_settings"] = {"function": "quantize_weight_only_int4 + apply_gptq", "block_size": 32}
        out = onnxsim.apply_gptq(model, onnxsim.quantize_weight_only_int4(model), calibration_data=feeds)
    elif method == "omniquant":
        steps = args.omniquant_steps
        row["tool_settings"] = {"function": "quantize_weight_only_int4 + apply_omniquant", "block_size": 32,
                                "num_clip_steps": steps, "num_alpha_steps": steps}
        out = onnxsim.apply_omniquant(model, onnxsim.quantize_weight_only_int4(model), calibration_data=feeds,
                                      num_clip_steps=steps, num_alpha_steps=steps)
    elif method == "spinquant":
        row["tool_settings"] = {"function": "apply_spinquant", "block_size": 32, "seed": 0}
        out = onnxsim.apply_spinquant(model, calibration_data=feeds, seed=0, block_size=32)
    elif method == "spinquant-eigh":
        from onnxsim_spinquant_eigh import apply_spinquant_eigh

        row["tool_settings"] = {"function": "apply_spinquant transcribed with numpy.linalg.eigh "
                                            "(bench/onnxsim_spinquant_eigh.py)", "block_size": 32}
        out = apply_spinquant_eigh(model, feeds, block_size=32, threads=args.threads)
    elif method == "kv8":
        row["tool_settings"] = {"function": "quantize_kv_cache"}
        out = onnxsim.quantize_kv_cache(model, calibration_data=feeds)
    else:
        raise ValueError(method)
    if feeds is not None:
        row["tool_settings"]["calibration"] = calibration_settings(args)
    row["quantize_seconds"] = time.perf_counter() - t0
    if not any(n.op_type in ("DequantizeLinear", "MatMulNBits", "QuantizeLinear") for n in out.graph.node):
        raise RuntimeError(f"onnxsim's {method} quantized nothing: nothing to compare")
    if folder.exists():
        shutil.rmtree(folder)  # onnx appends to an existing external data file
    folder.mkdir(parents=True)
    onnx.save_model(out, str(folder / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE)
    for f in fp32_dir.iterdir():
        if f.is_file() and f.name not in SKIP_FILES:
            shutil.copy2(f, folder / f.name)


def graph_summary(folder: Path) -> dict:
    graph = onnx.load(str(folder / MODEL_FILE), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    data = sum(p.stat().st_size for p in folder.glob(MODEL_FILE + "*"))
    return {"ops": {k: ops[k] for k in ("MatMul", "MatMulNBits", "DequantizeLinear", "QuantizeLinear", "Round")
                    if ops[k]}, "model_bytes": data}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fp32_dir", help="folder written by `qcompile export <model> --recipe fp32`")
    ap.add_argument("--methods", default="quarot", help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--ours", default="", help="comma list of our exported folders to score beside them")
    ap.add_argument("--work-dir", default="out/peers_onnxsim")
    ap.add_argument("--block-size", type=int, default=64, help="apply_quarot's weight block size")
    ap.add_argument("--omniquant-steps", type=int, default=20,
                    help="apply_omniquant's grid points for the clip ratio and for LET's alpha (the tool's default 20 "
                         "ran over an hour on 2 cores at 16 x 512 calibration tokens without finishing)")
    ap.add_argument("--limit", type=int, default=8, help="first N test windows (all: 148)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--accuracy-level", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quantize-only", action="store_true", help="run the methods' quantization and stop")
    ap.add_argument("--reuse", action="store_true",
                    help="score a method's folder from an earlier run (same --work-dir and --out) instead of "
                         "quantizing again; its tool settings and quantize time are kept from that run")
    ap.add_argument("--out", default="bench/results/peers_onnxsim.json")
    args = ap.parse_args()

    import onnxsim
    from transformers import AutoTokenizer

    fp32_dir = Path(args.fp32_dir)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    results.setdefault("graphs", {})
    results["command"] = " ".join(["python"] + sys.argv)
    results["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads,
                          "onnxruntime": ort.__version__, "onnx": onnx.__version__,
                          "onnxsim": getattr(onnxsim, "__version__", "0.8.x")}

    touched: set[str] = set()  # the graphs this run measures; save() leaves the file's other rows as they are now

    def save():
        # another run may write the same --out meanwhile (e.g. a --quantize-only run beside a scoring one):
        # merge into what is on disk instead of writing back the copy read at start
        on_disk = json.loads(out_path.read_text()) if out_path.is_file() else {}
        merged = {**on_disk, **{k: v for k, v in results.items() if k != "graphs"}}
        merged["graphs"] = {**on_disk.get("graphs", {}), **{n: results["graphs"][n] for n in touched}}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_path, json.dumps(merged, indent=2))

    graphs: dict[str, Path] = {}
    for m in methods:
        name, folder = f"onnxsim-{m}", Path(args.work_dir) / m
        row = results["graphs"].setdefault(name, {})
        touched.add(name)
        if args.reuse and (folder / MODEL_FILE).is_file() and "quantize_seconds" in row:
            graphs[name] = folder
            print(f"{name}: reusing {folder} (quantized in {row['quantize_seconds']:.1f}s)", flush=True)
            continue
        row.clear()
        try:
            run_method(m, fp32_dir, folder, args, row)
            graphs[name] = folder
            print(f"{name}: quantized in {row['quantize_seconds']:.1f}s", flush=True)
        except Exception as e:  # a peer that fails is a result too
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"{name}: FAILED {row['error']}", flush=True)
        save()
    if args.quantize_only:
        return
    for f in [f for f in args.ours.split(",") if f]:
        graphs[f"qcompile {Path(f).name}"] = Path(f)
        results["graphs"][f"qcompile {Path(f).name}"] = {}
        touched.add(f"qcompile {Path(f).name}")

    tokenizer = AutoTokenizer.from_pretrained(fp32_dir)
    test_windows = windows(token_stream(resolve_text(None, "test"), tokenizer), 2048, args.limit)
    runners = {}
    for name, folder in graphs.items():
        row = results["graphs"][name]
        row.update({"folder": str(folder), **graph_summary(folder)})
        runners[name] = OrtCausalLM.from_dir(folder, accuracy_level=args.accuracy_level, threads=args.threads)
        row["ppl"] = perplexity(ort_logits_fn(runners[name]), test_windows, desc=name)
        print(f"{name}: ppl {row['ppl']['ppl']:.3f} ({args.limit} windows), {row['model_bytes'] / 1e6:.1f} MB, "
              f"{row['ops']}", flush=True)
        save()

    prompt = prompt_tokens(fp32_dir, args.prompt_len)
    times: dict[str, list[float]] = {n: [] for n in runners}
    for r in range(args.repeats):  # interleaved, the order reversed every other round
        for name in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
            times[name].append(timed_decode(runners[name], prompt, args.new_tokens)[1])
    for name, t in times.items():
        tps = args.new_tokens / statistics.median(t)
        results["graphs"][name]["decode"] = {"tokens_per_s": tps, "rounds_s": t, "prompt_len": args.prompt_len,
                                             "new_tokens": args.new_tokens}
        print(f"{name}: decode {tps:.1f} tok/s", flush=True)
    save()


if __name__ == "__main__":
    main()
