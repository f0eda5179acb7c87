"""The tensor-core int4 GEMV (``qcompile/runtime/triton/gemv_mma.py``, the runner's ``mma_gemv``) on its own, over
its configurations (row blocks a warp E, warps, K splits, groups loaded ahead), beside the runtime's tuned GEMV on
the same integers in the same run: correctness at four shapes (groups of 64 and 128, bias / residual, SwiGLU,
splits, PDL, determinism), then plain and PDL-chain timings at the Llama-3-8B shapes. On CPU: the packing against a
fragment-level emulation, and SASS instruction counts of the compiled loop. Layout and fragment mapping: the
module's docstring.

    python bench/triton_gemv_mma.py --emulate        # CPU: packing + fragment mapping against the reference
    python bench/triton_gemv_mma.py --sass           # CPU: compile for sm_90, count the loop's instructions
    python bench/triton_gemv_mma.py                  # GPU: correctness and timing against the runtime's GEMV
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from qcompile.runtime.triton.gemv_mma import emulate, gemv_mma_kernel, pack_mma  # noqa: E402


def _random_case(n: int, k: int, group: int = 128, seed: int = 0, bias: bool = False, act: bool = False):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.001).half()
    zero = torch.randint(0, 16, (k // group, n), generator=gen, dtype=torch.uint8)
    x = torch.randn(2 * k if act else k, generator=gen).half()
    b = torch.randn(n, generator=gen).half() if bias else None
    r = torch.randn(n, generator=gen).half() if bias else None
    w = (codes.float() - zero.float().repeat_interleave(group, 0)) * scale.float().repeat_interleave(group, 0)
    xa = x.float()
    if act:  # SwiGLU of gate | up, rounded to fp16 as the kernel feeds it
        xa = (torch.nn.functional.silu(xa[:k]) * xa[k:]).half().float()
    ref = xa @ w + (b.float() + r.float() if bias else 0.0)
    return x, codes, scale, zero, b, r, ref


def check_emulation() -> dict:
    out = {}
    for n, k, group in ((16, 256, 128), (32, 128, 128), (16, 192, 64)):
        x, codes, scale, zero, _, _, ref = _random_case(n, k, group)
        y = emulate(x, pack_mma(codes, group), scale, zero, group)
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        out[f"{n}x{k}g{group}"] = err
        print(f"emulated {n}x{k}, groups of {group}: max rel err {err:.2e}", flush=True)
        assert err < 1e-5, err
    return out


def sass_counts(cases=((128, 4, 1), (128, 4, 2), (128, 4, 4), (128, 8, 2), (64, 4, 2), (64, 4, 4))) -> list:
    from bench.triton_gemv_sass import loop_mix
    from qcompile.runtime.triton.aot_check import GEMV_MMA_TYPES, compile_one

    rows = []
    for group, warps, e in cases:
        for act in (False, True):
            consts = dict(GROUP=group, HAS_BIAS=True, HAS_RES=True, ACT_SILU_MUL=act, E=e, SPLIT_K=4, num_warps=warps,
                          PDL=True)
            st = compile_one(gemv_mma_kernel, GEMV_MMA_TYPES, consts, dict(N=4096, K=4096), warps, keep_cubin=True)
            n, mix = loop_mix(st["cubin"])
            words = group // 16 * e  # a group's words per lane
            rows.append(dict(group=group, warps=warps, E=e, silu_mul=act, regs=st["regs"], spills=st["spills"],
                             per_word=n / words, mix=dict(mix.most_common(12))))
            print(f"groups of {group}{', SwiGLU' if act else ''}, {warps} warps x {e} row blocks: {st['regs']} "
                  f"registers, {st['spills']} B spilled, {n} instructions per group loop, {n / words:.1f} per word; "
                  f"top: {', '.join(f'{k} {v}' for k, v in mix.most_common(8))}", flush=True)
    return rows


def with_words(codes, scale, zero, group: int = 128, bias=None):
    """The runtime's PackedWeight of these integers on the GPU (codes [K, N], scale / zero [K / G, N]), carrying the
    mma words packed from ``codes`` here (``pack_mma``, the layout the emulation checks)."""
    from qcompile.runtime.triton.gemv_mma import MmaWeight
    from qcompile.runtime.triton.packing import pack_from_export

    pw = pack_from_export(codes.T.contiguous().to(torch.int32), scale.T.contiguous(), zero.T.contiguous(), bits=4,
                          dtype=torch.float16, bias=bias).to("cuda")
    return replace(pw, mma=MmaWeight(pack_mma(codes, group).cuda(), zero.cuda()))


def launch(x, pw, out, e: int, warps: int, split: int, ahead: int, pdl: bool = False, res=None, act: bool = False):
    """One configuration of the mma kernel through the runtime's launcher (``gemv_mma.launch``)."""
    from qcompile.runtime.triton import gemv_mma

    gemv_mma.launch(x, pw, res, "silu_mul" if act else None, out,
                    dict(E=e, num_warps=warps, SPLIT_K=split, AHEAD=ahead), pdl=pdl)


def gpu(configs) -> dict:
    from bench.triton_kernels import SHAPES, copies_for, graph_time, peak_copy_bandwidth
    from qcompile.runtime.triton.wq_matmul import copy_weight, wq_linear

    res = {"device": torch.cuda.get_device_name(), "peak_copy": peak_copy_bandwidth(), "check": [], "rows": []}
    peak = res["peak_copy"]["tb_per_s"]
    # correctness: both group sizes, the epilogues and SwiGLU, split or not, plain and PDL launches
    for n, k, group, bias, act in ((256, 512, 128, False, False), (1008, 384, 64, True, False),
                                   (512, 1024, 128, True, True), (4096, 4096, 128, False, False)):
        x, codes, scale, zero, b, r, ref = _random_case(n, k, group, seed=1, bias=bias, act=act)
        xc = x.cuda()
        rc = r.cuda() if bias else None
        pw = with_words(codes, scale, zero, group, bias=b)
        # every configuration at the plain Llama shape (the ones timed below); a few, splits included, at the
        # others (each set of epilogue flags compiles every configuration anew: ~1.5 s each)
        some = configs if n == 4096 else [c for c in configs if c in ((1, 4, 2, 2), (2, 4, 2, 1), (4, 4, 8, 1),
                                                                       (2, 8, 16, 2), (1, 8, 4, 2))]
        for e, warps, split, ahead in some:
            for pdl in (False, True):
                out = torch.empty(n, device="cuda", dtype=torch.float16)
                launch(xc, pw, out, e, warps, split, ahead, pdl, rc, act)
                out2 = torch.empty_like(out)
                launch(xc, pw, out2, e, warps, split, ahead, pdl, rc, act)
                err = ((out.float().cpu() - ref).abs().max() / ref.abs().max()).item()
                res["check"].append({"N": n, "K": k, "group": group, "bias_res": bias, "silu_mul": act, "E": e,
                                     "warps": warps, "split": split, "ahead": ahead, "pdl": pdl, "rel_err": err,
                                     "deterministic": bool(torch.equal(out, out2))})
    bad = [c for c in res["check"] if not (c["rel_err"] < 2e-3 and c["deterministic"])]
    worst = max(c["rel_err"] for c in res["check"])
    print(f"check: {len(res['check'])} cases, worst rel err {worst:.2e}, {len(bad)} bad {bad[:3]}", flush=True)
    for n, k in SHAPES:
        x, codes, scale, zero, _, _, _ = _random_case(n, k, seed=2)
        xc = x.cuda()
        pw = with_words(codes, scale, zero)
        nbytes = pw.nbytes + 2 * k + 2 * n  # words, scales, zero points (either layout), x and the output
        # copies, so that the chains stream from HBM; the runtime's tuned GEMV on the same integers in the same run
        # reads them without the mma words (its default candidates)
        pws = [pw] + [copy_weight(pw) for _ in range(copies_for(pw.nbytes) - 1)]
        plain = [replace(p, mma=None) for p in pws]
        outs = [torch.empty(1, n, device="cuda", dtype=torch.float16) for _ in pws]
        xx = xc.view(1, k)
        wq_linear(xx, plain[0])
        wq_linear(xx, plain[0], pdl=True)
        t_rt = graph_time([lambda p=p, o=o: wq_linear(xx, p, out=o) for p, o in zip(plain, outs)])
        t_rtp = graph_time([lambda p=p, o=o: wq_linear(xx, p, out=o, pdl=True) for p, o in zip(plain, outs)])
        row = {"N": n, "K": k, "runtime_us": t_rt * 1e6, "runtime_pdl_us": t_rtp * 1e6,
               "runtime_fraction": nbytes / t_rt / 1e12 / peak, "runtime_pdl_fraction": nbytes / t_rtp / 1e12 / peak,
               "configs": []}
        print(f"{n}x{k}: runtime GEMV {t_rt * 1e6:.2f} us ({row['runtime_fraction']:.0%}), PDL chain "
              f"{t_rtp * 1e6:.2f} us ({row['runtime_pdl_fraction']:.0%})", flush=True)
        for e, warps, split, ahead in configs:
            c = {"E": e, "warps": warps, "split": split, "ahead": ahead}
            for pdl in (False, True):
                t = graph_time([lambda p=p, o=o: launch(xx, p, o, e, warps, split, ahead, pdl)
                                for p, o in zip(pws, outs)])
                tag = "pdl_" if pdl else ""
                c.update({f"{tag}us": t * 1e6, f"{tag}fraction_of_peak_copy": nbytes / t / 1e12 / peak})
            row["configs"].append(c)
        best = sorted(row["configs"], key=lambda c: c["pdl_us"])[:4]
        for c in best:
            print(f"  mma E={c['E']} warps={c['warps']} split={c['split']} ahead={c['ahead']}: {c['us']:.2f} us "
                  f"({c['fraction_of_peak_copy']:.0%}), PDL chain {c['pdl_us']:.2f} us "
                  f"({c['pdl_fraction_of_peak_copy']:.0%})", flush=True)
        res["rows"].append(row)
        del pws, plain
        torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emulate", action="store_true")
    ap.add_argument("--sass", action="store_true")
    ap.add_argument("--out", default="bench/results/triton_gemv_mma.json")
    args = ap.parse_args()
    res = {}
    if args.emulate or not torch.cuda.is_available():
        res["emulation"] = check_emulation()
    if args.sass or not torch.cuda.is_available():
        res["sass"] = sass_counts()
    if torch.cuda.is_available() and not (args.emulate or args.sass):
        # registers: two groups ahead for up to two row blocks a warp, one for four
        # (and one group a program: 32 splits at K = 4096)
        res["gpu"] = gpu([(e, w, s, a) for w in (4, 8) for e in (1, 2, 4) for s in (2, 4, 8, 16) for a in (1, 2)
                          if e * a <= 4] + [(e, w, 32, 1) for w in (4, 8) for e in (1, 2)])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
