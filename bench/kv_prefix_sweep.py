"""Which float KV prefix helps a KV-quantized model read text after a system prompt? A sweep over the prefix length P.

BiSup's prompt mixed precision keeps the system prompt's KV cache float (P = the prompt's length). On SmolLM2-135M
that made perplexity slightly *worse* in every measurement but one (docs/BENCHMARKS.md, section 2). One guess was
the attention sink: the first token(s) of the prompt, which most heads attend to, and whose quantized keys the rest
of the quantized model might be closer to. This script separates the sink from the rest of the prompt: every test
window is read after the same system turn (chat template) and its ppl measured with the first P positions float,
for each P given (0 = everything quantized; P = 1 keeps only the first token float; the prompt's length = BiSup).
The scored tokens are the same for every P. Torch fake-quant, one process, one trained/quantized model.

    python bench/kv_prefix_sweep.py --variant w4a4kv4-rot-rtn --prefixes 0,1,4,prompt --limit 8 \
        --out bench/results/kv_prefix_sweep.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spine_quality import SYSTEM_PROMPT, kv_prefix, variant_recipe  # noqa: E402

from qcompile.data import resolve_text, system_prompt_ids, token_stream, windows  # noqa: E402
from qcompile.eval.perplexity import perplexity, torch_logits_fn  # noqa: E402
from qcompile.models import load  # noqa: E402
from qcompile.pipeline import run_passes  # noqa: E402


def parse_prefixes(text: str, prompt_len: int) -> list[int]:
    out = []
    for item in text.split(","):
        p = prompt_len if item.strip() == "prompt" else int(item)
        if not 0 <= p <= prompt_len:
            raise SystemExit(f"prefix {p} is outside 0..{prompt_len} (the system prompt's length)")
        out.append(p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variant", default="w4a4kv4-rot-rtn", help="a KV-quantized variant of bench/spine_quality.py")
    ap.add_argument("--prefixes", default="0,1,4,prompt", help="comma list of P; 'prompt' = the prompt's length")
    ap.add_argument("--limit", type=int, default=8, help="test windows of 2048 tokens")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calib-samples", type=int, default=None,
                    help="calibration windows of 2048 tokens for a calibrated variant (GPTQ: default the recipe's 128, "
                         "which takes about 95 min on one CPU core)")
    ap.add_argument("--out", default="bench/results/kv_prefix_sweep.json")
    args = ap.parse_args()

    h = load(args.model, device=args.device)
    test_windows = windows(token_stream(resolve_text(None, "test"), h.tokenizer), 2048, args.limit)
    t0 = time.perf_counter()
    run_passes(h, variant_recipe(args.variant, calib_samples=args.calib_samples or ...))
    if h.kv_quant is None:
        raise SystemExit(f"variant {args.variant} does not quantize the KV cache")
    prompt = system_prompt_ids(h.tokenizer, SYSTEM_PROMPT)
    prefixes = parse_prefixes(args.prefixes, int(prompt.numel()))
    rows = {}
    for p in prefixes:
        with kv_prefix(h, p), torch.inference_mode():
            rows[str(p)] = perplexity(torch_logits_fn(h.model), test_windows, desc=f"P={p}", prefix=prompt)["ppl"]
        print(f"P={p}: ppl {rows[str(p)]:.3f}", flush=True)
    result = {"variant": args.variant, "kv_quant": str(h.kv_quant.spec), "windows": int(test_windows.shape[0]),
              "calib_samples": args.calib_samples,
              "system_prompt": SYSTEM_PROMPT, "prompt_tokens": int(prompt.numel()),
              "first_tokens": h.tokenizer.convert_ids_to_tokens(prompt[:4].tolist()),
              "ppl_by_prefix": rows, "seconds": round(time.perf_counter() - t0, 1),
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "device": args.device},
              "command": " ".join(["python"] + sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(rows), f"saved {args.out}")


if __name__ == "__main__":
    main()
