"""Experiment (twenty-fifth session, kept for the record at this commit): gemv_digits' variants side by side, at
4096 x 4096 in PDL chains of 8 and 32 (time a step, fraction of the copy peak, marginal step). The kernel knobs it
uses (LOAD_PLANES, X_EARLY, COPIES, SHARE3, DSRC, PACE) exist only at this commit; calls 1, 2 and 4 ran earlier
variant lists of this script (bench/results/device_2026-12-07_s25/calls.md says which)."""
import json
import os
import sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("QCOMPILE_TUNE_CACHE", "0")
from bench.triton_kernels import graph_time, peak_copy_bandwidth, random_int_weight
from qcompile.runtime.triton.gemv_chain import stack_chain
from qcompile.runtime.triton.gemv_digits import ROWS, GROUP, _digits_kernel, digit_planes, digit_sums
from qcompile.runtime.triton.packing import pack_from_export

n = 4096
peak = peak_copy_bandwidth()["tb_per_s"]
gen = torch.Generator().manual_seed(0)
weights = []
for _ in range(32):
    q, scale, zero = random_int_weight(n, n, 4, False, 128, gen)
    weights.append(pack_from_export(q, scale * 0.2, zero, bits=4, dtype=torch.float16).to("cuda"))
step_bytes = weights[0].nbytes + 4 * n
nil = torch.zeros(1, device="cuda", dtype=torch.int32)
variants = {"w4": (4, {"DSRC": 0}), "pace2": (4, {"DSRC": 0, "PACE": 2, "nil_ptr": nil}),
            "pace4": (4, {"DSRC": 0, "PACE": 4, "nil_ptr": nil}),
            "pace4_dsum": (4, {"DSRC": 1, "PACE": 4, "nil_ptr": nil}),
            "w4_nowait": (4, {"DSRC": 0, "WAIT": False}),
            "pace4_nowait": (4, {"DSRC": 0, "PACE": 4, "nil_ptr": nil, "WAIT": False})}
x = torch.randn(n, device="cuda", dtype=torch.float16)
res = {"peak": peak, "rows": {}}
launch = {}
for L in (8, 32):
    from qcompile.runtime.triton.reference import unpack_words
    from qcompile.runtime.triton.gemv_digits import pack_digits
    cw = stack_chain(weights[:L])
    dcs = {w: [pack_digits(unpack_words(cw.qweight[i], 4), cw.scale[i], cw.zero[i], warps=w) for i in range(L)]
           for w in (4, 8, 16)}
    out = torch.empty(L + 1, n, device="cuda", dtype=torch.float16)
    planes = torch.zeros(L + 1, 4, 8, n, device="cuda", dtype=torch.int8)
    for c in range(4):
        planes[0, c] = digit_planes(x)
    fbuf = torch.zeros(L + 1, 4, n // 32, device="cuda", dtype=torch.int32)
    fbuf[0] = digit_sums(planes[0, 0])
    def run(v):
        w, kw = v
        for layer, dw in enumerate(dcs[w]):
            _digits_kernel[(n // ROWS,)](dw.words, dw.scale, dw.nzero, planes[layer], planes[layer + 1],
                                         out[layer + 1], fbuf[layer], fbuf[layer + 1], K=n,
                                         LEV_W=(n // (GROUP * w)).bit_length() - 1,
                                         num_warps=w, PDL=True, launch_pdl=True, **kw)
    for name, kw in variants.items():
        t = graph_time([lambda kw=kw: run(kw)])
        launch[(name, L)] = t
        print(f"L={L} {name}: {t / L * 1e6:.2f} us a step = {step_bytes / (t / L) / 1e12 / peak:.0%}", flush=True)
    run(variants["w4"])
    torch.cuda.synchronize()
    ref = out.clone().float()
    for name in ("pace2", "pace4", "pace4_dsum"):
        fbuf[1:] = -7
        run(variants[name])
        torch.cuda.synchronize()
        d = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        fs_ok = all(torch.equal(fbuf[i], digit_sums(planes[i, 0])) for i in range(L + 1))
        print(name, f"bitwise equal to w4: {torch.equal(out.float(), ref)}, max rel diff {d:.1e}, sums ok {fs_ok}",
              flush=True)
for name in variants:
    m = (launch[(name, 32)] - launch[(name, 8)]) / 24
    res["rows"][name] = {"l8": launch[(name, 8)] / 8 * 1e6, "l32": launch[(name, 32)] / 32 * 1e6, "marginal": m * 1e6,
                         "frac_marginal": step_bytes / m / 1e12 / peak}
    print(f"marginal {name}: {m * 1e6:.2f} us = {step_bytes / m / 1e12 / peak:.0%}", flush=True)
Path(os.environ.get("OUT", "/tmp")).joinpath("sweep.json").write_text(json.dumps(res, indent=1))
