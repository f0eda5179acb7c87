"""How fast can any kernel only *read* the int4 GEMV's weights, timed the way the GEMV is timed?

Issue 7 asks the batch-1 int4 GEMV for >= 75 % of the peak copy bandwidth. This script measures the floor under
the same method as ``triton_kernels.py`` (a CUDA graph over enough weight copies to stream from HBM, a launch per
copy): a Triton kernel that loads every packed word exactly as the GEMV does (same grid, tiles and K splits, the
GEMV tuner's candidates) and XORs them into one word per column, with no decode and no activations. Each tiling
runs as plain launches and as programmatic dependent launches that release the next kernel at once and wait only
before their store (the most overlap a chain can get). The fraction is reported over the GEMV's bytes (words,
scales, zero points, activations, output), i.e. the fraction the GEMV would reach if it cost no more than reading
its words.

    python bench/triton_read_floor.py --out bench/results/triton_read_floor.json
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

from bench.triton_kernels import SHAPES, copies_for, graph_time, peak_copy_bandwidth  # noqa: E402
from qcompile.runtime.triton.wq_matmul import gemv_candidates  # noqa: E402


@triton.jit
def _read_kernel(w_ptr, out_ptr, N, n_rows, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                 PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    per_split = tl.cdiv(tl.cdiv(n_rows, SPLIT_K), BLOCK_R) * BLOCK_R
    r_lo = pid_k * per_split
    r_hi = tl.minimum(r_lo + per_split, n_rows)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if PDL:  # nothing here depends on the kernel before except the store's ordering
        gdc_launch_dependents()
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.int32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        acc ^= tl.load(w_ptr + offs_r[:, None] * N + offs_n[None, :], mask=(offs_r < r_hi)[:, None] & n_mask[None, :],
                       other=0)
    y = tl.xor_sum(acc, axis=0)
    if PDL:
        gdc_wait()
    tl.store(out_ptr + pid_k * N + offs_n, y, mask=n_mask)


def word_copies(n: int, k: int) -> tuple[list, int]:
    """Random int4 words of an N x K GEMV (``[K / 8, N]`` int32) in enough copies to stream from HBM, and the bytes
    the GEMV itself reads (words, fp16 scales and uint8 zero points in groups of 128, x, y): what the floors'
    fractions are taken over."""
    rows = k // 8
    words = torch.randint(-2**31, 2**31 - 1, (rows, n), dtype=torch.int32, device="cuda")
    copies = copies_for(words.numel() * 4)
    return [words] + [words.clone() for _ in range(copies - 1)], rows * n * 4 + (k // 128) * n * 3 + k * 2 + n * 2


def read_all(w, out, cfg, pdl):
    rows, n = w.shape
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    _read_kernel[grid](w, out, n, rows, BLOCK_R=cfg["BLOCK_R"], BLOCK_N=cfg["BLOCK_N"], SPLIT_K=cfg["SPLIT_K"],
                       PDL=pdl, num_warps=cfg["num_warps"], **({"launch_pdl": True} if pdl else {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/triton_read_floor.json")
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "peak_copy": peak_copy_bandwidth(), "shapes": []}
    peak = res["peak_copy"]["tb_per_s"]
    print(f"peak copy {peak:.2f} TB/s", flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for n, k in SHAPES:
        ws, gemv_bytes = word_copies(n, k)
        shape = {"N": n, "K": k, "words_bytes": ws[0].numel() * 4, "gemv_bytes": gemv_bytes, "tilings": []}
        for cfg in gemv_candidates(1, n, k, 4, sms):
            cfg = {key: cfg[key] for key in ("BLOCK_R", "BLOCK_N", "SPLIT_K", "num_warps")}
            outs = [torch.empty(cfg["SPLIT_K"], n, dtype=torch.int32, device="cuda") for _ in ws]
            row = {"config": cfg}
            for pdl in (False, True):
                t = graph_time([lambda w=w, o=o, p=pdl: read_all(w, o, cfg, p) for w, o in zip(ws, outs)])
                tag = "pdl" if pdl else "plain"
                row[f"{tag}_us"] = t * 1e6
                row[f"{tag}_fraction_of_gemv_bytes"] = gemv_bytes / t / 1e12 / peak
            shape["tilings"].append(row)
            print(f"{n}x{k} {cfg}: plain {row['plain_us']:.2f} us ({row['plain_fraction_of_gemv_bytes']:.0%}), "
                  f"PDL {row['pdl_us']:.2f} us ({row['pdl_fraction_of_gemv_bytes']:.0%})", flush=True)
        best = {tag: min(shape["tilings"], key=lambda r: r[f"{tag}_us"]) for tag in ("plain", "pdl")}
        shape["best"] = {tag: {"config": r["config"], "us": r[f"{tag}_us"],
                               "fraction_of_gemv_bytes": r[f"{tag}_fraction_of_gemv_bytes"]} for tag, r in best.items()}
        print(f"{n}x{k}: best plain {best['plain']['plain_us']:.2f} us, best PDL {best['pdl']['pdl_us']:.2f} us; "
              f"75 % of peak over the GEMV's bytes needs {gemv_bytes / (0.75 * peak * 1e12) * 1e6:.2f} us",
              flush=True)
        res["shapes"].append(shape)
        del ws
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
