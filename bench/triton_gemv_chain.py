"""The batch-1 int4 GEMV as a step of a dependent chain: the persistent chain kernel vs a launch per GEMV.

Issue 7 asks the 4096 x 4096 int4 GEMV for >= 75 % of the peak copy bandwidth and >= 2.5x torch fp16. A decode
step is a chain: each GEMV needs the whole output of the one before. This script times, in one run, chains of
``L`` distinct 4096 x 4096 int4 weights (asymmetric, groups of 128, fp16 activations; every step's input is the
step before's output):

- ``persistent``: ``gemv_chain`` (qcompile.runtime.triton.gemv_chain), one launch for the chain, a grid barrier
  between steps, each program's slice of the next weight in registers before it waits; per configuration, and
  once with ``AHEAD=False`` (each slice read after the wait: the same kernel without its point) and once with
  ``NO_BARRIER`` (no grid barrier: wrong results by design, the barrier's cost);
- ``runtime PDL``: ``wq_linear(..., pdl=True)`` per step, the tuner's pick, in one CUDA graph (how the runner's
  decode step launches its GEMVs);
- ``digits``: ``gemv_digits_chain`` (qcompile.runtime.triton.gemv_digits), a PDL launch per step, each program's
  words held in registers across the wait, the products on the int8 tensor cores with the activations as int8
  digit planes (exact); its output is checked like the others. Its word loads are paced in ``PACE`` (4) batches; the
  rows ``PACE`` 1 (one batch), 2 and 8 time the other paces (same bits), and ``NO_BARRIER`` its no-wait ablation;
- ``fp16``: ``torch.matmul`` per step on fp16 weights of the same shape (cuBLAS), in one CUDA graph;

and the peak device-to-device copy. Time per step is the launch's (or graph's) time over ``L``, at two chain
lengths (the difference gives the marginal step, free of the one launch). Fractions are over the GEMV's bytes
(words, scales, zero points, x and y), as in ``bench/triton_kernels.py``. Every step's output is checked against
``wq_linear`` applied to the chain's own input to that step.

    python bench/triton_gemv_chain.py --out bench/results/triton_gemv_chain.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("QCOMPILE_TUNE_CACHE", "0")

from bench.triton_kernels import graph_time, peak_copy_bandwidth, random_int_weight  # noqa: E402
from qcompile.runtime.triton.gemv_chain import chain_config, gemv_chain, stack_chain  # noqa: E402
from qcompile.runtime.triton.gemv_chain_staged import gemv_chain_staged, stage_chain  # noqa: E402
from qcompile.runtime.triton.gemv_digits import (  # noqa: E402
    PACE,
    WARPS,
    digit_planes,
    gemv_digits_chain,
    stack_digits,
)
from qcompile.runtime.triton.packing import pack_from_export  # noqa: E402
from qcompile.runtime.triton.wq_matmul import wq_linear  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/triton_gemv_chain.json")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--layers", default="8,32", help="chain lengths (comma-separated)")
    ap.add_argument("--skip-staged", action="store_true", help="leave out the TMA-staged kernel (gemv_chain_staged)")
    ap.add_argument("--new-first", action="store_true",
                    help="time the staged kernel first, and of the counter-barrier kernel its default only")
    ap.add_argument("--digits", action="store_true",
                    help="only the digit-plane kernel (its other paces and its no-wait ablation), the staged per-layer "
                         "kernel and the counter default (with the runtime's PDL chain and fp16, as always)")
    args = ap.parse_args()
    n = args.n
    lengths = [int(v) for v in args.layers.split(",")]
    res = {"device": torch.cuda.get_device_name(), "peak_copy": peak_copy_bandwidth(), "N": n, "K": n, "rows": []}
    peak = res["peak_copy"]["tb_per_s"]
    print(f"{res['device']}: peak copy {peak:.2f} TB/s", flush=True)
    gen = torch.Generator().manual_seed(0)
    weights = []
    for _ in range(max(lengths)):
        q, scale, zero = random_int_weight(n, n, 4, False, 128, gen)
        # scales * 0.2: a step's gain near 1 (codes - zeros have std ~6.5, scales mean ~0.011, 64 = sqrt(4096)),
        # so 32 steps stay in fp16's normal range
        weights.append(pack_from_export(q, scale * 0.2, zero, bits=4, dtype=torch.float16).to("cuda"))
    step_bytes = weights[0].nbytes + n * 2 + n * 2
    need_us = step_bytes / (0.75 * peak * 1e12) * 1e6
    print(f"{n}x{n} int4 step reads {step_bytes / 1e6:.2f} MB; 75 % of peak needs {need_us:.2f} us a step", flush=True)
    x = torch.randn(n, device="cuda", dtype=torch.float16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    configs = [chain_config(n, "cuda"), {"BLOCK_N": 32, "num_warps": 8}]
    if n // 64 <= sms:
        configs.append({"BLOCK_N": 64, "num_warps": 16})
    configs = [c for i, c in enumerate(configs) if c not in configs[:i] and n // c["BLOCK_N"] <= sms]
    # the ablation: each layer's slice read only after the barrier (what a launch per GEMV must do)
    configs.append(dict(configs[0], AHEAD=False))
    # and without the grid barrier (wrong results by design, not checked): what the barrier costs
    configs.append(dict(configs[0], NO_BARRIER=True))
    # the slices staged in shared memory by TMA, STAGES layers ahead (gemv_chain_staged, Gluon; synchronised
    # through tagged activations)
    if not args.skip_staged:
        for stages in (3, 2):
            configs.append({"STAGED": True, "STAGES": stages})
        configs.append({"STAGED": True, "STAGES": 3, "NO_BARRIER": True})
        # a launch a layer (PDL), each issuing its slice's TMA loads before waiting for the one before: the shape
        # a per-linear GEMV of the runner would have
        configs.append({"STAGED": True, "PER_LAYER": True})
    # the digit-plane kernel, and without waiting for the layer before (wrong by design): what the wait costs
    # (its four warps hold K / 32 words a thread: K up to 4096)
    # (PACE 1: the word loads in one batch, as before the twenty-fifth session; the default paces them in 4)
    # (a pace must divide the k32 steps a warp: 8 batches need K >= 1024)
    digit_cfgs = ([{"DIGITS": True}] + [{"DIGITS": True, "PACE": p} for p in (1, 2, 8)
                                        if p != PACE and (n // (32 * WARPS)) % p == 0]
                  + [{"DIGITS": True, "NO_BARRIER": True}] if n <= 4096 else [])
    configs += digit_cfgs
    if args.new_first:  # (a short device call: what earlier runs did not measure, then the reference)
        configs = [c for c in configs if c.get("STAGED") or c.get("DIGITS")] + configs[:1]
    if args.digits:
        configs = digit_cfgs + ([] if args.skip_staged else [{"STAGED": True, "PER_LAYER": True}]) + configs[:1]
    w16 = [torch.randn(n, n, device="cuda", dtype=torch.float16) / n**0.5 for _ in range(max(lengths))]
    for length in lengths:
        cw = stack_chain(weights[:length])
        staged = None if args.skip_staged else stage_chain(cw)
        digits = stack_digits(cw) if digit_cfgs else None
        out = torch.empty(length + 1, n, device="cuda", dtype=torch.float16)
        out[0].copy_(x)
        x0 = out[0]  # the chain's input in place: the timed graph holds the chain's launch alone
        planes = torch.zeros(length + 1, 8, n, device="cuda", dtype=torch.int8)
        planes[0] = digit_planes(x)  # the digit kernel's input (each launch writes the next layer's planes)

        def run(cfg, cw=cw, staged=staged, x0=x0, out=out, digits=digits, planes=planes):
            if cfg.get("DIGITS"):
                return gemv_digits_chain(planes, digits, out, wait=not cfg.get("NO_BARRIER"),
                                         pace=cfg.get("PACE", PACE))
            if cfg.get("STAGED"):
                return gemv_chain_staged(x0, staged, out=out, stages=cfg.get("STAGES", 1),
                                         sync=not cfg.get("NO_BARRIER"), per_layer=cfg.get("PER_LAYER", False))
            return gemv_chain(x0, cw, out=out, config=cfg)
        row = {"layers": length, "persistent": []}
        for cfg in configs:  # timings first (printed as they come), the checks after
            try:
                t = graph_time([lambda cfg=cfg: run(cfg)])
            except Exception as e:  # an experimental configuration that fails must not cost the others' rows
                row["persistent"].append({"config": cfg, "error": f"{type(e).__name__}: {e}"[:500]})
                print(f"L={length} persistent {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            entry = {"config": cfg, "us_per_step": t / length * 1e6, "launch_us": t * 1e6,
                     "fraction_of_peak_copy": step_bytes / (t / length) / 1e12 / peak}
            row["persistent"].append(entry)
            print(f"L={length} persistent {cfg}: {entry['us_per_step']:.2f} us a step = "
                  f"{entry['fraction_of_peak_copy']:.0%} of peak (launch {t * 1e6:.1f} us)", flush=True)
        for entry in row["persistent"]:
            cfg = entry["config"]
            if "error" in entry:
                continue
            run(cfg)
            torch.cuda.synchronize()
            entry["last_output_abs_max"] = out[-1].float().abs().max().item()
            if cfg.get("NO_BARRIER"):
                continue
            # every step against the runtime GEMV on the chain's own input to that step
            errs = []
            for layer in range(length):
                step = wq_linear(out[layer].reshape(1, -1), weights[layer]).reshape(-1).float()
                errs.append(((out[layer + 1].float() - step).abs().max() / step.abs().max()).item())
            entry["max_rel_diff_vs_wq_linear"] = max(errs)
            print(f"L={length} persistent {cfg}: max rel diff vs wq_linear over the steps {max(errs):.1e}, "
                  f"|last output| max {entry['last_output_abs_max']:.3g}", flush=True)
        del cw, staged, digits
        bufs = [torch.empty(1, n, device="cuda", dtype=torch.float16) for _ in range(length + 1)]
        bufs[0].copy_(x.reshape(1, -1))
        t_pdl = graph_time([lambda i=i: wq_linear(bufs[i], weights[i], out=bufs[i + 1], pdl=True)
                            for i in range(length)])
        t_16 = graph_time([lambda i=i: torch.matmul(bufs[i], w16[i].t(), out=bufs[i + 1]) for i in range(length)])
        row["runtime_pdl_us_per_step"] = t_pdl * 1e6
        row["runtime_pdl_fraction_of_peak_copy"] = step_bytes / t_pdl / 1e12 / peak
        row["fp16_us_per_step"] = t_16 * 1e6
        best = min((e["us_per_step"] for e in row["persistent"]
                    if not e["config"].get("NO_BARRIER") and "error" not in e), default=float("nan"))
        row["best_persistent_speedup_vs_fp16"] = t_16 * 1e6 / best
        row["best_persistent_speedup_vs_runtime_pdl"] = t_pdl * 1e6 / best
        print(f"L={length} runtime PDL chain {t_pdl * 1e6:.2f} us a step = "
              f"{row['runtime_pdl_fraction_of_peak_copy']:.0%}"
              f"; fp16 {t_16 * 1e6:.2f} us; best persistent {best:.2f} us: {t_16 * 1e6 / best:.2f}x fp16, "
              f"{t_pdl * 1e6 / best:.2f}x the runtime's PDL chain", flush=True)
        res["rows"].append(row)
    if len(lengths) >= 2:
        lo, hi = res["rows"][0], res["rows"][-1]
        for a, b in zip(lo["persistent"], hi["persistent"]):
            if "error" in a or "error" in b:
                continue
            marginal = (b["launch_us"] - a["launch_us"]) / (hi["layers"] - lo["layers"])
            b["marginal_us_per_step"] = marginal
            b["marginal_fraction_of_peak_copy"] = step_bytes / (marginal * 1e-6) / 1e12 / peak
            print(f"marginal step {b['config']}: {marginal:.2f} us = {b['marginal_fraction_of_peak_copy']:.0%}",
                  flush=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
