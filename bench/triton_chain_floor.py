"""What does a *dependent* chain step cost before any decode: the floor under the PDL-chained 4096 x 4096 GEMV.

``triton_read_floor.py`` times kernels that only read the GEMV's words, and waits only before the store, so
consecutive kernels overlap completely (2.87 µs a step at 4096 x 4096). A real chain of GEMVs cannot do that: each
kernel's products need the whole output of the kernel before. This script times chains in which each kernel really
depends on the previous one (kernel i reads all of buffer i and writes buffer i + 1, in one CUDA graph), with no
decode at all:

- ``words=none``: release the next kernel, wait, read all 4096 activations, write the output slice: the latency of
  one dependent step (release, grid completion, the activations from L2, the store);
- ``words=before``: the same after reading the program's whole slice of the 4096 x 4096 int4 words (XOR) before
  the wait: an ideal GEMV whose decode cost nothing;
- ``words=after``: the words read only after the wait;
- ``words=held`` / ``held3`` / ``held12``: the program's whole slice loaded into registers before the wait (one
  load of ``K / 8 x BLOCK_N`` words: 64-256 registers a thread in these grids) and used only after it, through
  integer work that depends on the kernel before's output: an add and a sum, plus 0, 1 or 4 rounds of shift, xor
  and add (about 2, 5 and 14 SASS instructions a word, counted in the sm_90 compile on the CPU machine): whether a
  kernel that *holds* its words across the wait, rather than consuming them, keeps the ``before`` floor, and what
  each instruction a word after the wait costs.

Each as ``PDL`` launches and as plain launches, over a few grids. The fraction is over the GEMV's bytes, as in the
other GEMV benchmarks.

    python bench/triton_chain_floor.py --out bench/results/triton_chain_floor.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.triton_kernels import graph_time, peak_copy_bandwidth  # noqa: E402
from bench.triton_read_floor import word_copies  # noqa: E402

WORDS = {"none": 0, "before": 1, "after": 2, "held": 3, "held3": 4, "held12": 5}
HELD_ROUNDS = {3: 0, 4: 1, 5: 4}  # rounds of three instructions a word after the wait, beside the add and the xor


@triton.jit
def _step_kernel(w_ptr, x_ptr, y_ptr, N, K, rows, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, WORDS: tl.constexpr, PDL: tl.constexpr, ROWS: tl.constexpr = 512,
                 ROUNDS: tl.constexpr = 0):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if PDL:
        gdc_launch_dependents()
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.int32)
    if WORDS == 1:
        for r0 in range(0, rows, BLOCK_R):
            acc ^= tl.load(w_ptr + (r0 + tl.arange(0, BLOCK_R))[:, None] * N + offs_n[None, :])
    if WORDS >= 3:  # the whole slice in registers, one load (ROWS = rows)
        held = tl.load(w_ptr + tl.arange(0, ROWS)[:, None] * N + offs_n[None, :])
    if PDL:
        gdc_wait()
    if WORDS == 2:
        for r0 in range(0, rows, BLOCK_R):
            acc ^= tl.load(w_ptr + (r0 + tl.arange(0, BLOCK_R))[:, None] * N + offs_n[None, :])
    # everything below needs the previous kernel's output: all of it, as a GEMV's products do
    s = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        s += tl.load(x_ptr + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
    total = tl.sum(s, axis=0)
    if WORDS >= 3:  # the held words used only now, through a value of the kernel before's output
        xi = tl.load(x_ptr + offs_n).to(tl.int16, bitcast=True).to(tl.int32)
        h = held + xi[None, :]
        for _ in tl.static_range(ROUNDS):
            h = (h ^ (h >> 3)) + xi[None, :]
        # a wrapping sum into the output (its float depends on every bit, so no instruction can be dropped)
        bits = tl.sum(h, axis=0).to(tl.float32) * 1e-6
    else:
        bits = (tl.xor_sum(acc, axis=0) & 1).to(tl.float32)
    y = tl.load(x_ptr + offs_n).to(tl.float32) * 0.5 + total * 1e-6 + bits * 1e-9
    tl.store(y_ptr + offs_n, y.to(tl.float16))


def step(w, x, y, cfg, words, pdl):
    rows, n = w.shape
    _step_kernel[(n // cfg["BLOCK_N"],)](w, x, y, n, x.numel(), rows, BLOCK_R=cfg["BLOCK_R"],
                                         BLOCK_N=cfg["BLOCK_N"], BLOCK_K=1024, WORDS=WORDS[words], PDL=pdl,
                                         num_warps=cfg["num_warps"], ROWS=rows, ROUNDS=HELD_ROUNDS.get(WORDS[words], 0),
                                         **({"launch_pdl": True} if pdl else {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/triton_chain_floor.json")
    ap.add_argument("--words", default=",".join(WORDS), help="comma-separated subset of " + ", ".join(WORDS))
    ap.add_argument("--grids", default="all", help="'held': only the grids whose slice is 64 registers a thread")
    args = ap.parse_args()
    kinds = args.words.split(",")
    if any(w not in WORDS for w in kinds):
        ap.error(f"--words takes {', '.join(WORDS)}")
    res = {"device": torch.cuda.get_device_name(), "peak_copy": peak_copy_bandwidth(), "rows": []}
    peak = res["peak_copy"]["tb_per_s"]
    print(f"peak copy {peak:.2f} TB/s", flush=True)
    n = k = 4096
    ws, gemv_bytes = word_copies(n, k)
    copies = len(ws)
    xs = [torch.randn(k, device="cuda").half() for _ in range(copies + 1)]
    grids = [{"BLOCK_N": 32, "BLOCK_R": 64, "num_warps": 4}, {"BLOCK_N": 32, "BLOCK_R": 32, "num_warps": 8},
             {"BLOCK_N": 16, "BLOCK_R": 64, "num_warps": 4}, {"BLOCK_N": 64, "BLOCK_R": 32, "num_warps": 8},
             {"BLOCK_N": 128, "BLOCK_R": 16, "num_warps": 8}, {"BLOCK_N": 64, "BLOCK_R": 32, "num_warps": 16}]
    if args.grids == "held":  # K / 8 x BLOCK_N words over 32 x warps threads = 64 registers each
        grids = [c for c in grids if (k // 8) * c["BLOCK_N"] // (32 * c["num_warps"]) == 64]
    for cfg in grids:
        for w in kinds:
            row = {"config": cfg, "words": w}
            y = torch.empty_like(xs[0])
            step(ws[0], xs[0], y, cfg, w, True)
            ref = xs[0].float() * 0.5 + xs[0].float().sum() * 1e-6
            row["max_err"] = (y.float() - ref).abs().max().item()  # fp16 rounding only
            for pdl in (False, True):
                calls = [lambda i=i, p=pdl: step(ws[i], xs[i], xs[i + 1], cfg, w, p) for i in range(copies)]
                t = graph_time(calls)
                tag = "pdl" if pdl else "plain"
                row[f"{tag}_us"] = t * 1e6
                row[f"{tag}_fraction_of_gemv_bytes"] = gemv_bytes / t / 1e12 / peak
            res["rows"].append(row)
            print(f"4096x4096 grid {n // cfg['BLOCK_N']} x {cfg['num_warps']} warps, words {w}: plain "
                  f"{row['plain_us']:.2f} us ({row['plain_fraction_of_gemv_bytes']:.0%}), PDL {row['pdl_us']:.2f} us "
                  f"({row['pdl_fraction_of_gemv_bytes']:.0%}), err {row['max_err']:.1e}", flush=True)
    print(f"75 % of peak over the GEMV's bytes needs {gemv_bytes / (0.75 * peak * 1e12) * 1e6:.2f} us", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
