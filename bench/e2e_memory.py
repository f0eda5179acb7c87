"""Peak memory of end-to-end training (the engine behind DL-QAT, BiSup and sde's end-to-end stage), side by side:
the KL over the whole batch at once (the formula before the chunked ``kl_loss``, patched back in), the chunked KL,
and the chunked KL with gradient checkpointing (``grad_checkpoint``).

Each setting runs in its own process (peak memory is per process): SmolLM2-135M, canonicalize + DL-QAT on an RTN
grid (W4 g64, no GPTQ: the engine's memory is the question, not the result), ``--samples`` validation windows of
``--seq-len`` tokens in one batch, ``--epochs`` epochs. On CPU the figure is the process's peak resident memory
(ru_maxrss) and its rise over the resident memory just before training; on CUDA, torch's peak allocated memory.
The pass's seconds are printed too (on a shared CPU they are noise). Printed and saved as JSON.

    python bench/e2e_memory.py --out bench/results/e2e_memory_cpu.json
    python bench/e2e_memory.py --device cuda --samples 4 --out bench/results/e2e_memory_cuda.json
"""

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "whole-batch KL": dict(chunked=False, grad_checkpoint=False),
    "chunked KL": dict(chunked=True, grad_checkpoint=False),
    "chunked KL + grad checkpoint": dict(chunked=True, grad_checkpoint=True),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(args) -> dict:
    """One setting, in this process."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from qcompile import passes
    from qcompile.learn import end_to_end
    from qcompile.models import load
    from qcompile.pipeline import run_passes
    from qcompile.recipe import PassStep, Recipe

    setting = SETTINGS[args.setting]
    if not setting["chunked"]:
        def whole_batch_kl(student_logits, teacher_logits):  # kl_loss before it was chunked
            s = F.log_softmax(student_logits.float(), dim=-1)
            t = F.log_softmax(teacher_logits.float(), dim=-1)
            return (t.exp() * (t - s)).sum(-1).mean()

        end_to_end.kl_loss = whole_batch_kl
    torch.set_num_threads(args.threads)
    h = load("smollm2-135m")
    cfg = passes.get("dlqat").Config(
        bits=4, group_size=64, epochs=args.epochs, magnitude_epochs=0, batch_size=args.samples,
        calib_samples=args.samples, calib_seq_len=args.seq_len, device=args.device,
        grad_checkpoint=setting["grad_checkpoint"])
    recipe = Recipe("e2e-memory", [PassStep("canonicalize", passes.get("canonicalize").Config()),
                                   PassStep("dlqat", cfg)])
    before = rss_bytes()
    t0 = time.perf_counter()
    stats = run_passes(h, recipe)["1:dlqat"]
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "setting": args.setting,
        "peak_rss_gb": peak / 2**30,
        "rss_before_training_gb": before / 2**30,
        "rise_gb": (peak - before) / 2**30,
        "peak_gpu_memory_gb": stats["peak_gpu_memory_gb"],
        "kl_before": stats["kl_before"],
        "kl_after": stats["kl_after"],
        "pass_seconds": seconds,
        "steps": args.epochs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=2, help="windows per batch (one batch per epoch)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/e2e_memory_cpu.json")
    ap.add_argument("--setting", help=argparse.SUPPRESS)  # internal: run one setting in this process
    args = ap.parse_args()
    if args.setting:
        print(json.dumps(child(args)))
        return
    rows = []
    for name in SETTINGS:
        cmd = [sys.executable, __file__, "--setting", name, "--device", args.device, "--samples", str(args.samples),
               "--seq-len", str(args.seq_len), "--epochs", str(args.epochs), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        gpu = f", GPU peak {row['peak_gpu_memory_gb']:.2f} GB" if row["peak_gpu_memory_gb"] is not None else ""
        print(f"{name:30s} peak RSS {row['peak_rss_gb']:.2f} GB (rise {row['rise_gb']:.2f} GB){gpu}, "
              f"KL {row['kl_before']:.4f} -> {row['kl_after']:.4f}, pass {row['pass_seconds']:.1f} s", flush=True)
    base = rows[0]
    key = "peak_gpu_memory_gb" if base["peak_gpu_memory_gb"] is not None else "rise_gb"
    for row in rows[1:]:
        row[f"{key}_vs_whole_batch"] = row[key] / base[key]
        print(f"{row['setting']}: {key} {row[key]:.2f} / {base[key]:.2f} = {row[f'{key}_vs_whole_batch']:.2f}x")
    out = {"rows": rows, "tokens_per_step": args.samples * args.seq_len, "device": args.device,
           "machine": {"platform": platform.platform(), "python": platform.python_version()},
           "command": " ".join(sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("saved", args.out)


if __name__ == "__main__":
    main()
