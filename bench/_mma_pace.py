"""Experiment (twenty-fifth session): the tensor-core GEMV's second pre-wait group paced (PACE) vs not, as PDL
chains at the Llama-3-8B shapes, beside the runtime's tuned PDL chain in the same run."""
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("QCOMPILE_TUNE_CACHE", "0")
from bench.triton_gemv_mma import _random_case, launch, with_words  # noqa: E402
from bench.triton_kernels import SHAPES, copies_for, graph_time, peak_copy_bandwidth  # noqa: E402
from qcompile.runtime.triton.wq_matmul import copy_weight, wq_linear  # noqa: E402

peak = peak_copy_bandwidth()["tb_per_s"]
print(f"peak copy {peak:.2f} TB/s", flush=True)
cfgs = [(e, w, s, 2, p) for e in (1, 2) for w in (4, 8) for s in (4, 8, 16) for p in (False, True)]
cfgs += [(2, 4, 16, 1, False), (2, 8, 4, 1, False), (1, 8, 16, 1, False), (4, 4, 8, 1, False), (2, 4, 8, 1, False)]
res = {"peak": peak, "rows": []}
for n, k in SHAPES:
    x, codes, scale, zero, _, _, _ = _random_case(n, k, seed=2)
    pw = with_words(codes, scale, zero)
    nbytes = pw.nbytes + 2 * k + 2 * n
    pws = [pw] + [copy_weight(pw) for _ in range(copies_for(pw.nbytes) - 1)]
    plain = [replace(p, mma=None) for p in pws]
    outs = [torch.empty(1, n, device="cuda", dtype=torch.float16) for _ in pws]
    xx = x.cuda().view(1, k)
    wq_linear(xx, plain[0], pdl=True)
    t_rtp = graph_time([lambda p=p, o=o: wq_linear(xx, p, out=o, pdl=True) for p, o in zip(plain, outs)])
    row = {"N": n, "K": k, "runtime_pdl_us": t_rtp * 1e6, "configs": []}
    print(f"{n}x{k}: runtime PDL chain {t_rtp * 1e6:.2f} us ({nbytes / t_rtp / 1e12 / peak:.1%})", flush=True)
    for e, w, s, a, p in cfgs:
        o1 = torch.empty(1, n, device="cuda", dtype=torch.float16)
        launch(xx, pw, o1, e, w, s, a, True, pace=p)
        o0 = torch.empty_like(o1)
        launch(xx, pw, o0, e, w, s, a, True, pace=False)
        t = graph_time([lambda q=q, o=o: launch(xx, q, o, e, w, s, a, True, pace=p) for q, o in zip(pws, outs)])
        c = {"E": e, "warps": w, "split": s, "ahead": a, "pace": p, "pdl_us": t * 1e6,
             "fraction": nbytes / t / 1e12 / peak, "same_bits_as_unpaced": bool(torch.equal(o0, o1))}
        row["configs"].append(c)
        print(f"  E={e} w={w} split={s} ahead={a} pace={p}: {t * 1e6:.2f} us ({c['fraction']:.1%}) "
              f"same bits {c['same_bits_as_unpaced']}", flush=True)
    best = min(row["configs"], key=lambda c: c["pdl_us"])
    print(f"  best: {best}", flush=True)
    res["rows"].append(row)
    del pws, plain
    torch.cuda.empty_cache()
Path(os.environ.get("OUT", "/tmp")).joinpath("mma_pace.json").write_text(json.dumps(res, indent=1))
