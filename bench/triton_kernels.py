"""qcompile's Triton kernels on one GPU, every ratio from the same run (issue 7's targets).

1. peak device-to-device copy bandwidth (read + write), the reference for "effective bandwidth";
2. int4 (and int8) weight-only GEMV at Llama-3-8B shapes, batch 1: effective bandwidth (bytes the kernel must
   read / time) as a fraction of the peak copy bandwidth, and speedup over torch fp16 GEMV (cuBLAS);
2b. the decode step's small kernels at the 1.2B Llama's sizes (``step``): the argmax over 128256 logits against
   ``torch.argmax``, and the RMSNorm with and without ``digit_gemv``'s digit planes;
3. W8A8 and W4A4 GEMM (per-token activation quantization + int8 tensor cores) vs fp16 ``torch.matmul`` at M >= 1024,
   GEMM alone and with the quantization kernel included, GPU time under CUDA-graph replay for all three (the
   Python launch of the quantize + GEMM pair is reported beside it);
4. quantized-KV decode attention (int8, int4; Llama-3-8B heads: 32 query / 8 KV heads of 128) at 8k and 32k
   context vs fp16 SDPA.

Decode-sized calls take a few microseconds, less than a Python launch, and a 8-32 MB weight fits the 50 MB L2.
So each measurement captures a CUDA graph that calls the op on enough distinct copies of its operands to exceed
the L2 several times, replays it, and divides (what a decode step does: every layer reads new weights).

    python bench/triton_kernels.py --out bench/results/triton_kernels.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# a benchmark times the tuner's own picks, not those an earlier run left in the disk cache (_tune.TuningCache)
os.environ.setdefault("QCOMPILE_TUNE_CACHE", "0")

from qcompile.runtime.triton import reference as R  # noqa: E402
from qcompile.runtime.triton._tune import supports_pdl  # noqa: E402
from qcompile.runtime.triton.kv_attention import _DECODE as DECODE_TUNER  # noqa: E402
from qcompile.runtime.triton.kv_attention import KVCache, decode_attention, rope_store  # noqa: E402
from qcompile.runtime.triton.packing import pack_from_export, pack_int_gemm  # noqa: E402
from qcompile.runtime.triton.w8a8 import _GEMM as INT_TUNER  # noqa: E402
from qcompile.runtime.triton.w8a8 import _TMA as TMA_TUNER  # noqa: E402
from qcompile.runtime.triton.w8a8 import int_linear, quantize_rows, takes_tma_path  # noqa: E402
from qcompile.runtime.triton.wq_matmul import _GEMV as GEMV_TUNER  # noqa: E402
from qcompile.runtime.triton.wq_matmul import copy_weight, gemv_tuning_key, half2_gemv, wq_linear  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N out, K in): q/o_proj, gate/up_proj, down_proj
# --decode-shapes: the decode GEMVs of bench/triton_e2e.py's 1.2B Llama (hidden 2048, 32/8 heads of 64, MLP 8192):
# q|k|v, o, gate|up (the runner's digit_gemv linears) and down
DECODE_SHAPES = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)]
L2_BYTES = 50 * 2**20


def graph_time(calls, reps: int = 20) -> float:
    """Seconds per call: ``calls`` (a list of closures) captured once in a CUDA graph, replayed ``reps`` times."""
    for c in calls:  # eager warm-up: tuning, workspaces
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / (reps * len(calls)))
    del g
    return best


def copies_for(nbytes: int, factor: int = 4, cap: int = 64) -> int:
    return max(2, min(cap, math.ceil(factor * L2_BYTES / nbytes)))


def peak_copy_bandwidth() -> dict:
    out = {}
    for mib in (256, 1024):
        n = mib * 2**20 // 2
        a = torch.empty(n, dtype=torch.float16, device="cuda").normal_()
        b = torch.empty_like(a)
        t = graph_time([lambda a=a, b=b: b.copy_(a)], reps=20)
        out[f"{mib}MiB"] = 2 * a.numel() * 2 / t / 1e12
        del a, b
    torch.cuda.empty_cache()
    return {"tb_per_s": max(out.values()), "by_size_tb_per_s": out}


def random_int_weight(n, k, bits, sym, group, gen):
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    q = torch.randint(qmin, qmax + 1, (n, k), generator=gen, dtype=torch.int16)
    scale = torch.rand(n, k // group, generator=gen) * 0.02 + 1e-3
    zero = None if sym else torch.randint(0, qmax + 1, (n, k // group), generator=gen).float()
    return q, scale, zero


def fp16_gemv_time(x: torch.Tensor, n: int) -> float:
    """Seconds of torch's fp16 GEMV (cuBLAS) of ``x`` [1, K] by an [n, K] weight, over copies of the weight."""
    w16 = torch.randn(n, x.shape[-1], device="cuda", dtype=torch.float16)
    ws = [w16] + [w16.clone() for _ in range(copies_for(w16.numel() * 2, cap=16) - 1)]
    t = graph_time([lambda w=w: F.linear(x, w) for w in ws])
    del ws, w16
    torch.cuda.empty_cache()
    return t


def bench_gemv(peak: float, bits: int, group: int = 128, mma: bool = False, shapes=SHAPES) -> list[dict]:
    """``mma``: the weights also carry the tensor-core GEMV's words (the runner's ``mma_gemv``), so the tuner
    times that kernel beside the pointer GEMV and keeps the faster (int4 only)."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k in shapes:
        q, scale, zero = random_int_weight(n, k, bits, False, group, gen)
        base = pack_from_export(q, scale, zero, bits=bits, dtype=torch.float16).to("cuda")
        if mma:
            from qcompile.runtime.triton.gemv_mma import attach

            base = attach(base)
            assert base.mma is not None, "the mma GEMV needs an sm_90 GPU"
        wbytes = base.nbytes  # the bytes one call reads (the mma words replace the row-major ones, same size)
        copies = copies_for(wbytes)
        packed = [base] + [copy_weight(base) for _ in range(copies - 1)]
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        outs = [torch.empty(1, n, device="cuda", dtype=torch.float16) for _ in range(copies)]
        y = wq_linear(x, base)
        ref = R.wq_linear_ref(x.float(), base.to(dtype=torch.float32))
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        t_q = graph_time([lambda p=p, o=o: wq_linear(x, p, out=o) for p, o in zip(packed, outs)])
        # the same chain with each GEMV launched as a programmatic dependent of the one before (first weight tile
        # read before the wait; tiles tuned for such chains): how the runner's ``pdl=True`` decode step launches them
        t_pdl = (graph_time([lambda p=p, o=o: wq_linear(x, p, out=o, pdl=True) for p, o in zip(packed, outs)])
                 if supports_pdl("cuda") else None)  # sm_90+
        del packed
        t_16 = fp16_gemv_time(x, n)
        bytes_read = wbytes + x.numel() * 2 + n * 2
        bw = bytes_read / t_q / 1e12
        rows.append({
            "bits": bits, "group": group, "mma_gemv": mma, "N": n, "K": k, "us": t_q * 1e6, "effective_tb_per_s": bw,
            "fraction_of_peak_copy": bw / peak, "fp16_us": t_16 * 1e6,
            "fp16_effective_tb_per_s": (n * k * 2 + k * 2 + n * 2) / t_16 / 1e12, "speedup_vs_fp16": t_16 / t_q,
            "max_rel_err_vs_reference": err, "weight_copies": copies,
            "config": GEMV_TUNER.best.get(gemv_tuning_key(x, base)),
            "half2": half2_gemv(bits, 1, torch.float16),
            "pdl_chain_us": t_pdl and t_pdl * 1e6,
            "pdl_config": GEMV_TUNER.best.get(gemv_tuning_key(x, base, pdl=True)),
            "pdl_chain_fraction_of_peak_copy": t_pdl and bytes_read / t_pdl / 1e12 / peak,
            "pdl_chain_speedup_vs_fp16": t_pdl and t_16 / t_pdl,
        })
        pdl_note = (f"; PDL chain {t_pdl * 1e6:.2f} us = {bytes_read / t_pdl / 1e12 / peak:.0%}, "
                    f"{t_16 / t_pdl:.2f}x" if t_pdl else "")
        picks = [rows[-1]["config"], rows[-1]["pdl_config"]]
        tag = (f" (mma_gemv; tensor-core kernel picked: plain {bool(picks[0] and picks[0].get('MMA'))}, "
               f"PDL {bool(picks[1] and picks[1].get('MMA'))})" if mma else "")
        print(f"int{bits} GEMV{tag} {n}x{k}: {t_q * 1e6:.2f} us, {bw:.2f} TB/s = {bw / peak:.0%} of copy peak; "
              f"fp16 {t_16 * 1e6:.2f} us -> {t_16 / t_q:.2f}x{pdl_note}", flush=True)
    return rows


def digit_layouts(k: int, sweep: bool) -> list[tuple[int, int]]:
    """(splits, warps) to time: ``default_layout``'s, at K = 14336 also 7 slices at 4 warps; ``sweep``: also the
    fewest three slicings at 4 and at 2 warps."""
    from qcompile.runtime.triton.gemv_digits import WARPS, default_layout, default_splits, split_layouts

    out = [default_layout(k)]
    if k > 1024 * WARPS:
        out.append((default_splits(k) or 1, WARPS))
    if sweep:
        out += [(sp, w) for w in (WARPS, 2) for sp in split_layouts(k, w)[:3]]
    return list(dict.fromkeys(out))


def bench_gemv_digits(peak: float, shapes=SHAPES, sweep: bool = False) -> list[dict]:
    """The digit-plane int4 GEMV (``gemv_digits``, the runner's ``digit_gemv``), timed as the pointer GEMV's PDL
    rows are: copies of the weight, one input (its digit planes), each launch a programmatic dependent of the one
    before; bytes counted are the weight's words, scales and zero points (the same int4 bytes as the pointer
    GEMV's), the planes and the fp16 output (a split weight's fp32 partials, 8 bytes an output a slice, are not
    counted). Each shape in the layouts of ``digit_layouts``; the summary's figures are ``default_layout``'s (K =
    14336: 7 slices of 2048 at 2 warps)."""
    from dataclasses import replace

    from qcompile.runtime.triton.gemv_digits import PLANES, default_layout, digit_planes, gemv_digits, pack_digits
    from qcompile.runtime.triton.reference import unpack_words

    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k in shapes:
        q, scale, zero = random_int_weight(n, k, 4, False, 128, gen)
        base = pack_from_export(q, scale, zero, bits=4, dtype=torch.float16).to("cuda")
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        planes = digit_planes(x[0])
        ref = R.wq_linear_ref(x.float(), base.to(dtype=torch.float32))
        t_16 = fp16_gemv_time(x, n)
        codes = unpack_words(base.qweight, 4)
        for splits, warps in digit_layouts(k, sweep):
            dw = pack_digits(codes, base.scale, base.zero, warps=warps, splits=splits)
            wbytes = dw.words.numel() * 4 + dw.scale.numel() * 2 + dw.nzero.numel()
            copies = copies_for(wbytes)
            dws = [dw] + [replace(dw, words=dw.words.clone(), scale=dw.scale.clone(), nzero=dw.nzero.clone())
                          for _ in range(copies - 1)]
            err = ((gemv_digits(planes, dw, pdl=True).float() - ref).abs().max() / ref.abs().max()).item()
            t_d = graph_time([lambda d=d: gemv_digits(planes, d, pdl=True) for d in dws])
            del dws
            bytes_read = wbytes + PLANES * k + n * 2
            frac = bytes_read / t_d / 1e12 / peak
            rows.append({"N": n, "K": k, "splits": dw.splits, "warps": warps,
                         "default_layout": (splits, warps) == default_layout(k),
                         "pdl_chain_us": t_d * 1e6,
                         "pdl_chain_fraction_of_peak_copy": frac, "fp16_us": t_16 * 1e6,
                         "pdl_chain_speedup_vs_fp16": t_16 / t_d, "max_rel_err_vs_reference": err,
                         "weight_copies": copies})
            print(f"int4 digit-plane GEMV {n}x{k} ({dw.splits} slice(s), {warps} warps): PDL chain {t_d * 1e6:.2f} "
                  f"us = {frac:.0%} of copy peak; fp16 {t_16 * 1e6:.2f} us -> {t_16 / t_d:.2f}x (max rel err "
                  f"{err:.1e})", flush=True)
    return rows


def tflops(m, n, k, t):
    return 2 * m * n * k / t / 1e12


def do_bench(fn) -> float:
    from triton.testing import do_bench as tb

    fn()
    return tb(fn, warmup=25, rep=200) / 1e3


def bench_step_kernels(vocab: int = 128256, hidden: int = 2048) -> dict:
    """The decode step's small kernels at bench/triton_e2e.py's 1.2B Llama sizes, each against what it replaces,
    side by side: the argmax over one row of fp16 logits (``argmax.argmax`` vs ``torch.argmax``), and the RMSNorm of
    one fp16 row with and without the digit planes that ``digit_gemv`` reads. Operands stay in L2, as in the step
    (the logits and the row were just written); 64 calls a graph."""
    from qcompile.runtime.triton.argmax import argmax
    from qcompile.runtime.triton.norm import rms_norm

    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(vocab, generator=gen) * 4).to("cuda", torch.float16)
    out = torch.empty(1, dtype=torch.int64, device="cuda")
    assert argmax(logits, out=out).item() == torch.argmax(logits).item()
    t_ours = graph_time([lambda: argmax(logits, out=out)] * 64)
    t_torch = graph_time([lambda: torch.argmax(logits)] * 64)
    x = torch.randn(1, hidden, generator=gen).to("cuda", torch.float16)
    w = (torch.rand(hidden, generator=gen) + 0.5).to("cuda", torch.float16)
    planes = torch.zeros(8, hidden, dtype=torch.int8, device="cuda")
    t_norm = graph_time([lambda: rms_norm(x, w, 1e-5)] * 64)
    t_planes = graph_time([lambda: rms_norm(x, w, 1e-5, planes=planes)] * 64)
    res = {"vocab": vocab, "hidden": hidden, "argmax_us": t_ours * 1e6, "torch_argmax_us": t_torch * 1e6,
           "argmax_speedup_vs_torch": t_torch / t_ours, "rms_norm_us": t_norm * 1e6,
           "rms_norm_planes_us": t_planes * 1e6, "planes_cost_us": (t_planes - t_norm) * 1e6}
    print(f"argmax over {vocab} fp16 logits: {t_ours * 1e6:.2f} us, torch.argmax {t_torch * 1e6:.2f} us -> "
          f"{t_torch / t_ours:.1f}x; RMSNorm of {hidden}: {t_norm * 1e6:.2f} us, with digit planes "
          f"{t_planes * 1e6:.2f} us", flush=True)
    return res


def bench_int_gemm(ms=(1024, 2048, 4096)) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    rows = []
    for n, k in SHAPES:
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        for bits in (8, 4):
            q, scale, _ = random_int_weight(n, k, bits, True, k, gen)  # per-channel, symmetric
            pw = pack_int_gemm(q, scale, None, bits=bits).to("cuda")
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                xq, xs = quantize_rows(x, bits)
                y = int_linear(xq, xs, pw)
                ref = R.int_linear_ref(xq, xs, pw, torch.float32)
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                # GPU time (CUDA graph replays): a Python launch of these wrappers costs tens of microseconds,
                # as much as the M=1024 GEMM itself, and would time the CPU instead of the kernels
                t_gemm = graph_time([lambda: int_linear(xq, xs, pw)])
                t_full = graph_time([lambda: int_linear(*quantize_rows(x, bits), pw)])
                t_16 = graph_time([lambda w=w16: torch.matmul(x, w.t())])
                t_launch = do_bench(lambda: int_linear(*quantize_rows(x, bits), pw))
                tma = takes_tma_path(m, pw, xq)
                key = ((triton_pow2(m), n, k, False, torch.float16) if tma
                       else (triton_pow2(m), n, k, bits, pw.group_size, False))
                rows.append({
                    "weights": f"W{bits}A{bits}", "M": m, "N": n, "K": k, "gemm_us": t_gemm * 1e6,
                    "with_quant_us": t_full * 1e6, "fp16_us": t_16 * 1e6, "int_tops": tflops(m, n, k, t_gemm),
                    "fp16_tflops": tflops(m, n, k, t_16), "speedup_gemm": t_16 / t_gemm,
                    "speedup_with_quant": t_16 / t_full, "max_rel_err_vs_reference": err,
                    "with_quant_python_launch_us": t_launch * 1e6,
                    "config": (TMA_TUNER if tma else INT_TUNER).best.get(key),
                })
                rows[-1]["kernel"] = ("int_gemm" if not tma else "int8_wgmma (Gluon)"
                                      if (rows[-1]["config"] or {}).get("WGMMA") else "int8_tma")
                print(f"W{bits}A{bits} M={m} {n}x{k}: {t_gemm * 1e6:.0f} us ({tflops(m, n, k, t_gemm):.0f} TOPS), "
                      f"+quant {t_full * 1e6:.0f} us; fp16 {t_16 * 1e6:.0f} us ({tflops(m, n, k, t_16):.0f} "
                      f"TFLOPS) -> {t_16 / t_gemm:.2f}x / {t_16 / t_full:.2f}x", flush=True)
        del w16
        torch.cuda.empty_cache()
    return rows


def triton_pow2(m: int) -> int:
    return 1 << (m - 1).bit_length()


def attention_setup(length: int, nh: int = 32, nkv: int = 8, d: int = 128):
    """A decode query and, per KV width (16, 8, 4), enough layers' caches of ``length`` positions to exceed the L2,
    each layer holding the same random keys/values in all three widths. Returns (q, lens, prefix, caches)."""
    layers = copies_for(2 * nkv * length * d * 2, cap=8)
    cos, sin = _tables(length, d)
    q = torch.randn(1, nh, d, device="cuda", dtype=torch.float16)
    lens = torch.tensor([length], dtype=torch.int32, device="cuda")
    prefix = torch.zeros(1, dtype=torch.int32, device="cuda")
    caches = {b: [KVCache.allocate(1, nkv, d, length, b, dtype=torch.float16, device="cuda")
                  for _ in range(layers)] for b in (16, 8, 4)}
    for li in range(layers):
        for start in range(0, length, 8192):
            cnt = min(8192, length - start)
            qkv = torch.randn(cnt, (nh + 2 * nkv) * d, device="cuda", dtype=torch.float16)
            pos = torch.arange(start, start + cnt, dtype=torch.int32, device="cuda")
            for cs in caches.values():
                rope_store(qkv, pos, cnt, cos, sin, cs[li], prefix, nh, nkv)
    return q, lens, prefix, caches


def bench_attention(lengths=(8192, 32768)) -> list[dict]:
    nh, nkv, d = 32, 8, 128
    rows = []
    for length in lengths:
        q, lens, prefix, caches = attention_setup(length, nh, nkv, d)
        layers = len(caches[16])
        times = {b: graph_time([lambda c=c: decode_attention(q, c, lens, prefix) for c in cs])
                 for b, cs in caches.items()}
        # fp16 SDPA over the same float keys/values: GQA handled by SDPA, and with K/V pre-expanded to 32 heads
        ks = [c.k_float for c in caches[16]]
        vs = [c.v_float for c in caches[16]]
        q4 = q[:, :, None]
        t_gqa = graph_time([lambda k=k, v=v: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
                            for k, v in zip(ks, vs)])
        kx = [k.repeat_interleave(nh // nkv, 1) for k in ks[:2]]
        vx = [v.repeat_interleave(nh // nkv, 1) for v in vs[:2]]
        t_rep = graph_time([lambda k=k, v=v: F.scaled_dot_product_attention(q4, k, v) for k, v in zip(kx, vx)])
        del kx, vx
        sdpa = min(t_gqa, t_rep)
        ref = F.scaled_dot_product_attention(q4.float(), ks[0].float(), vs[0].float(), enable_gqa=True)[:, :, 0]
        errs = {b: (decode_attention(q, cs[0], lens, prefix).float() - ref).abs().max().item()
                for b, cs in caches.items()}
        row = {"context": length, "sdpa_fp16_us": sdpa * 1e6, "sdpa_gqa_us": t_gqa * 1e6,
               "sdpa_expanded_kv_us": t_rep * 1e6, "layers_rotated": layers,
               "configs": {b: DECODE_TUNER.best.get((1, nh, nkv, d, b, length, torch.float16, False))
                           for b in (16, 8, 4)}}
        for b in (16, 8, 4):
            row[f"kv{b}_us"] = times[b] * 1e6
            row[f"kv{b}_speedup_vs_sdpa"] = sdpa / times[b]
            row[f"kv{b}_max_abs_err_vs_fp32_float_cache"] = errs[b]
        rows.append(row)
        print(f"decode attention {length}: SDPA fp16 {sdpa * 1e6:.1f} us; ours fp16 {times[16] * 1e6:.1f}, int8 "
              f"{times[8] * 1e6:.1f} ({sdpa / times[8]:.2f}x), int4 {times[4] * 1e6:.1f} ({sdpa / times[4]:.2f}x)",
              flush=True)
        del caches, ks, vs
        torch.cuda.empty_cache()
    return rows


def _tables(length, d):
    inv = 1.0 / (500000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    ang = torch.arange(length, device="cuda").float()[:, None] * inv[None]
    return ang.cos().contiguous(), ang.sin().contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/triton_kernels.json")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: gemv,step,gemm,attention")
    ap.add_argument("--gemv-bits", default="4,8", help="GEMV code widths (comma-separated: 4, 8)")
    ap.add_argument("--mma-gemv", action="store_true",
                    help="also time the int4 GEMV with the tensor-core kernel among the tuner's candidates "
                         "(the runner's mma_gemv), sm_90+")
    ap.add_argument("--digit-gemv", action="store_true",
                    help="also time the digit-plane int4 GEMV (gemv_digits, the runner's digit_gemv; K = 14336 in "
                         "7 slices), sm_90+")
    ap.add_argument("--decode-shapes", action="store_true",
                    help="also time the int4 GEMVs (pointer, and with --digit-gemv the digit-plane one in every "
                         "layout of its sweep) at bench/triton_e2e.py's 1.2B Llama decode shapes")
    ap.add_argument("--jobs", type=int, default=1,
                    help="processes that compile the int4 GEMV's candidates before the tuner times them")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("triton_kernels: needs a CUDA GPU")
    import triton

    skip = set(filter(None, args.skip.split(",")))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every section: a run cut short keeps what it measured
        out.write_text(json.dumps(res, indent=2, default=str))

    t0 = time.time()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version()}
    res["peak_copy"] = peak_copy_bandwidth()
    peak = res["peak_copy"]["tb_per_s"]
    print(f"peak device-to-device copy: {peak:.2f} TB/s (read + write)", flush=True)
    if "gemv" not in skip:
        bits = [int(b) for b in args.gemv_bits.split(",")]
        if args.jobs > 1 and 4 in bits:
            from bench.triton_sweep import precompile_gemv

            precompile_gemv(torch.cuda.get_device_properties(0).multi_processor_count, False, args.jobs)
        res["gemv"] = [r for b in bits for r in bench_gemv(peak, b)]
        if args.mma_gemv:
            res["gemv"] += bench_gemv(peak, 4, mma=True)
        if args.digit_gemv:
            res["gemv_digits"] = bench_gemv_digits(peak)
        save()
        if args.decode_shapes:
            res["gemv_decode_shapes"] = bench_gemv(peak, 4, shapes=DECODE_SHAPES)
            if args.digit_gemv:
                res["gemv_digits_decode_shapes"] = bench_gemv_digits(peak, DECODE_SHAPES[:3], sweep=True)
            save()
    if "step" not in skip:
        res["step_kernels"] = bench_step_kernels()
        save()
    if "gemm" not in skip:
        res["int_gemm"] = bench_int_gemm()
        save()
    if "attention" not in skip:
        res["decode_attention"] = bench_attention()
    g4 = [r for r in res.get("gemv", []) if r["bits"] == 4 and not r["mma_gemv"]]
    g4m = [r for r in res.get("gemv", []) if r["mma_gemv"]]
    digits = [r for r in res.get("gemv_digits", []) if r["default_layout"]]
    w8 = [r for r in res.get("int_gemm", []) if r["weights"] == "W8A8"]
    w4 = [r for r in res.get("int_gemm", []) if r["weights"] == "W4A4"]
    att = {r["context"]: r for r in res.get("decode_attention", [])}
    res["targets"] = {
        "int4_gemv_min_fraction_of_peak (>= 0.75)": min((r["fraction_of_peak_copy"] for r in g4), default=None),
        "int4_gemv_min_speedup_vs_fp16 (>= 2.5)": min((r["speedup_vs_fp16"] for r in g4), default=None),
        "int4_gemv_pdl_chain_min_fraction_of_peak": min((r["pdl_chain_fraction_of_peak_copy"] or 0 for r in g4),
                                                        default=None),
        "int4_gemv_pdl_chain_min_speedup_vs_fp16": min((r["pdl_chain_speedup_vs_fp16"] or 0 for r in g4),
                                                       default=None),
        "int4_gemv_mma_pdl_chain_min_fraction_of_peak": min((r["pdl_chain_fraction_of_peak_copy"] or 0 for r in g4m),
                                                            default=None),
        "int4_gemv_mma_pdl_chain_min_speedup_vs_fp16": min((r["pdl_chain_speedup_vs_fp16"] or 0 for r in g4m),
                                                           default=None),
        # the default layout's row at every shape (default_layout: 7 slices at 2 warps a program at K = 14336)
        "int4_gemv_digits_pdl_chain_min_fraction_of_peak": min(
            (r["pdl_chain_fraction_of_peak_copy"] for r in digits), default=None),
        "int4_gemv_digits_pdl_chain_min_speedup_vs_fp16": min(
            (r["pdl_chain_speedup_vs_fp16"] for r in digits), default=None),
        "w8a8_min_speedup_gemm (>= 1.6)": min((r["speedup_gemm"] for r in w8), default=None),
        "w8a8_min_speedup_with_quant": min((r["speedup_with_quant"] for r in w8), default=None),
        "w4a4_min_speedup_gemm": min((r["speedup_gemm"] for r in w4), default=None),
        "kv8_speedup_at_32k (>= 1.5)": att.get(32768, {}).get("kv8_speedup_vs_sdpa"),
        "kv4_speedup_at_32k (>= 1.5)": att.get(32768, {}).get("kv4_speedup_vs_sdpa"),
    }
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res["targets"], indent=2))
    save()
    print(f"saved {out}")


if __name__ == "__main__":
    main()
