"""Every tuning candidate of qcompile's decode-critical Triton kernels, timed the way the benchmarks time them.

`bench/triton_kernels.py` reports what the runtime's tuner picks; this script shows what each candidate
configuration costs, in the same run, so the candidate lists and the tuner's choices can be checked:

1. int4 GEMV, batch 1, fp16 activations, groups of 128 (Llama-3-8B shapes): the half2 decode path (``HALF2``,
   ``wq_matmul._dot8_half2``), each tuner candidate launched plainly and with its first weight tile peeled off the
   loop and read before a programmatic dependent launch's wait (``PREFETCH`` + ``PDL``); wide programs beyond the
   tuner's (``WIDE_GEMV_TILES``: 8-16 warps, long K runs, few splits); and the weights stored in column bands
   (``BAND``), each as a fraction of the peak copy bandwidth measured in the same run;
2. W8A8 GEMM, per-channel weights: the runtime's default (the TMA kernel ``w8a8._int8_tma_kernel`` at M >= 128)
   and its tuner's pick, the pointer-based kernel's tiles, and variants of the TMA kernel the runtime does not
   use (``_w8a8_tma_kernel`` below: warp specialization, a TMA store of the output, other tile orders), vs fp16
   ``torch.matmul``;
3. quantized-KV decode attention (int8, int4) at 8k and 32k: block size x split count x warps/stages, and four
   launch variants (unpadded query rows ``GP``, an 8-warp combine ``COMBINE_WARPS``, int8 Q.K ``QK_I8``,
   both kernels as programmatic dependent launches ``PDL``); the tuner offers all but ``QK_I8``;
4. ``attention_focus``: the tuner's pick at the longest context, and one change at a time around it (the split
   combine in column chunks ``COMBINE_DC``, pipelining depth, split counts, block size);
5. ``gemm_focus``: the runtime's W8A8 path at M = 1024 and 2048, every candidate of its tuner (the Triton TMA
   kernel and the Gluon wgmma kernel) and the pick, vs fp16 ``torch.matmul``.

Timing as in `triton_kernels.py`: CUDA-graph replays over enough copies of the operands (weights, caches) to
stream from HBM rather than L2.

    python bench/triton_sweep.py --out bench/results/triton_sweep.json
        [--skip gemv,gemm,attention,attention_focus,gemm_focus]
        [--contexts 8192,32768] [--kv-bits 8,4]     # attention: which context lengths and KV widths
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.triton_kernels import (  # noqa: E402
    SHAPES,
    attention_setup,
    copies_for,
    graph_time,
    peak_copy_bandwidth,
    random_int_weight,
)
from qcompile.runtime.triton import reference as R  # noqa: E402
from qcompile.runtime.triton.kv_attention import _DECODE as DECODE_TUNER  # noqa: E402
from qcompile.runtime.triton.kv_attention import (  # noqa: E402
    decode_attention,
    decode_candidates,
    default_splits,
)
from qcompile.runtime.triton.packing import column_bands, pack_from_export, pack_int_gemm  # noqa: E402
from qcompile.runtime.triton.w8a8 import _GEMM as INT_TUNER  # noqa: E402
from qcompile.runtime.triton.w8a8 import _TMA as TMA_TUNER  # noqa: E402
from qcompile.runtime.triton.w8a8 import int_linear, quantize_rows, takes_tma_path  # noqa: E402
from qcompile.runtime.triton.wq_matmul import _GEMV as GEMV_TUNER  # noqa: E402
from qcompile.runtime.triton.wq_matmul import copy_weight, gemv_candidates, gemv_tuning_key, wq_linear  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from qcompile.runtime.triton._jit import grouped_tile  # noqa: E402


def _time_or_error(calls) -> tuple[float | None, str | None]:
    try:
        return graph_time(calls), None
    except Exception as e:  # a configuration the compiler or the device rejects
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {str(e)[:200]}"


# -- 1. GEMV -------------------------------------------------------------------------------------------------


# launch variants of the half2 path timed for every GEMV configuration, each with the per-word decode and with
# row pairs (``PAIRS``: two words of a column per decode, the scale applied per group in fp32); the float path, the
# PDL-alone and PREFETCH-alone launches, register double buffering and L2 prefetching were timed in earlier
# sessions (docs/BENCHMARKS.md) and lost to these
GEMV_VARIANTS = ({}, {"PDL": True, "PREFETCH": True}, {"PAIRS": True}, {"PAIRS": True, "PDL": True, "PREFETCH": True})


WIDE_GEMV_TILES = [(bn, br, warps, split) for bn in (32, 64) for br in (64, 128, 256) for warps in (8, 16)
                   for split in (1, 2, 4)]


def gemv_tile_fits(k: int, bn: int, br: int, warps: int, split: int) -> bool:
    """At most 32 words a thread, and no split past twice the word rows."""
    return bn * br <= 32 * 32 * warps and br * split <= k // 8 * 2


def _gemv_configs(n: int, k: int, sms: int, wide: bool) -> list[dict]:
    """The plain-layout configurations ``sweep_gemv`` times at one shape (column bands aside)."""
    out = [dict(cfg, **extra) for extra in GEMV_VARIANTS for cfg in gemv_candidates(1, n, k, 4, sms)]
    for bn, br, warps, split in WIDE_GEMV_TILES if wide else ():
        if gemv_tile_fits(k, bn, br, warps, split):
            for pairs in ({}, {"PAIRS": True}):
                out.append(dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_R=br, SPLIT_K=split, num_warps=warps, num_stages=2,
                                **pairs))
    return out


def _compile_gemv(job) -> int:
    """Worker: launch each configuration once at one shape, which compiles it into Triton's disk cache."""
    n, k, cfgs = job
    gen = torch.Generator().manual_seed(0)
    q, scale, zero = random_int_weight(n, k, 4, False, 128, gen)
    pw = pack_from_export(q, scale, zero, bits=4, dtype=torch.float16).to("cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    failed = 0
    for cfg in cfgs:
        try:
            wq_linear(x, pw, config=dict(cfg, HALF2=True))
        except Exception:  # noqa: BLE001 (timed, and reported, by the sweep itself)
            failed += 1
    torch.cuda.synchronize()
    return failed


def precompile_gemv(sms: int, wide: bool, jobs: int) -> None:
    """Compile the sweep's GEMV configurations in ``jobs`` processes first: one process compiles one at a time,
    about 1.5 s each, and the sweep holds a few hundred."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    work = []
    for n, k in SHAPES:
        cfgs = _gemv_configs(n, k, sms, wide)
        work += [(n, k, cfgs[i::jobs]) for i in range(jobs)]
    t0 = time.time()
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
        failed = sum(ex.map(_compile_gemv, work))
    print(f"gemv: {sum(len(w[2]) for w in work)} configurations compiled in {time.time() - t0:.0f} s "
          f"({failed} failed)", flush=True)


def sweep_gemv(peak: float, group: int = 128, bands=(32, 64), wide: bool = True, jobs: int = 1) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if jobs > 1:
        precompile_gemv(sms, wide, jobs)
    rows = []
    for n, k in SHAPES:
        q, scale, zero = random_int_weight(n, k, 4, False, group, gen)
        base = pack_from_export(q, scale, zero, bits=4, dtype=torch.float16).to("cuda")
        copies = copies_for(base.nbytes)
        packed = [base] + [copy_weight(base) for _ in range(copies - 1)]
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        outs = [torch.empty(1, n, device="cuda", dtype=torch.float16) for _ in range(copies)]
        ref = R.wq_linear_ref(x.float(), base.to(dtype=torch.float32))
        bytes_read = base.nbytes + k * 2 + n * 2
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16)
        ws = [w16] + [w16.clone() for _ in range(copies_for(w16.numel() * 2, cap=16) - 1)]
        t16 = graph_time([lambda w=w: F.linear(x, w) for w in ws])
        del ws, w16

        def time_one(cfg, weights, **tags):
            """One configuration over ``weights`` (the copies) on the half2 path, its error on the first, a row."""
            c = dict(cfg, HALF2=True)
            t, fail = _time_or_error([lambda p=p, o=o: wq_linear(x, p, out=o, config=c)
                                      for p, o in zip(weights, outs)])
            err = None
            if t:
                y = wq_linear(x, weights[0], config=c)
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            row = {"N": n, "K": k, "half2": True, "config": cfg, **tags, "max_rel_err": err, "error": fail}
            if t:
                bw = bytes_read / t / 1e12
                row.update(us=t * 1e6, fraction_of_peak_copy=bw / peak, speedup_vs_fp16=t16 / t)
            rows.append(row)
            print(f"gemv {n}x{k} {' '.join(tags)} {cfg}: "
                  + (f"{t * 1e6:.2f} us, {bw / peak:.0%} of peak, {t16 / t:.2f}x fp16" if t else fail)
                  + f", err {err}", flush=True)

        # every candidate, plainly and as a programmatic dependent launch (PDL: each GEMV's launch overlaps the
        # previous one's tail in the graph's chain) with the first weight tile peeled off the loop (PREFETCH: read,
        # and the next kernel released, before the wait for the kernel before)
        # and wide programs: many warps over a narrow column band and a long run of K rows, few or no K splits (the
        # split-K tail shrinks or goes; the warps' partial sums meet in shared memory instead of the workspace)
        n_plain = len(GEMV_VARIANTS) * len(gemv_candidates(1, n, k, 4, sms))
        for i, cfg in enumerate(_gemv_configs(n, k, sms, wide)):
            time_one(cfg, packed, **({"wide": True} if i >= n_plain else {}))
        # column bands: the same words stored [N / BAND, K / 8, BAND], so that a program of BLOCK_N = BAND columns
        # reads one contiguous run of memory instead of a BAND-word piece of every row
        for band in bands:
            banded = [column_bands(p, band) for p in packed]
            tiles = [(c["BLOCK_N"], c["BLOCK_R"], c["num_warps"], c["SPLIT_K"])
                     for c in gemv_candidates(1, n, k, 4, sms)]
            for bn, br, warps, split in dict.fromkeys(tiles + WIDE_GEMV_TILES):  # (wide tiles are candidates too)
                if bn != band or not gemv_tile_fits(k, bn, br, warps, split):
                    continue
                for extra in GEMV_VARIANTS[:2]:  # (row pairs read row-major words)
                    time_one(dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_R=br, SPLIT_K=split, num_warps=warps, num_stages=2,
                                  BAND=band, **extra), banded, banded=band)
            del banded
        GEMV_TUNER.best.clear()
        wq_linear(x, base)  # the runtime's own pick
        pick = GEMV_TUNER.best.get(gemv_tuning_key(x, base))
        t = graph_time([lambda p=p, o=o: wq_linear(x, p, out=o) for p, o in zip(packed, outs)])
        rows.append({"N": n, "K": k, "tuner_pick": pick, "us": t * 1e6,
                     "fraction_of_peak_copy": bytes_read / t / 1e12 / peak, "speedup_vs_fp16": t16 / t,
                     "fp16_us": t16 * 1e6})
        print(f"gemv {n}x{k} tuner pick {pick}: {t * 1e6:.2f} us, {bytes_read / t / 1e12 / peak:.0%} of peak, "
              f"{t16 / t:.2f}x fp16 ({t16 * 1e6:.2f} us)", flush=True)
        del packed
        torch.cuda.empty_cache()
    return rows


# -- 2. W8A8 -------------------------------------------------------------------------------------------------


@triton.jit
def _w8a8_tma_kernel(a_desc, b_desc, c_desc, as_ptr, bs_ptr, out_ptr, M, N, K, stride_om,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     NUM_SMS: tl.constexpr, WS: tl.constexpr, TMA_STORE: tl.constexpr):
    """Persistent int8 GEMM, per-channel weight scales and per-token activation scales in the epilogue; operands
    through TMA descriptors (a: [M, K] int8, b: [N, K] int8); optionally warp-specialized, TMA store of C."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True, warp_specialize=WS):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(k_tiles):
            a = a_desc.load([om, ki * BLOCK_K])
            b = b_desc.load([on, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        offs_m = om + tl.arange(0, BLOCK_M)
        offs_n = on + tl.arange(0, BLOCK_N)
        a_s = tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)
        w_s = tl.load(bs_ptr + offs_n, mask=offs_n < N, other=0.0)
        y = (acc.to(tl.float32) * w_s[None, :] * a_s[:, None]).to(tl.float16)
        if TMA_STORE:
            c_desc.store([om, on], y)
        else:
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y,
                     mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def w8a8_tma(xq, xs, qweight, wscale, cfg, sms, out):
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = xq.shape
    n = qweight.shape[0]
    a_desc = TensorDescriptor.from_tensor(xq, [cfg["BLOCK_M"], cfg["BLOCK_K"]])
    b_desc = TensorDescriptor.from_tensor(qweight, [cfg["BLOCK_N"], cfg["BLOCK_K"]])
    c_desc = TensorDescriptor.from_tensor(out, [cfg["BLOCK_M"], cfg["BLOCK_N"]])
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    _w8a8_tma_kernel[(min(sms, tiles),)](
        a_desc, b_desc, c_desc, xs, wscale, out, m, n, k, out.stride(0), BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg.get("GROUP_M", 8), NUM_SMS=min(sms, tiles),
        WS=cfg.get("WS", False), TMA_STORE=cfg.get("TMA_STORE", False), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return out


KERNEL_TILES = [(128, 256, 128, 8, 3), (128, 256, 128, 8, 4), (128, 128, 128, 8, 4), (128, 128, 128, 4, 4),
                (128, 128, 128, 8, 5), (256, 128, 128, 8, 3), (256, 128, 128, 8, 4), (128, 256, 64, 8, 4),
                (128, 256, 64, 8, 5), (64, 256, 128, 4, 4)]
TMA_TILES = [(128, 256, 128, 8, 4), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 256, 64, 8, 5)]
TMA_VARIANTS = [dict(), dict(GROUP_M=4), dict(GROUP_M=16), dict(TMA_STORE=True), dict(WS=True),
                dict(WS=True, TMA_STORE=True)]


def _w8a8_cases(ms):
    """(m, n, k, fp16 weight, packed int8 per-channel weight, fp16 x, int8 x, x scales) for the Llama-3-8B
    shapes, the weights made once per shape."""
    gen = torch.Generator().manual_seed(1)
    for n, k in SHAPES:
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        q, scale, _ = random_int_weight(n, k, 8, True, k, gen)
        pw = pack_int_gemm(q, scale, None, bits=8).to("cuda")
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            xq, xs = quantize_rows(x, 8)
            yield m, n, k, w16, pw, x, xq, xs
        del w16
        torch.cuda.empty_cache()


def sweep_w8a8(ms=(1024, 2048, 4096)) -> list[dict]:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for m, n, k, w16, pw, x, xq, xs in _w8a8_cases(ms):
        ref = R.int_linear_ref(xq, xs, pw, torch.float32)
        t16 = graph_time([lambda w=w16: torch.matmul(x, w.t())])
        flops = 2 * m * n * k
        INT_TUNER.best.clear()
        TMA_TUNER.best.clear()
        int_linear(xq, xs, pw)  # the runtime's default path and its tuner's pick
        tma = takes_tma_path(m, pw, xq)
        pick = (TMA_TUNER.best.get((m, n, k, False, torch.float16)) if tma
                else INT_TUNER.best.get((m, n, k, 8, pw.group_size, False)))
        tp = graph_time([lambda: int_linear(xq, xs, pw)])
        rows.append({"M": m, "N": n, "K": k, "kernel": "int8_tma" if tma else "int_gemm", "tuner_pick": pick,
                     "us": tp * 1e6,
                     "speedup_vs_fp16": t16 / tp, "fp16_us": t16 * 1e6, "fp16_tflops": flops / t16 / 1e12})
        print(f"w8a8 M={m} {n}x{k}: fp16 {t16 * 1e6:.1f} us; tuner pick {pick} {tp * 1e6:.1f} us "
              f"({t16 / tp:.2f}x)", flush=True)
        for bm, bn, bk, warps, stages in KERNEL_TILES[:3]:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
            t, fail = _time_or_error([lambda cfg=cfg: int_linear(xq, xs, pw, config=cfg, tma=False)])
            err = None
            if t:
                y = int_linear(xq, xs, pw, config=cfg, tma=False)
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            rows.append({"M": m, "N": n, "K": k, "kernel": "int_gemm", "config": cfg, "error": fail,
                         "max_rel_err": err, **({"us": t * 1e6, "tops": flops / t / 1e12,
                                                 "speedup_vs_fp16": t16 / t} if t else {})})
            print(f"  int_gemm {cfg}: " + (f"{t * 1e6:.1f} us {flops / t / 1e12:.0f} TOPS {t16 / t:.2f}x"
                                           if t else fail), flush=True)
        out = torch.empty(m, n, device="cuda", dtype=torch.float16)
        for (bm, bn, bk, warps, stages), extra in [(t, v) for t in TMA_TILES[:1] for v in TMA_VARIANTS] + [
                (t, v) for t in TMA_TILES[1:] for v in TMA_VARIANTS[3:5]]:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, **extra)
            t, fail = _time_or_error([lambda cfg=cfg: w8a8_tma(xq, xs, pw.qweight, pw.scale, cfg, sms, out)])
            err = None
            if t:
                y = w8a8_tma(xq, xs, pw.qweight, pw.scale, cfg, sms, out)
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            rows.append({"M": m, "N": n, "K": k, "kernel": "tma_persistent", "config": cfg, "error": fail,
                         "max_rel_err": err, **({"us": t * 1e6, "tops": flops / t / 1e12,
                                                 "speedup_vs_fp16": t16 / t} if t else {})})
            print(f"  tma {cfg}: " + (f"{t * 1e6:.1f} us {flops / t / 1e12:.0f} TOPS {t16 / t:.2f}x, "
                                      f"err {err:.1e}" if t else fail), flush=True)
    return rows


def sweep_w8a8_focus(ms=(1024, 2048)) -> list[dict]:
    """The runtime's W8A8 path at M >= 128: every candidate of its tuner (the Triton TMA kernel's tiles and, on
    sm_90, the Gluon wgmma kernel's, ``WGMMA``) and the tuner's pick, against fp16 ``torch.matmul`` in the same
    run. Every candidate's output is compared bit for bit with the first one's (the same int32 sums and epilogue)."""
    from qcompile.runtime.triton.w8a8 import tma_candidates, wgmma_capable

    rows = []
    for m, n, k, w16, pw, x, xq, xs in _w8a8_cases(ms):
        t16 = graph_time([lambda w=w16: torch.matmul(x, w.t())])
        flops = 2 * m * n * k
        TMA_TUNER.best.clear()
        int_linear(xq, xs, pw, tma=True)
        pick = TMA_TUNER.best.get((m, n, k, False, torch.float16))
        tp = graph_time([lambda: int_linear(xq, xs, pw, tma=True)])
        rows.append({"M": m, "N": n, "K": k, "kernel": "int8_tma", "tuner_pick": pick, "us": tp * 1e6,
                     "speedup_vs_fp16": t16 / tp, "fp16_us": t16 * 1e6, "fp16_tflops": flops / t16 / 1e12})
        print(f"w8a8 focus M={m} {n}x{k}: fp16 {t16 * 1e6:.1f} us; tuner pick {pick} {tp * 1e6:.1f} us "
              f"({t16 / tp:.2f}x)", flush=True)
        first = None
        # fp16 outputs: 16-byte aligned rows where N % 8 == 0
        for cfg in tma_candidates(m, torch.float16, wgmma=wgmma_capable("cuda"), tma_store=n % 8 == 0):
            t, fail = _time_or_error([lambda cfg=cfg: int_linear(xq, xs, pw, config=cfg, tma=True)])
            same = None
            if t:
                y = int_linear(xq, xs, pw, config=cfg, tma=True)
                first = y if first is None else first
                same = bool(torch.equal(y, first))
            rows.append({"M": m, "N": n, "K": k, "kernel": "int8_wgmma" if cfg.get("WGMMA") else "int8_tma",
                         "config": cfg, "error": fail, "equal_to_first": same,
                         **({"us": t * 1e6, "tops": flops / t / 1e12, "speedup_vs_fp16": t16 / t} if t else {})})
            print(f"  {cfg}: " + (f"{t * 1e6:.1f} us {flops / t / 1e12:.0f} TOPS {t16 / t:.2f}x, equal: {same}"
                                  if t else fail), flush=True)
    return rows


# -- 3. attention --------------------------------------------------------------------------------------------


def _time_attention(q, caches, lens, prefix, cfg: dict,
                    ref: torch.Tensor) -> tuple[float | None, str | None, float | None]:
    """One forced attention configuration over the layers' ``caches``: seconds per call (or the error that stopped
    it) and the largest |difference| of its output on the first cache from ``ref``."""
    t, fail = _time_or_error([lambda c=c: decode_attention(q, c, lens, prefix, config=cfg) for c in caches])
    err = None
    if t:
        err = (decode_attention(q, caches[0], lens, prefix, config=cfg).float() - ref.float()).abs().max().item()
    return t, fail, err


def sweep_attention(lengths=(8192, 32768), kv_bits=(8, 4)) -> list[dict]:
    nh, nkv, d = 32, 8, 128
    rows = []
    for length in lengths:
        q, lens, prefix, caches = attention_setup(length, nh, nkv, d)
        ks = [c.k_float for c in caches[16]]
        vs = [c.v_float for c in caches[16]]
        q4 = q[:, :, None]
        sdpa = graph_time([lambda k=k, v=v: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
                           for k, v in zip(ks, vs)])
        print(f"attention {length}: SDPA fp16 (GQA) {sdpa * 1e6:.1f} us", flush=True)
        base = default_splits(1, nkv, length, "cuda", 64)
        for bits in kv_bits:
            cs = caches[bits]
            ref = decode_attention(q, cs[0], lens, prefix, config=dict(BLOCK_S=64, SPLITS=base, num_warps=4,
                                                                         num_stages=2))
            def splits(block, mult):  # mult x the default split count, at most one block per split and 512
                return max(1, min(int(base * mult), -(-length // block), 512))

            grid = [dict(BLOCK_S=block, SPLITS=splits(block, mult), num_warps=warps, num_stages=stages)
                    for block in (32, 64, 128) for mult in (0.5, 1, 2) for warps, stages in ((1, 2), (2, 2), (2, 3))]
            # launch variants (the tuner offers a few of them: kv_attention.decode_candidates): the query
            # group unpadded (GP = 4 rows instead of 16: fewer accumulator registers, more programs per SM; hence
            # the 2.75x split count, about 11 one-warp programs per SM), an 8-warp combine (4 warps spill
            # registers at 256 split rows when compiled for sm_90), Q.K on int8 tensor cores (QK_I8: q rounded to
            # int8 per row) and both kernels as programmatic dependent launches (PDL)
            variant_sets = (((1, 2, 2.75), (dict(GP=4), dict(COMBINE_WARPS=8), dict(GP=4, COMBINE_WARPS=8))),
                            ((1, 2.75), (dict(QK_I8=True), dict(GP=4, COMBINE_WARPS=8, QK_I8=True),
                                         dict(GP=4, COMBINE_WARPS=8, PDL=True),
                                         dict(GP=4, COMBINE_WARPS=8, QK_I8=True, PDL=True))))
            variants = [dict(BLOCK_S=block, SPLITS=splits(block, mult), num_warps=warps, num_stages=2, **extra)
                        for mults, extras in variant_sets
                        for block in (32, 64) for mult in mults for warps in (1, 2) for extra in extras]
            tuned = [c for c in decode_candidates(1, nkv, length, "cuda", False, d, group=nh // nkv, on_codes=True)
                     if c not in grid + variants]  # (the variants below include three of them)
            for cfg in grid + tuned + variants:
                t, fail, err = _time_attention(q, cs, lens, prefix, cfg, ref)
                rows.append({"context": length, "kv_bits": bits, "config": cfg, "error": fail,
                             "max_abs_diff_vs_default": err, "sdpa_us": sdpa * 1e6,
                             **({"us": t * 1e6, "speedup_vs_sdpa": sdpa / t} if t else {})})
                print(f"  kv{bits} {cfg}: " + (f"{t * 1e6:.1f} us {sdpa / t:.2f}x" if t else fail),
                      flush=True)
            DECODE_TUNER.best.clear()
            decode_attention(q, cs[0], lens, prefix)
            pick = DECODE_TUNER.best.get((1, nh, nkv, d, bits, length, torch.float16, False))
            t = graph_time([lambda c=c: decode_attention(q, c, lens, prefix) for c in cs])
            rows.append({"context": length, "kv_bits": bits, "tuner_pick": pick, "us": t * 1e6,
                         "speedup_vs_sdpa": sdpa / t, "sdpa_us": sdpa * 1e6})
            print(f"  kv{bits} tuner pick {pick}: {t * 1e6:.1f} us {sdpa / t:.2f}x", flush=True)
        del caches, ks, vs
        torch.cuda.empty_cache()
    return rows


def sweep_attention_focus(lengths=(32768,), kv_bits=(8, 4)) -> list[dict]:
    """Around the tuner's pick: the pick itself, then one change at a time, each timed in the same run. The fifth
    session's changes (combine chunks, deeper pipelining, other split counts, 16-token blocks, two warps: all slower
    than the pick on the H100, bench/results/device_2026-12-05_s5/call4_h100/focus.json) gave way to occupancy ones."""
    nh, nkv, d = 32, 8, 128
    rows = []
    for length in lengths:
        q, lens, prefix, caches = attention_setup(length, nh, nkv, d)
        q4 = q[:, :, None]
        sdpa = graph_time([lambda c=c: F.scaled_dot_product_attention(q4, c.k_float, c.v_float, enable_gqa=True)
                           for c in caches[16]])
        print(f"attention focus {length}: SDPA fp16 (GQA) {sdpa * 1e6:.1f} us", flush=True)
        for bits in kv_bits:
            cs = caches[bits]
            DECODE_TUNER.best.clear()
            ref = decode_attention(q, cs[0], lens, prefix)
            pick = DECODE_TUNER.best[(1, nh, nkv, d, bits, length, torch.float16, False)]
            # split counts that keep one wave (8 one-warp programs a SM at most: sixth session's Nsight Compute) and
            # 8 blocks a program, with a power-of-two count so the combine's split axis is not padded to 256
            # (132 -> 256 rows); earlier rounds (occupancy: register caps, one stage, 64-token blocks; combine
            # chunks, 99 / 198 / 264 splits) were all slower than the pick on the H100
            # (bench/results/device_2026-12-05_s{5,6}/*/focus.json)
            changes = [{}, dict(SPLITS=128), dict(SPLITS=128, COMBINE_DC=16), dict(SPLITS=128, COMBINE_DC=64),
                       dict(SPLITS=120), dict(SPLITS=112)]
            for change in changes:
                cfg = {**pick, **change}
                t, fail, err = _time_attention(q, cs, lens, prefix, cfg, ref)
                rows.append({"context": length, "kv_bits": bits, "config": cfg, "change": change, "error": fail,
                             "max_abs_diff_vs_pick": err, "sdpa_us": sdpa * 1e6,
                             **({"us": t * 1e6, "speedup_vs_sdpa": sdpa / t} if t else {})})
                print(f"  kv{bits} pick + {change or 'nothing'}: "
                      + (f"{t * 1e6:.1f} us {sdpa / t:.2f}x, diff {err:.1e}" if t else fail), flush=True)
        del caches
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/triton_sweep.json")
    ap.add_argument("--skip", default="")
    ap.add_argument("--contexts", default="8192,32768", help="attention context lengths (comma-separated)")
    ap.add_argument("--kv-bits", default="8,4", help="attention KV-cache widths (comma-separated: 8, 4)")
    ap.add_argument("--gemv-bands", default="32,64", help="GEMV column-band widths to time ('' for none)")
    ap.add_argument("--gemv-no-wide", action="store_true", help="leave out the GEMV's wide tiles beyond the tuner's")
    ap.add_argument("--jobs", type=int, default=1, help="processes that compile the GEMV configurations first")
    args = ap.parse_args()
    try:
        contexts = tuple(int(x) for x in args.contexts.split(","))
        kv_bits = tuple(int(x) for x in args.kv_bits.split(","))
    except ValueError as e:
        ap.error(f"--contexts and --kv-bits take comma-separated integers: {e}")
    if min(contexts) < 1 or not set(kv_bits) <= {8, 4}:
        ap.error(f"--contexts must be positive and --kv-bits 8 and/or 4, got {args.contexts!r} and {args.kv_bits!r}")
    if not torch.cuda.is_available():
        sys.exit("triton_sweep: needs a CUDA GPU")
    skip = set(filter(None, args.skip.split(",")))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = {"command": " ".join(["python"] + sys.argv), "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "triton": triton.__version__}
    res["peak_copy"] = peak_copy_bandwidth()
    peak = res["peak_copy"]["tb_per_s"]
    print(f"peak copy {peak:.2f} TB/s", flush=True)

    def save():
        res["seconds"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(res, indent=2, default=str))

    bands = tuple(int(b) for b in args.gemv_bands.split(",") if b)
    for name, fn in (("gemv", lambda: sweep_gemv(peak, bands=bands, wide=not args.gemv_no_wide, jobs=args.jobs)),
                     ("attention", lambda: sweep_attention(contexts, kv_bits)),
                     ("attention_focus", lambda: sweep_attention_focus((max(contexts),), kv_bits)),
                     ("gemm", sweep_w8a8), ("gemm_focus", sweep_w8a8_focus)):
        if name not in skip:
            res[name] = fn()
            save()
    save()
    print(f"saved {out} ({res['seconds']} s)")


if __name__ == "__main__":
    main()
