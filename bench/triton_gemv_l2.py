"""The int4 GEMV as PDL chains with its slice of weights asked of L2 before the wait (``L2PF``), every tile.

A programmatic dependent GEMV may read its weights before waiting for the kernel before (they are constants), but
holding a whole slice in registers or shared memory until the activations arrive keeps the next kernel's programs
off the multiprocessor (eighteenth session: a resident kernel, 6.1 µs a step at 4096 x 4096). ``L2PF`` holds
nothing: before the wait each program issues ``cp.async.bulk.prefetch.L2`` for the rest of its slice (words, scales,
zero points), so the slice streams from HBM into L2 during the kernel before, and after the wait the GEMV's loop
reads it from L2. This script times every tuner candidate of the runtime's GEMV at the Llama-3-8B shapes as PDL
chains with and without ``L2PF`` (the outputs must be bit-identical: the same arithmetic), beside the tuned default
and the copy peak of the same run; ``--mma`` the same for the tensor-core GEMV's candidates.

    python bench/triton_gemv_l2.py --out bench/results/triton_gemv_l2.json
    python bench/triton_gemv_l2.py --mma --out bench/results/triton_gemv_l2_mma.json
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

from bench.triton_kernels import SHAPES, copies_for, graph_time, peak_copy_bandwidth, random_int_weight  # noqa: E402
from qcompile.runtime.triton import gemv_mma  # noqa: E402
from qcompile.runtime.triton._tune import num_sms  # noqa: E402
from qcompile.runtime.triton.packing import pack_from_export  # noqa: E402
from qcompile.runtime.triton.wq_matmul import copy_weight, gemv_candidates, wq_linear  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/triton_gemv_l2.json")
    ap.add_argument("--shapes", default="all", help="'all' or e.g. 4096x4096 (N x K)")
    ap.add_argument("--mma", action="store_true",
                    help="the tensor-core GEMV's candidates instead (weights carrying its words, gemv_mma.attach)")
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "peak_copy": peak_copy_bandwidth(), "mma": args.mma, "shapes": []}
    peak = res["peak_copy"]["tb_per_s"]
    print(f"peak copy {peak:.2f} TB/s", flush=True)
    shapes = SHAPES if args.shapes == "all" else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    gen = torch.Generator().manual_seed(0)
    for n, k in shapes:
        q, scale, zero = random_int_weight(n, k, 4, False, 128, gen)
        base = pack_from_export(q, scale, zero, bits=4, dtype=torch.float16).to("cuda")
        if args.mma:
            base = gemv_mma.attach(base)
        packed = [base] + [copy_weight(base) for _ in range(copies_for(base.nbytes) - 1)]
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        outs = [torch.empty(1, n, device="cuda", dtype=torch.float16) for _ in packed]
        nbytes = base.nbytes + 2 * k + 2 * n

        def chain(cfg, packed=packed, outs=outs):
            return graph_time([lambda p=p, o=o: wq_linear(x, p, out=o, config=cfg, pdl=True)
                               for p, o in zip(packed, outs)])

        t_tuned = graph_time([lambda p=p, o=o: wq_linear(x, p, out=o, pdl=True) for p, o in zip(packed, outs)])
        shape = {"N": n, "K": k, "tuned_pdl_us": t_tuned * 1e6, "tuned_pdl_fraction": nbytes / t_tuned / 1e12 / peak,
                 "configs": []}
        print(f"{n}x{k}: tuned PDL chain {t_tuned * 1e6:.2f} us ({shape['tuned_pdl_fraction']:.0%})", flush=True)
        cands = (gemv_mma.candidates(n, num_sms(x.device)) if args.mma
                 else gemv_candidates(1, n, k, 4, num_sms(x.device)))
        for cfg in cands:
            l2 = dict(cfg, L2PF=True) if args.mma else dict(cfg, L2PF=True, PF_ROWS=32 * cfg["num_warps"])
            y0 = wq_linear(x, base, config=cfg, pdl=True)
            y1 = wq_linear(x, base, config=l2, pdl=True)
            row = {"config": cfg, "identical": bool(torch.equal(y0, y1))}
            for tag, c in (("plain_tile", cfg), ("l2pf", l2)):
                t = chain(c)
                row[f"{tag}_us"] = t * 1e6
                row[f"{tag}_fraction"] = nbytes / t / 1e12 / peak
            shape["configs"].append(row)
            print(f"  {cfg}: PDL {row['plain_tile_us']:.2f} us ({row['plain_tile_fraction']:.0%}), with L2PF "
                  f"{row['l2pf_us']:.2f} us ({row['l2pf_fraction']:.0%}), identical {row['identical']}", flush=True)
        best = min(shape["configs"], key=lambda r: r["l2pf_us"])
        shape["best_l2pf"] = best
        print(f"{n}x{k}: best with L2PF {best['l2pf_us']:.2f} us ({best['l2pf_fraction']:.0%}) {best['config']}; "
              f"75 % of peak needs {nbytes / (0.75 * peak * 1e12) * 1e6:.2f} us", flush=True)
        res["shapes"].append(shape)
        del packed
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
