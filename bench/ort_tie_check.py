"""Where ONNX Runtime's own greedy answer is a near tie: its greedy tokens for one chat prompt at several accuracy
levels, and at each step the margin between its top two logits (absolute and as a fraction of the logits' range).
A runtime whose answer parts from ORT's at such a step has flipped a tie, not computed another function.

    python bench/ort_tie_check.py out/smollm2-w4 "What is the capital of France?" --out bench/results/ort_tie_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qcompile.runtime.ort import OrtCausalLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="an exported folder")
    ap.add_argument("prompt")
    ap.add_argument("--levels", default="1,4", help="ORT accuracy levels (comma-separated)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--tie", type=float, default=0.01, help="report steps whose margin is below this fraction of "
                                                             "the logits' range")
    ap.add_argument("--out", default="bench/results/ort_tie_check.json")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.folder)
    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                  tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    res = {"folder": args.folder, "prompt": args.prompt, "levels": {}}
    for level in (int(x) for x in args.levels.split(",")):
        ort = OrtCausalLM.from_dir(args.folder, accuracy_level=level)
        ref = ort.generate(ids, args.new_tokens)
        logits = ort.logits(np.array([ids + ref[:-1]]))[0, len(ids) - 1:]
        steps = []
        for i, row in enumerate(logits):
            first, second = np.argsort(row)[-2:][::-1]
            margin = float(row[first] - row[second])
            span = float(row.max() - row.min())
            steps.append({"step": i, "token": tok.decode([int(first)]), "runner_up": tok.decode([int(second)]),
                          "margin": margin, "margin_of_range": margin / span})
        text = tok.decode(ref, skip_special_tokens=True)
        res["levels"][level] = {"text": text, "steps": steps}
        print(f"accuracy level {level}: {text!r}")
        for s in steps:
            if s["margin_of_range"] < args.tie:
                print(f"  step {s['step']}: {s['token']!r} over {s['runner_up']!r} by {s['margin']:.4f} "
                      f"({s['margin_of_range']:.2%} of the range)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
