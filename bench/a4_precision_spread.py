"""How far apart two correct implementations of a quantized-activation model drift: torch fp32 vs fp64 vs ORT.

A variant of spine_quality.py (default the rotated RTN W4A4KV4 SmolLM2, ``w4a4kv4-rot-rtn``; ``w8a8-rot-rtn`` for
8-bit activations), one 512-token test window: max |Δlogit|, argmax agreement and mean NLL of each pair. Printed
and saved as JSON. It is the yardstick for torch-vs-ORT parity of graphs that round activations: a rounding flip
decided by float summation order grows over 30 layers, in torch alone as much as between torch and ORT.

    python bench/a4_precision_spread.py --out bench/results/a4_precision_spread.json
    python bench/a4_precision_spread.py --variant w8a8-rot-rtn --out bench/results/a8_precision_spread.json
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import spine_quality as sq  # noqa: E402
from qcompile.data import resolve_text, token_stream, windows  # noqa: E402
from qcompile.models import load  # noqa: E402
from qcompile.pipeline import export, run_passes  # noqa: E402
from qcompile.runtime.ort import OrtCausalLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="w4a4kv4-rot-rtn")
    ap.add_argument("--export-dir", default="out/bench/a4_spread")
    ap.add_argument("--out", default="bench/results/a4_precision_spread.json")
    args = ap.parse_args()
    h = load("smollm2-135m")
    recipe = sq.variant_recipe(args.variant)
    run_passes(h, recipe)
    export(h, args.export_dir, recipe, overwrite=True)
    ids = windows(token_stream(resolve_text(None, "test"), h.tokenizer), 512, 1)

    def nll(logits):
        lp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64)[0, :-1], -1)
        return float(-lp.gather(-1, ids[0, 1:, None]).mean())

    with torch.no_grad():
        f32 = h.model(input_ids=ids, use_cache=False).logits.numpy()
        h.model.double()
        f64 = h.model(input_ids=ids, use_cache=False).logits.float().numpy()
    ort_logits = OrtCausalLM.from_dir(args.export_dir, accuracy_level=1, threads=2).logits(ids.numpy())
    res = {"variant": args.variant, "tokens": int(ids.numel()),
           "nll": {"torch_fp32": nll(f32), "torch_fp64": nll(f64), "ort": nll(ort_logits)}}
    for name, other in (("torch_fp32_vs_fp64", f64), ("torch_fp32_vs_ort", ort_logits)):
        res[name] = {"max_abs_logit_diff": float(np.abs(f32 - other).max()),
                     "argmax_agreement": float((f32.argmax(-1) == other.argmax(-1)).mean())}
    print(json.dumps(res, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
