"""ONNX Runtime's own weight-only quantizer on our fp32 export, scored by WikiText-2 perplexity through ORT.

A peer baseline for the spine's rows (bench/spine_quality.py): each method runs
``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`` (4 bits, blocks/groups of 64 along the
input dimension) on the folder that ``qcompile export <model> --recipe fp32`` wrote, saves the result as a folder
of its own (<work-dir>/<method>/: model.onnx, model.onnx_data, the config and tokenizer files), then measures
perplexity with our OrtCausalLM on the same WikiText-2 test windows (2048 tokens) as our rows. Methods:

* ``fp32``: the input folder itself, the reference.
* ``ort-default-asym`` / ``-sym``: DefaultWeightOnlyQuantConfig (ORT's C++ blockwise min/max round-to-nearest).
* ``ort-hqq``: HQQWeightOnlyQuantConfig (half-quadratic optimisation of scale and zero; float zero points).
* ``ort-rtn-asym`` / ``-sym``: RTNWeightOnlyQuantConfig, the vendored Intel Neural Compressor (INC) RTN path, no
  clipping; group size and scheme come from the quantizer's block_size / is_symmetric.
* ``ort-gptq-asym`` / ``-sym``: GPTQWeightOnlyQuantConfig, the vendored INC GPTQ path (group 64 from the
  quantizer, GPTQ column block 64, the tool's defaults otherwise: percdamp 0.01, no act-order, no MSE clip,
  Hessians of the float model's activations), calibrated on --calib-samples windows of --calib-seq-len tokens
  of the WikiText-2 *validation* split (qcompile.data.CalibrationConfig), one window per run with an all-ones
  mask, positions 0..L-1 and empty past_key_values. The tool runs the whole graph once per calibration window
  for every distinct MatMul input (181 for SmolLM2-135M): slow on a CPU.

Known defects of the tool (ORT 1.32), kept as they are since the tool is what is measured: the INC paths'
asymmetric zero-point packing fails when K / 64 is odd (SmolLM2's K = 576 gives 9 blocks: "cannot reshape
array"), so ``ort-rtn-asym`` and ``ort-gptq-asym`` are left out of the default 'working' set (name them to
record the error); and INC GPTQ re-quantizes its result with plain min/max RTN, which for ``sym`` moves most
weights off GPTQ's grid (a new scale from each group's quantized absmax), adding error on top of GPTQ's own.

The tool quantizes only MatMuls whose weight is an initializer, so a tied lm_head (a MatMul on a Transpose of
the embedding) stays float in every method; each row lists the weight MatMuls left float. --accuracy-level goes
to the tool (written as the MatMulNBits ``accuracy_level`` attribute; HQQ writes none, and its float zero points
run in fp32 even with 4 set by hand) and to the session. The
session option only sets the level of nodes ORT fuses from DequantizeLinear -> MatMul (our own exports); in
these graphs the node attribute alone decides (unset = fp32 compute), and each row records the attributes found
and the max |Δlogit| the session option makes (0 here). Rows (quantize seconds, model.onnx_data bytes,
MatMulNBits count, ppl, or the error) merge into --out as soon as each is measured.

    qcompile export smollm2-135m -o out/bench/fp32 --recipe fp32
    python bench/peers_ort.py out/bench/fp32 --work-dir out/peers --out bench/results/peers_ort.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import matmul_nbits_quantizer as mnq
from onnxruntime.quantization.calibrate import CalibrationDataReader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qcompile.data import CalibrationConfig, resolve_text, token_stream, windows  # noqa: E402
from qcompile.eval.perplexity import ort_logits_fn, perplexity  # noqa: E402
from qcompile.runtime.ort import MODEL_FILE, OrtCausalLM  # noqa: E402

BITS = 4
BLOCK = 64
DATA_FILE = MODEL_FILE + "_data"
SKIP_FILES = {MODEL_FILE, DATA_FILE, "qcompile.json", "report.json"}  # the fp32 recipe's own metadata
PROBE_TOKENS = 256  # tokens of the first test window used to probe the session option's effect

logging.getLogger(mnq.__name__).setLevel(logging.WARNING)  # one INFO line per node otherwise
logging.getLogger("neural_compressor").setLevel(logging.WARNING)


class WindowReader(CalibrationDataReader):
    """One calibration window per run, as the graph takes a prefill without cache."""

    def __init__(self, ids: np.ndarray, empty_past: list[tuple[np.ndarray, np.ndarray]]):
        self.ids, self.past, self.next_index = ids, empty_past, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.next_index == len(self.ids):
            return None
        ids = self.ids[self.next_index : self.next_index + 1]
        self.next_index += 1
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]}
        for i, (k, v) in enumerate(self.past):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
        return feed


def gptq_config(args, fp32_dir: Path, tokenizer) -> mnq.GPTQWeightOnlyQuantConfig:
    calib = CalibrationConfig(calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len).load(tokenizer)
    # [1, kv_heads, 0, head_dim] per layer, from the graph's past_key_values.* inputs / present.* outputs
    empty_past = OrtCausalLM.from_dir(fp32_dir, threads=args.threads).empty_past(1)
    reader = WindowReader(calib.numpy().astype(np.int64), empty_past)
    return mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, block_size=BLOCK)


# method -> (algo config factory (args, fp32 folder, tokenizer), symmetric); None = the input folder as is
METHODS: dict[str, tuple[Callable[..., mnq.WeightOnlyQuantConfig], bool] | None] = {
    "fp32": None,
    "ort-default-asym": (lambda a, f, t: mnq.DefaultWeightOnlyQuantConfig(
        block_size=BLOCK, is_symmetric=False, accuracy_level=a.accuracy_level, bits=BITS), False),
    "ort-default-sym": (lambda a, f, t: mnq.DefaultWeightOnlyQuantConfig(
        block_size=BLOCK, is_symmetric=True, accuracy_level=a.accuracy_level, bits=BITS), True),
    "ort-hqq": (lambda a, f, t: mnq.HQQWeightOnlyQuantConfig(block_size=BLOCK, bits=BITS), False),
    "ort-rtn-asym": (lambda a, f, t: mnq.RTNWeightOnlyQuantConfig(), False),
    "ort-rtn-sym": (lambda a, f, t: mnq.RTNWeightOnlyQuantConfig(), True),
    "ort-gptq-asym": (gptq_config, False),
    "ort-gptq-sym": (gptq_config, True),
}
BROKEN = {"ort-rtn-asym", "ort-gptq-asym"}  # fail on SmolLM2 (see the module docstring); run them by name


def plain_settings(config: mnq.WeightOnlyQuantConfig) -> dict:
    """The config's scalar fields (what the tool was told), for the JSON."""
    return {k: v.name if hasattr(v, "name") else v for k, v in vars(config).items()
            if isinstance(v, (bool, int, float, str, type(None))) or hasattr(v, "name")}


def quantize(fp32_dir: Path, folder: Path, method: str, args, tokenizer, row: dict) -> None:
    """Run the tool for ``method`` on the fp32 graph and save the result as a loadable folder; the settings
    (recorded before the tool runs, so a failure keeps them) and the timing go into ``row``."""
    make_config, symmetric = METHODS[method]
    config = make_config(args, fp32_dir, tokenizer)
    row["tool_settings"] = {"quantizer": {"bits": BITS, "block_size": BLOCK, "is_symmetric": symmetric,
                                          "accuracy_level": args.accuracy_level},
                            "algo_config": plain_settings(config)}
    if isinstance(config, mnq.GPTQWeightOnlyQuantConfig):
        row["calibration"] = {"split": "valid", "samples": args.calib_samples, "seq_len": args.calib_seq_len}
    model = onnx.load(str(fp32_dir / MODEL_FILE))  # external data loaded: the tool reads weights from memory
    t0 = time.perf_counter()
    quantizer = mnq.MatMulNBitsQuantizer(model, bits=BITS, block_size=BLOCK, is_symmetric=symmetric,
                                         accuracy_level=args.accuracy_level, algo_config=config)
    quantizer.process()
    row["quantize_seconds"] = time.perf_counter() - t0
    if config.algorithm in ("RTN", "GPTQ"):
        print(flush=True)  # the INC paths end their progress bar without a newline
    if folder.exists():
        shutil.rmtree(folder)  # onnx appends to an existing external data file
    folder.mkdir(parents=True)
    onnx.save_model(quantizer.model.model, str(folder / MODEL_FILE), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=DATA_FILE)
    for f in fp32_dir.iterdir():
        if f.is_file() and f.name not in SKIP_FILES:
            shutil.copy2(f, folder / f.name)


def graph_summary(folder: Path) -> dict:
    """MatMulNBits nodes (count, accuracy_level attributes, block sizes, zero points) and the MatMuls whose
    weight (an initializer, or a Transpose of one) was left float."""
    graph = onnx.load(str(folder / MODEL_FILE), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    transposed = {n.output[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits}
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
    float_mm = [n.name for n in graph.node
                if n.op_type == "MatMul" and (n.input[1] in inits or n.input[1] in transposed)]
    return {
        "matmulnbits": len(nbits),
        "accuracy_level_attr": dict(Counter(str(a.get("accuracy_level", "unset")) for a in attrs)),
        "block_size_attr": dict(Counter(str(a["block_size"]) for a in attrs)),
        "with_zero_points": sum(len(n.input) > 3 and bool(n.input[3]) for n in nbits),
        "float_weight_matmuls": {"count": len(float_mm), "first_names": float_mm[:8]},
        "model_onnx_data_bytes": (folder / DATA_FILE).stat().st_size,
    }


def session_option_effect(folder: Path, level: int, ids: np.ndarray, threads: int | None) -> float:
    """max |Δlogit| between sessions with the accuracy-level option at 1 and at ``level`` (0: no effect)."""
    a = OrtCausalLM.from_dir(folder, accuracy_level=1, threads=threads).logits(ids)
    b = OrtCausalLM.from_dir(folder, accuracy_level=level, threads=threads).logits(ids)
    return float(np.abs(a - b).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fp32_dir", help="folder written by `qcompile export <model> --recipe fp32`")
    ap.add_argument("--methods", default="working",
                    help=f"comma list of {', '.join(METHODS)}; 'all'; or 'working' (all but {', '.join(BROKEN)})")
    ap.add_argument("--work-dir", default="out/peers", help="each quantized graph goes to <work-dir>/<method>/")
    ap.add_argument("--accuracy-level", type=int, default=4, help="MatMulNBits accuracy level (tool and session)")
    ap.add_argument("--limit", type=int, default=None, help="first N test windows only (default: all)")
    ap.add_argument("--calib-samples", type=int, default=128, help="GPTQ calibration windows")
    ap.add_argument("--calib-seq-len", type=int, default=2048, help="GPTQ calibration window length")
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads for the perplexity sessions")
    ap.add_argument("--out", default="bench/results/peers_ort.json")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    fp32_dir = Path(args.fp32_dir)
    names = {"all": list(METHODS), "working": [m for m in METHODS if m not in BROKEN]}.get(args.methods)
    names = names or args.methods.split(",")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    results.setdefault("methods", {})
    results["command"] = " ".join(["python"] + sys.argv)
    results["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "onnxruntime": ort.__version__, "onnx": onnx.__version__, "threads": args.threads}

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2))

    tokenizer = AutoTokenizer.from_pretrained(fp32_dir)
    test_windows = windows(token_stream(resolve_text(None, "test"), tokenizer), 2048, args.limit)
    probe = test_windows[:1, :PROBE_TOKENS].numpy()
    for name in names:
        folder = fp32_dir if METHODS[name] is None else Path(args.work_dir) / name
        row: dict = {"folder": str(folder), "session_accuracy_level": args.accuracy_level}
        try:
            if METHODS[name] is not None:
                quantize(fp32_dir, folder, name, args, tokenizer, row)
            row.update(graph_summary(folder))
            row["session_option_max_abs_logit_diff"] = session_option_effect(folder, args.accuracy_level, probe,
                                                                             args.threads)
            runner = OrtCausalLM.from_dir(folder, accuracy_level=args.accuracy_level, threads=args.threads)
            row["ppl"] = perplexity(ort_logits_fn(runner), test_windows, desc=name)
            print(f"{name}: ppl {row['ppl']['ppl']:.3f}  quantize {row.get('quantize_seconds', 0):.1f}s  "
                  f"{row['model_onnx_data_bytes'] / 1e6:.1f} MB  MatMulNBits {row['matmulnbits']} "
                  f"(accuracy_level {row['accuracy_level_attr']})", flush=True)
        except Exception as e:  # a peer method that fails is a result too: record it and go on
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"{name}: FAILED {row['error']}", flush=True)
        results["methods"][name] = row
        save()


if __name__ == "__main__":
    main()
