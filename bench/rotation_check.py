"""Rotation check on SmolLM2-135M, float32 on the CPU: is the rotated model the float model, and what does rotation
do to plain RTN W4 (asym, g64)? WikiText-2 test perplexity (BRIEF.md protocol) on the first --limit windows.

Rows: float; rotated float (R1 + R2 random Hadamard, online R4; R3 is score-neutral); RTN W4 unrotated; RTN W4
with the norm scales fused but no rotation (separates folding from rotating); RTN W4 after rotation. Each row
is a recipe built in code and run with ``qcompile.pipeline.run_passes``. The rotated float row also reports
max |Δlogit| against the float model on the first window.

    python bench/rotation_check.py            # 4 windows, about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qcompile.data import resolve_text, token_stream, windows  # noqa: E402
from qcompile.eval.perplexity import perplexity, torch_logits_fn  # noqa: E402
from qcompile.models import load  # noqa: E402
from qcompile.passes.canonicalize import CanonicalizeConfig  # noqa: E402
from qcompile.passes.rotate import RotateConfig  # noqa: E402
from qcompile.passes.rtn import RTNConfig  # noqa: E402
from qcompile.pipeline import run_passes  # noqa: E402
from qcompile.recipe import PassStep, Recipe  # noqa: E402

W4 = RTNConfig(bits=4, symmetric=False, group_size=64)
ROWS: dict[str, list[PassStep]] = {
    "float": [],
    "rotated float (R1+R2+R4)": [PassStep("rotate", RotateConfig())],
    "RTN W4 asym g64": [PassStep("rtn", W4)],
    "RTN W4 asym g64, norms fused": [PassStep("canonicalize", CanonicalizeConfig(fuse_norms=True)),
                                     PassStep("rtn", W4)],
    "RTN W4 asym g64 after rotation": [PassStep("rotate", RotateConfig()), PassStep("rtn", W4)],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=4, help="test windows of 2048 tokens (default 4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/rotation_check.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base = load("smollm2-135m")
    test = windows(token_stream(resolve_text(None, "test"), base.tokenizer), 2048, args.limit)
    with torch.inference_mode():
        ref_logits = base.model(input_ids=test[:1], use_cache=False).logits
    del base

    results = {
        "model": "smollm2-135m", "dtype": "float32", "device": "cpu", "text": "wiki.test.raw",
        "windows": int(test.shape[0]), "seq_len": int(test.shape[1]), "rows": {},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads,
                    "cpu_count": os.cpu_count()},
        "command": " ".join(["python"] + sys.argv),
    }
    for name, steps in ROWS.items():
        h = load("smollm2-135m")
        recipe = Recipe(name=name, passes=steps)
        t0 = time.perf_counter()
        stats = run_passes(h, recipe)
        row = {"recipe": recipe.to_dict()["passes"], "passes": stats,
               "passes_seconds": round(time.perf_counter() - t0, 2)}
        with torch.inference_mode():
            row.update(perplexity(torch_logits_fn(h.model), test, desc=name))
            if name.startswith("rotated float"):
                out = h.model(input_ids=test[:1], use_cache=False).logits
                row["max_abs_dlogit_vs_float"] = (out - ref_logits).abs().max().item()
                row["max_abs_logit"] = ref_logits.abs().max().item()
        results["rows"][name] = row
        extra = f", max|Δlogit| {row['max_abs_dlogit_vs_float']:.2e}" if "max_abs_dlogit_vs_float" in row else ""
        print(f"{name:34s} ppl {row['ppl']:9.3f}  ({row['seconds']:.0f}s eval{extra})", flush=True)
        del h
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
