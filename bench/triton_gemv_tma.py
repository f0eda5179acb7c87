"""The TMA-streamed int4 GEMV (``gemv_tma``) against the runtime's pointer-based GEMV, same run.

1. correctness: every configuration timed below, plus bias / residual / SwiGLU / symmetric weights / PDL at one
   configuration, against the fp32 reference (``reference.wq_linear_ref``);
2. timing as in ``triton_kernels.py``: CUDA-graph replays over enough weight copies to stream from HBM; each
   configuration as plain launches and the best few as programmatic dependent launches (``PDL``), beside the
   runtime's tuned GEMV (plain and PDL) and fp16 cuBLAS, as fractions of the peak copy bandwidth of the same run.

    python bench/triton_gemv_tma.py --out bench/results/triton_gemv_tma.json [--shapes 4096x4096,...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.triton_kernels import SHAPES, copies_for, graph_time, peak_copy_bandwidth, random_int_weight  # noqa: E402
from qcompile.runtime.triton import gemv_tma  # noqa: E402
from qcompile.runtime.triton import reference as R  # noqa: E402
from qcompile.runtime.triton.packing import pack_from_export  # noqa: E402
from qcompile.runtime.triton.wq_matmul import _GEMV as GEMV_TUNER  # noqa: E402
from qcompile.runtime.triton.wq_matmul import _Workspace, gemv_tuning_key, wq_linear  # noqa: E402


def configs(n: int, k: int, group: int = 128, sms: int = 132) -> list[dict]:
    """Tiles x pipeline depth x split for three variants: the runtime's per-word decode (``dot8``), row pairs with
    the scale per group (``PAIRS``), and row pairs with the activations paired once into shared memory
    (``XSMEM``). Depth: as many stages as fit 100 KB (two programs a multiprocessor) or 200 KB (one); split: the
    one whose program count is closest to what the multiprocessors hold."""
    out = []
    n_groups = k // group
    for pairs, xsmem in ((False, False), (True, False), (True, True)):
        for bn in (32, 64, 128):
            for gt in (2, 4, 8):
                for warps in (4, 8):
                    wn = min(warps, bn // 32)
                    wg = warps // wn
                    if wg > gt or n % 16 or gt * (group // 8) * bn > 32 * 32 * warps:  # <= 32 words a thread
                        continue
                    stage = gt * (group // 8) * bn * 4 + gt * bn * 3
                    bands = -(-n // bn)
                    for budget in (100_000, 200_000):
                        splits = [s for s in (1, 2, 4, 8, 16) if n_groups // s >= gt]
                        split = splits[0]
                        for _ in range(2):  # the x planes' size depends on the split, the split on the programs
                            x_bytes = (-(-n_groups // split) // gt + 1) * gt * (group // 8) * 16 if xsmem else 0
                            stages = max(2, min(8, (budget - x_bytes) // stage))
                            cpsm = max(1, 220_000 // (stages * stage + x_bytes + 1024))
                            want = sms * cpsm
                            split = min(splits, key=lambda s: abs(math.log2(bands * s / want)))
                        if stages * stage + x_bytes > 225_000:
                            continue
                        cfg = dict(PAIRS=pairs, XSMEM=xsmem, BN=bn, GT=gt, num_warps=warps, WARPS_G=wg,
                                   STAGES=stages, SPLIT_K=split)
                        if cfg not in out:
                            out.append(cfg)
    return out


def resident_configs(n: int, k: int, group: int = 128, sms: int = 132) -> list[dict]:
    """Configurations whose shared memory lets programs of consecutive GEMVs sit on one multiprocessor together
    (at most ~74 KB: three a multiprocessor, or ~110 KB: two), each with as many stages as its split has tiles
    where that fits (the whole slice requested before a PDL launch's wait) and a ring of what fits otherwise.
    With PDL the next GEMV's programs start while this one's still run, and stream their slices during its
    decode: the chain's per-kernel cost is then the decode after the wait, not the reads."""
    out = []
    n_groups = k // group
    for pairs, xsmem in ((True, False), (True, True)):  # (row pairs won every shape in the first sweep)
        for bn in (32, 64, 128):
            for gt in (2, 4, 8):
                for warps in (4, 8, 16):
                    wn = min(warps, bn // 32)
                    wg = warps // wn
                    if wg > gt or n % 16 or gt * (group // 8) * bn > 32 * 32 * warps:
                        continue
                    stage = gt * (group // 8) * bn * 4 + gt * bn * 3
                    for split in (1, 2, 4):
                        tiles = -(-(-(-n_groups // split)) // gt)
                        programs = -(-n // bn) * split
                        if n_groups // split < gt or programs > 4 * sms:
                            continue
                        x_bytes = (tiles + 1) * gt * (group // 8) * 16 if xsmem else 0
                        for budget in (74_000, 110_000):
                            stages = min(tiles, (budget - x_bytes - 1024) // stage)
                            if stages < 2 and tiles > 1 or stages < 1:
                                continue
                            cfg = dict(PAIRS=pairs, XSMEM=xsmem, BN=bn, GT=gt, num_warps=warps, WARPS_G=wg,
                                       STAGES=stages, SPLIT_K=split)
                            if cfg not in out:
                                out.append(cfg)
    return out


def label(cfg) -> str:
    kind = ("pairs+xsmem" if cfg.get("XSMEM") else "pairs") if cfg["PAIRS"] else "dot8"
    return (f"{kind} bn{cfg['BN']} gt{cfg['GT']} w{cfg['num_warps']}/g{cfg['WARPS_G']}"
            f" st{cfg['STAGES']} sk{cfg['SPLIT_K']}")


def run_tma(x, pw, out, cfg, pdl=False, res=None, act=None):
    part, lock = _Workspace.get(x.device, cfg["SPLIT_K"] * pw.out_features, -(-pw.out_features // cfg["BN"]))
    gemv_tma.launch(x, pw, res, act, out, part, lock, cfg, pdl=pdl)
    return out


def make_weight(n, k, sym=False, bias=False, group=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, scale, zero = random_int_weight(n, k, 4, sym, group, gen)
    b = torch.randn(n, generator=gen) if bias else None
    return pack_from_export(q, scale, None if sym else zero, bits=4, bias=b, dtype=torch.float16).to("cuda")


def _compile(args):
    """Worker: launch each configuration once (compiles it into Triton's disk cache)."""
    n, k, cfgs = args
    pw = make_weight(n, k)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    out = torch.empty(1, n, device="cuda", dtype=torch.float16)
    errs = []
    for cfg, pdl in cfgs:
        try:
            run_tma(x, pw, out, cfg, pdl=pdl)
        except Exception as e:  # noqa: BLE001
            errs.append((label(cfg), repr(e)[:300]))
    torch.cuda.synchronize()
    return errs


def rel_err(y, ref) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def check(shapes) -> list[dict]:
    rows = []
    for n, k in shapes:
        pw = make_weight(n, k)
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        ref = R.wq_linear_ref(x.float(), pw.to(dtype=torch.float32))
        ours = wq_linear(x, pw).float()
        for cfg in configs(n, k):
            out = torch.empty(1, n, device="cuda", dtype=torch.float16)
            y = run_tma(x, pw, out, cfg)
            y2 = run_tma(x, pw, torch.empty_like(out), cfg)
            rows.append({"N": n, "K": k, "config": label(cfg), "rel_err": rel_err(y, ref),
                         "runtime_rel_err": rel_err(ours, ref), "deterministic": bool(torch.equal(y, y2))})
    # the epilogues and the other inputs at one shape, both decodes
    n, k = 1024, 2048
    for pairs, xsmem in ((False, False), (True, False), (True, True)):
        cfg = dict(PAIRS=pairs, XSMEM=xsmem, BN=64, GT=4, num_warps=4, WARPS_G=2, STAGES=3, SPLIT_K=2)
        for case in ("sym", "bias_res", "silu_mul", "pdl", "big_x", "partial_band"):
            nn = 1008 if case == "partial_band" else n  # N not a multiple of the band (still of 16)
            pw = make_weight(nn, k, sym=case == "sym", bias=case == "bias_res", seed=1)
            xk = 2 * k if case == "silu_mul" else k
            x = torch.randn(1, xk, device="cuda", dtype=torch.float16)
            if case == "big_x":
                x = x * 2000  # activations of a few thousand: the 1/32 pre-scale must keep half2 sums finite
            res = torch.randn(1, nn, device="cuda", dtype=torch.float16) if case == "bias_res" else None
            act = "silu_mul" if case == "silu_mul" else None
            ref = R.wq_linear_ref(x.float(), pw.to(dtype=torch.float32), residual=None if res is None else res.float(),
                                  act=act)
            y = run_tma(x, pw, torch.empty(1, nn, device="cuda", dtype=torch.float16), cfg, pdl=case == "pdl",
                        res=res, act=act)
            rows.append({"N": nn, "K": k, "config": label(cfg), "case": case, "rel_err": rel_err(y, ref),
                         "finite": bool(torch.isfinite(y).all())})
    return rows


def bench(shapes, peak: float, top: int) -> list[dict]:
    rows = []
    for n, k in shapes:
        base = make_weight(n, k)
        copies = copies_for(base.nbytes)
        packed = [base] + [replace(base, qweight=base.qweight.clone(), scale=base.scale.clone(),
                                   zero=base.zero.clone()) for _ in range(copies - 1)]
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        outs = [torch.empty(1, n, device="cuda", dtype=torch.float16) for _ in range(copies)]
        bytes_read = base.nbytes + k * 2 + n * 2
        frac = lambda t: bytes_read / t / 1e12 / peak  # noqa: E731
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16)
        ws = [w16] + [w16.clone() for _ in range(copies_for(w16.numel() * 2, cap=16) - 1)]
        t16 = graph_time([lambda w=w: F.linear(x, w) for w in ws])
        del ws, w16
        t_rt = graph_time([lambda p=p, o=o: wq_linear(x, p, out=o) for p, o in zip(packed, outs)])
        t_rt_pdl = graph_time([lambda p=p, o=o: wq_linear(x, p, out=o, pdl=True) for p, o in zip(packed, outs)])
        rt_cfg = GEMV_TUNER.best.get(gemv_tuning_key(x, packed[0]))
        print(f"{n}x{k}: fp16 {t16 * 1e6:.2f} us; runtime GEMV {t_rt * 1e6:.2f} us ({frac(t_rt):.0%}, "
              f"{t16 / t_rt:.2f}x), PDL chain {t_rt_pdl * 1e6:.2f} us ({frac(t_rt_pdl):.0%}, {t16 / t_rt_pdl:.2f}x); "
              f"pick {rt_cfg}", flush=True)
        row = {"N": n, "K": k, "fp16_us": t16 * 1e6, "runtime_us": t_rt * 1e6, "runtime_pdl_us": t_rt_pdl * 1e6,
               "runtime_config": rt_cfg, "bytes_read": bytes_read, "configs": []}
        for cfg in configs(n, k):
            try:
                t = graph_time([lambda p=p, o=o, c=cfg: run_tma(x, p, o, c) for p, o in zip(packed, outs)])
            except Exception as e:  # noqa: BLE001
                row["configs"].append({"config": cfg, "error": repr(e)[:300]})
                print(f"  {label(cfg)}: {repr(e)[:200]}", flush=True)
                continue
            row["configs"].append({"config": cfg, "label": label(cfg), "us": t * 1e6, "fraction": frac(t),
                                   "speedup_vs_fp16": t16 / t})
        ok = sorted((c for c in row["configs"] if "us" in c), key=lambda c: c["us"])
        for c in ok[:top]:
            cfg = c["config"]
            t = graph_time([lambda p=p, o=o, c=cfg: run_tma(x, p, o, c, pdl=True) for p, o in zip(packed, outs)])
            c.update(pdl_us=t * 1e6, pdl_fraction=frac(t), pdl_speedup_vs_fp16=t16 / t)
        for c in ok[: 2 * top]:
            pdl = (f"; PDL {c['pdl_us']:.2f} us ({c['pdl_fraction']:.0%}, {c['pdl_speedup_vs_fp16']:.2f}x)"
                   if "pdl_us" in c else "")
            print(f"  {c['label']}: {c['us']:.2f} us ({c['fraction']:.0%}, {c['speedup_vs_fp16']:.2f}x){pdl}",
                  flush=True)
        rows.append(row)
        del packed
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/triton_gemv_tma.json")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--top", type=int, default=6, help="how many of the best plain configurations to time as PDL")
    ap.add_argument("--resident", action="store_true",
                    help="time resident_configs (co-resident programs, whole slices before the wait), all as PDL")
    ap.add_argument("--skip", default="", help="check,bench")
    ap.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1), help="parallel compile workers")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    global configs
    if args.resident:
        configs, args.top = resident_configs, 10_000
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    t0 = time.time()
    work = []
    for n, k in shapes:
        cfgs = configs(n, k)
        for i in range(args.jobs):
            work.append((n, k, [(c, pdl) for c in cfgs[i :: args.jobs] for pdl in (False, True)]))
    if args.jobs > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as ex:
            errs = [e for r in ex.map(_compile, work) for e in r]
    else:
        errs = [e for w in work for e in _compile(w)]
    res["compile_errors"] = errs
    print(f"compiled in {time.time() - t0:.0f} s; {len(errs)} errors {errs[:3]}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if "check" not in args.skip:
        res["check"] = check(shapes)
        bad = [r for r in res["check"] if not (r["rel_err"] < 2e-2 and r.get("deterministic", True)
                                               and r.get("finite", True))]
        worst = max(r["rel_err"] for r in res["check"])
        print(f"check: {len(res['check'])} cases, worst rel err {worst:.2e}, {len(bad)} bad: {bad[:4]}", flush=True)
        out.write_text(json.dumps(res, indent=1, default=str))
    res["peak_copy"] = peak_copy_bandwidth()
    peak = res["peak_copy"]["tb_per_s"]
    print(f"peak copy {peak:.2f} TB/s", flush=True)
    if "bench" not in args.skip:
        res["bench"] = bench(shapes, peak, args.top)
    out.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
