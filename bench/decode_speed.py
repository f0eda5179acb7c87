"""ORT CPU decode speed at batch 1: exported graphs side by side in one run (interleaved repeats).

Prefill a prompt of --prompt-len tokens (WikiText-2 test text), then decode --new-tokens tokens one at a time
with the KV cache (greedy). Reports prefill and decode tokens/s per graph and accuracy level, and each decode
speed as a ratio to the first graph given (the fp32 reference).

    python bench/decode_speed.py out/bench/fp32 out/bench/rtn-w4-asym --levels 4,1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qcompile.runtime.ort import OrtCausalLM  # noqa: E402


def prompt_tokens(folder: Path, n: int) -> np.ndarray:
    from transformers import AutoTokenizer

    from qcompile.data import resolve_text

    tok = AutoTokenizer.from_pretrained(folder)
    text = resolve_text(None, "test").read_text()[:20000]
    return np.array(tok(text, add_special_tokens=False)["input_ids"][:n], dtype=np.int64)


def timed_decode(runner: OrtCausalLM, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens greedy steps)."""
    ids = prompt[None, :]
    t0 = time.perf_counter()
    logits, past = runner.forward(ids)
    t1 = time.perf_counter()
    length = ids.shape[1]
    for _ in range(new_tokens):
        nxt = np.array([[int(logits[0, -1].argmax())]], dtype=np.int64)
        length += 1
        logits, past = runner.forward(nxt, attention_mask=np.ones((1, length), np.int64),
                                      position_ids=np.array([[length - 1]], np.int64), past=past)
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("graphs", nargs="+", help="exported folders; the first is the reference (fp32)")
    ap.add_argument("--levels", default="4,1", help="MatMulNBits accuracy levels to try on quantized graphs")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench/results/decode_speed.json")
    args = ap.parse_args()

    folders = [Path(g) for g in args.graphs]
    prompt = prompt_tokens(folders[0], args.prompt_len)
    runs = []  # (label, runner, folder)
    for i, f in enumerate(folders):
        levels = [None] if i == 0 else [int(x) for x in args.levels.split(",")]
        for level in levels:
            runner = OrtCausalLM.from_dir(f, accuracy_level=level, threads=args.threads)
            label = f.name if level is None else f"{f.name}@acc{level}"
            timed_decode(runner, prompt, 8)  # warm-up
            runs.append((label, runner, f))
    samples: dict[str, dict[str, list[float]]] = {label: {"prefill": [], "decode": []} for label, _, _ in runs}
    for _ in range(args.repeats):  # interleaved so drift hits every graph alike
        for label, runner, _ in runs:
            p, d = timed_decode(runner, prompt, args.new_tokens)
            samples[label]["prefill"].append(p)
            samples[label]["decode"].append(d)
    ref = runs[0][0]
    ref_tps = args.new_tokens / statistics.median(samples[ref]["decode"])
    rows = {}
    for label, s in samples.items():
        tps = args.new_tokens / statistics.median(s["decode"])
        rows[label] = {
            "decode_tokens_per_s": tps,
            "prefill_tokens_per_s": args.prompt_len / statistics.median(s["prefill"]),
            "decode_speedup_vs_ref": tps / ref_tps,
        }
    for label, _, folder in runs:
        rows[label]["model_bytes"] = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
        print(f"{label:32s} decode {rows[label]['decode_tokens_per_s']:8.1f} tok/s  "
              f"prefill {rows[label]['prefill_tokens_per_s']:8.1f} tok/s  x{rows[label]['decode_speedup_vs_ref']:.2f}  "
              f"{rows[label]['model_bytes'] / 1e6:.1f} MB")
    result = {
        "command": " ".join(["python"] + sys.argv),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": args.threads},
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "reference": ref, "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
