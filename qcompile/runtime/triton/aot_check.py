"""Compile every kernel configuration for a GPU architecture on a machine without a GPU.

Triton's wheel bundles ``ptxas``, so ``triton.compile`` can lower a kernel to a cubin for sm_90 anywhere. This
catches what the interpreter cannot: lowering errors (dot shapes and dtypes, layouts), shared memory above the
device limit, and register spills, for each autotuning candidate at the shapes the runtime and the benchmarks use.

    python -m qcompile.runtime.triton.aot_check            # one config per kernel variant
    python -m qcompile.runtime.triton.aot_check --all      # every tuning candidate at Llama-3-8B shapes
    python -m qcompile.runtime.triton.aot_check --small    # the tiny shapes the tests launch (about a minute)

Exit status 1 if anything fails to compile or exceeds shared memory; register spills are listed (they cost
speed, not correctness). Must not run with
``TRITON_INTERPRET=1`` (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

SHARED_LIMIT = 232448  # bytes of shared memory one block may opt into on H100 (227 KiB)
# argument types of the tensor-core GEMV (gemv_mma.gemv_mma_kernel), fp16 activations
GEMV_MMA_TYPES = dict(xw_ptr="*i32", x_ptr="*fp16", w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8", b_ptr="*fp16",
                      r_ptr="*fp16", out_ptr="*fp16", part_ptr="*fp32", lock_ptr="*i32", N="i32", K="i32")


def _ptxas_stats(ptx: str, arch: int) -> tuple[int, int]:
    from triton import knobs

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
        path = f.name
    try:
        out = subprocess.run([knobs.nvidia.ptxas.path, f"-arch=sm_{arch}a", "-v", "-o", os.devnull, path],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(path)
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    return regs, spills


def sass_text(cubin: bytes) -> str:
    """``cuobjdump -sass`` of a cubin (``compile_one(..., keep_cubin=True)``), with Triton's bundled cuobjdump."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(path)


def compile_one(fn, types: dict, consts: dict, ints: dict | None = None, num_warps: int = 4, num_stages: int = 2,
                arch: int = 90, keep_cubin: bool = False) -> dict:
    """Compile ``fn`` with argument ``types`` ('*fp16', 'i32', ...) and constexpr ``consts``; ints in ``ints``
    (example values) that are multiples of 16, and every pointer, get Triton's divisibility specialization."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ints = ints or {}
    consts = dict(consts)
    maxnreg = consts.pop("maxnreg", None)  # a launch option (register cap), not a kernel parameter
    # constexpr parameters left out take their defaults, as a launch would
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        ty = types[name]
        sig[name] = ty
        if ty.startswith("*") or (name in ints and ints[name] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    if getattr(fn, "is_gluon", lambda: False)():  # a Gluon kernel: its layouts are explicit, no pipeliner
        from triton.experimental.gluon._runtime import GluonASTSource

        src = GluonASTSource(fn=fn, signature=sig, constexprs=dict(consts), attrs=attrs)
        options = {"num_warps": num_warps}
    else:
        src = ASTSource(fn=fn, signature=sig, constexprs=dict(consts), attrs=attrs)
        options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    regs, spills = _ptxas_stats(k.asm["ptx"], arch)
    out = {"shared": k.metadata.shared, "regs": regs, "spills": spills}
    if keep_cubin:  # for SASS inspection (``sass_text``)
        out["cubin"] = k.asm["cubin"]
    return out


def _wgmma_types(bm: int, bn: int, bk: int, out_dt: str, epilogue: int = 0) -> dict:
    """Argument types of ``w8a8._int8_wgmma_kernel``: Gluon tensor descriptors name their shared layout; the
    output's descriptor is the TMA-store epilogue's (2), the A descriptor again otherwise (unused)."""
    from triton.experimental.gluon import language as gl

    def desc(ty, gl_ty, rows, cols):
        return f"tensordesc<{ty}[{rows}, {cols}],{gl.NVMMASharedLayout.get_default_for([rows, cols], gl_ty)!r}>"

    gl_out = {"fp16": gl.float16, "bf16": gl.bfloat16, "fp32": gl.float32}[out_dt]
    c_desc = desc(out_dt, gl_out, bm, bn) if epilogue == 2 else desc("i8", gl.int8, bm, bk)
    return dict(a_desc=desc("i8", gl.int8, bm, bk), b_desc=desc("i8", gl.int8, bn, bk), as_ptr="*fp32",
                bs_ptr="*fp32", bias_ptr="*fp32", out_ptr=_ptr(out_dt), c_desc=c_desc, M="i32", N="i32", K="i32",
                stride_om="i32")


def _ptr(dtype):
    return f"*{dtype}"


def _decode_types(dt):
    """``kv_attention._decode_kernel``'s argument types for query/float-cache dtype ``dt``."""
    return dict(q_ptr=_ptr(dt), kf_ptr=_ptr(dt), vf_ptr=_ptr(dt), kq_ptr="*u8", vq_ptr="*u8", ks_ptr="*fp32",
                kz_ptr="*u8", vs_ptr="*fp32", vz_ptr="*u8", lens_ptr="*i32", prefix_ptr="*i32", po_ptr="*fp32",
                pm_ptr="*fp32", pl_ptr="*fp32", qk_scale="fp32", PCAP="i32", SMAX="i32", WINDOW="i32",
                NUM_SPLITS="i32")


def _combine_types(dt):
    """``kv_attention._combine_kernel``'s argument types for output dtype ``dt``."""
    return dict(po_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32", out_ptr=_ptr(dt), p_ptr="*i8", NUM_SPLITS="i32")


def cases(all_configs: bool):
    """(label, fn, types, consts, ints, warps, stages) for every kernel variant the runtime launches."""
    import torch

    from qcompile.runtime.triton import act_quant, hadamard, kv_attention, norm, w8a8, wq_matmul
    from qcompile.runtime.triton.packing import PackedIntWeight

    sms = 132
    shapes = [(4096, 4096), (14336, 4096), (4096, 14336)] if all_configs else [(4096, 4096)]
    for act_dt in ("fp16", "fp32"):
        for bits in (4, 8):
            for n, k in shapes:
                for m in ((1, 4, 8) if all_configs else (1,)):
                    cands = wq_matmul.gemv_candidates(m, n, k, bits, sms)
                    # the first candidate also as a programmatic dependent launch, with and without the first
                    # tile read before the wait, and on column bands (bench variants, fp16 int4)
                    pdl = ([dict(cands[0], PDL=True), dict(cands[0], PDL=True, PREFETCH=True),
                            dict(cands[0], BAND=cands[0]["BLOCK_N"])]
                           if act_dt == "fp16" and bits == 4 else [])
                    if act_dt == "fp16" and bits == 4 and m == 1:
                        # the runtime's default decode here is row pairs (every candidate: wq_matmul.gemv_row_pairs);
                        # the per-word decode (QCOMPILE_GEMV_PAIRS=0) through the first candidate, as above
                        pdl += [dict(cands[0], PAIRS=True, PDL=True, PREFETCH=True)]
                        cands = [dict(c, PAIRS=True) for c in cands] + [cands[0]]
                    for cfg in (cands if all_configs else cands[:1]) + pdl:
                        meta = {kk: v for kk, v in cfg.items() if kk not in ("num_warps", "num_stages")}
                        for zero, res, act in ((True, True, True), (False, False, False)):
                            types = dict(x_ptr=_ptr(act_dt), w_ptr="*i32", s_ptr=_ptr(act_dt), z_ptr="*u8",
                                         b_ptr=_ptr(act_dt), r_ptr=_ptr(act_dt), out_ptr=_ptr(act_dt),
                                         part_ptr="*fp32", lock_ptr="*i32", M="i32", N="i32", K="i32",
                                         stride_xm="i32", stride_rm="i32", stride_om="i32")
                            consts = dict(BITS=bits, GROUP=128, HAS_ZERO=zero, HAS_BIAS=not zero, HAS_RES=res,
                                          ACT_SILU_MUL=act, HALF2=bits == 4 and m == 1 and act_dt == "fp16",
                                          **meta)
                            yield (f"gemv {act_dt} int{bits} M={m} {n}x{k} {cfg} zero={zero} act={act}",
                                   wq_matmul._gemv_kernel, types, consts, dict(N=n, K=k, stride_xm=k, stride_rm=n,
                                                                              stride_om=n),
                                   cfg.get("num_warps", 4), cfg.get("num_stages", 2))
                    if act_dt == "fp16" and m == 1 or act_dt == "fp32":
                        for group in (128, 32):
                            cands = wq_matmul.gemm_candidates(2048 if act_dt == "fp16" else 64, n, k, group,
                                                              act_dt == "fp32", bits)
                            for cfg in (cands if all_configs else cands[:2]):
                                meta = {kk: v for kk, v in cfg.items() if kk not in ("num_warps", "num_stages")}
                                types = dict(x_ptr=_ptr(act_dt), w_ptr="*i32", s_ptr=_ptr(act_dt), z_ptr="*u8",
                                             b_ptr=_ptr(act_dt), r_ptr=_ptr(act_dt), out_ptr=_ptr(act_dt), M="i32",
                                             N="i32", K="i32", stride_xm="i32", stride_rm="i32", stride_om="i32")
                                consts = dict(BITS=bits, GROUP=group, HAS_ZERO=True, HAS_BIAS=True, HAS_RES=True,
                                              IEEE=act_dt == "fp32", **meta)
                                yield (f"gemm {act_dt} int{bits} g{group} {n}x{k} {cfg}", wq_matmul._gemm_kernel,
                                       types, consts, dict(N=n, K=k, stride_xm=k, stride_rm=n, stride_om=n),
                                       cfg.get("num_warps", 4), cfg.get("num_stages", 2))

    # the tensor-core GEMV (gemv_mma, opt-in): every candidate, both group sizes, with and without SwiGLU
    from qcompile.runtime.triton import gemv_mma

    for n, k in shapes:
        cands = gemv_mma.candidates(n, sms)
        for group in (128, 64):
            for act in (False, True):
                for cfg in (cands if all_configs else cands[:1]):
                    consts = dict(GROUP=group, HAS_BIAS=True, HAS_RES=True, ACT_SILU_MUL=act, E=cfg["E"],
                                  SPLIT_K=cfg["SPLIT_K"], num_warps=cfg["num_warps"], PDL=True, AHEAD=cfg["AHEAD"])
                    yield (f"gemv_mma {n}x{k} g{group} act={act} {cfg}", gemv_mma.gemv_mma_kernel, GEMV_MMA_TYPES,
                           consts, dict(N=n, K=k), cfg["num_warps"], 2)

    for k, group in ((4096, None), (14336, None), (4096, 64), (4096, 128)):
        for dt in ("fp16", "fp32"):
            for sym in (True, False):
                g = group or k
                block = 1 << (g - 1).bit_length()
                yield (f"fake_quant {dt} G={g} sym={sym}", act_quant._fake_quant_kernel,
                       dict(x_ptr=_ptr(dt), y_ptr=_ptr(dt), G="i32", clip="fp32"),
                       dict(QMAX=7 if sym else 15, SYM=sym, BLOCK=block), dict(G=g),
                       4 if block <= 2048 else 8 if block <= 8192 else 16, 2)

    for k in (4096, 14336):
        for normed in (False, True):
            block = 1 << (k - 1).bit_length()
            yield (f"quantize_rows K={k} norm={normed}", w8a8._quant_rows_kernel,
                   dict(x_ptr="*fp16", w_ptr="*fp16", q_ptr="*i8", s_ptr="*fp32", K="i32", stride_x="i32",
                        stride_q="i32", eps="fp32", clip="fp32"),
                   dict(QMAX=127, NORM=normed, HAS_W=normed, BLOCK=block), dict(K=k, stride_x=k, stride_q=k),
                   4 if block <= 2048 else 8 if block <= 8192 else 16, 1)

    for n, k in shapes:
        for bits, group in ((8, k), (8, 128), (4, k), (4, 128)):
            pw = PackedIntWeight(qweight=None, scale=None, zero=None, bits=bits, group_size=group, in_features=k,
                                 out_features=n, half=64 if bits == 4 else 0)
            cands = w8a8.int_gemm_candidates(4096, n, k, pw)
            for cfg in (cands if all_configs else cands[:2]):
                meta = {kk: v for kk, v in cfg.items() if kk not in ("num_warps", "num_stages")}
                types = dict(a_ptr="*i8", as_ptr="*fp32", b_ptr="*u8" if bits == 4 else "*i8", bs_ptr="*fp32",
                             bz_ptr="*i32", bias_ptr="*fp32", out_ptr="*fp16", M="i32", N="i32", K="i32",
                             stride_am="i32", stride_bn="i32", stride_om="i32")
                consts = dict(W4=bits == 4, GROUP=group, PER_CHANNEL=group >= k, HAS_ZERO=False, HAS_BIAS=False,
                              **meta)
                yield (f"int_gemm W{bits} g{group} {n}x{k} {cfg}", w8a8._int_gemm_kernel, types, consts,
                       dict(N=n, K=k, stride_am=k, stride_bn=k if bits == 8 else k // 2, stride_om=n),
                       cfg.get("num_warps", 4), cfg.get("num_stages", 2))
        # the TMA int8 GEMM (per-channel weights, M >= 128), per output dtype: its shared memory holds the stages
        # and the output tile on its way to the store
        for out_dt, out_t in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
            cands = w8a8.tma_candidates(4096, out_t)
            for cfg in (cands if all_configs else cands[:1]):
                bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
                types = dict(a_desc=f"tensordesc<i8[{bm}, {bk}]>", b_desc=f"tensordesc<i8[{bn}, {bk}]>",
                             as_ptr="*fp32", bs_ptr="*fp32", bias_ptr="*fp32", out_ptr=_ptr(out_dt), M="i32",
                             N="i32", K="i32", stride_om="i32")
                consts = dict(HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
                              NUM_PROGRAMS=sms)
                yield (f"int8_tma {out_dt} {n}x{k} {cfg}", w8a8._int8_tma_kernel, types, consts,
                       dict(N=n, K=k, stride_om=n), cfg["num_warps"], cfg["num_stages"])
            wg = [c for c in w8a8.tma_candidates(4096, out_t, wgmma=True, tma_store=True) if c.get("WGMMA")]
            if not all_configs:  # the first candidate with each epilogue
                wg = [next(c for c in wg if c["EPILOGUE"] == e) for e in sorted({c["EPILOGUE"] for c in wg})]
            for cfg in wg:
                yield (f"int8_wgmma {out_dt} {n}x{k} {cfg}", w8a8._int8_wgmma_kernel,
                       _wgmma_types(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], out_dt, cfg["EPILOGUE"]),
                       dict(HAS_BIAS=True, GROUP_M=cfg["GROUP_M"], STAGES=cfg["STAGES"], INSTR_N=cfg["INSTR_N"],
                            num_warps=cfg["num_warps"], EPILOGUE=cfg["EPILOGUE"]),
                       dict(N=n, K=k, stride_om=n), cfg["num_warps"], 0)

    for n in (64, 128, 576, 1536, 4096, 11008, 14336, 18944, 28672):
        for dt in ("fp16", "fp32"):
            kind, _, geo = hadamard._plan(n, None, torch.float16 if dt == "fp16" else torch.float32, "cpu")
            for quant in (False, True):
                if kind == "dense":
                    npad = geo
                    yield (f"hadamard dense n={n} {dt} quant={quant}", hadamard._had_dense_kernel,
                           dict(x_ptr=_ptr(dt), m_ptr=_ptr(dt), y_ptr=_ptr(dt), q_ptr="*i8", qs_ptr="*fp32",
                                M="i32", N="i32", stride_x="i32", stride_y="i32", scale="fp32"),
                           dict(NP=npad, BLOCK_M=16 if npad >= 128 else 32, QUANT=quant, QMAX=127, IEEE=dt == "fp32"),
                           dict(N=n, stride_x=n, stride_y=n), 8 if dt == "fp32" and npad >= 128 else 4, 2)
                else:
                    r, c, rp, cp = geo
                    warps = hadamard.warps_2d(rp, cp, dt == "fp32")
                    yield (f"hadamard 2d n={n} ({rp}x{cp}) {dt} quant={quant}", hadamard._had_2d_kernel,
                           dict(x_ptr=_ptr(dt), l_ptr=_ptr(dt), h_ptr=_ptr(dt), y_ptr=_ptr(dt), q_ptr="*i8",
                                qs_ptr="*fp32", R="i32", C="i32", stride_x="i32", stride_y="i32", s1="fp32",
                                s2="fp32"),
                           dict(RP=rp, CP=cp, BK=min(rp, 64), QUANT=quant, QMAX=127, IEEE=dt == "fp32"),
                           dict(R=r, C=c, stride_x=n, stride_y=n), warps, 2)

    for dt in ("fp16", "fp32"):
        rope_sig = dict(qkv_ptr=_ptr(dt), pos_ptr="*i32", cos_ptr="*fp32", sin_ptr="*fp32", qn_ptr="*fp32",
                        kn_ptr="*fp32", q_out=_ptr(dt), k_out=_ptr(dt), v_out=_ptr(dt), kf_ptr=_ptr(dt),
                        vf_ptr=_ptr(dt), kq_ptr="*u8", vq_ptr="*u8", ks_ptr="*fp32", kz_ptr="*u8", vs_ptr="*fp32",
                        vz_ptr="*u8", prefix_ptr="*i32", T="i32", stride_qkv="i32", eps="fp32", PCAP="i32",
                        SMAX="i32", clip="fp32")
        for d in (64, 128):
            for kv_bits, sym in ((16, False), (8, False), (4, True)):
                for qk_norm, pdl in ((False, False), (True, False), (False, True), (True, True)):  # PDL: runner's pdl
                    yield (f"rope_store {dt} D={d} kv{kv_bits} qk_norm={qk_norm} PDL={pdl}",
                           kv_attention._rope_store_kernel, rope_sig,
                           dict(NH=32, NKV=8, D=d, KV_BITS=kv_bits, KV_SYM=sym, QK_NORM=qk_norm, OUT_KV=qk_norm,
                                ROPE=True, STORE=True, PDL=pdl),
                           dict(stride_qkv=48 * d), 1 if d <= 64 else 2, 2)
                # R3: RoPE without the store, then store_kv (the rotated keys, no RoPE, no query heads)
                for label, nh, rope, store, out_kv in (("rope only", 32, True, False, True),
                                                       ("store_kv", 0, False, True, False)):
                    yield (f"rope_store {label} {dt} D={d} kv{kv_bits}", kv_attention._rope_store_kernel,
                           rope_sig,
                           dict(NH=nh, NKV=8, D=d, KV_BITS=kv_bits, KV_SYM=sym, QK_NORM=False, OUT_KV=out_kv,
                                ROPE=rope, STORE=store),
                           dict(stride_qkv=(nh + 16) * d), 1 if d <= 64 else 2, 2)
                g = 4
                # every configuration decode_candidates offers for this dtype (the tuner may pick any of them)
                on_codes = kv_attention.attends_on_codes(True, dt == "fp16", kv_bits)
                seen = set()
                cands = kv_attention.decode_candidates(1, 8, 32768, "cpu", dt == "fp32", d, group=g,
                                                       on_codes=on_codes)
                first = (cands[0]["BLOCK_S"], cands[0]["num_warps"], cands[0]["num_stages"])
                for cfg in cands:
                    # splits and COMBINE_WARPS are not compiled into the decode kernel; "cpu" gets no PDL
                    # candidates (they need sm_90), but decode_attention(pdl=True) (the runner's pdl option) forces
                    # PDL on any of them, so each is compiled with it too (the default check: the first tiles)
                    for pdl in sorted({cfg.get("PDL", False), True}):
                        extra = {"GP": cfg.get("GP", 16), "PDL": pdl}
                        name = (cfg["BLOCK_S"], cfg["num_warps"], cfg["num_stages"], tuple(extra.items()))
                        if name in seen or pdl and not all_configs and name[:3] != first:
                            continue  # the default check: PDL on the first (default) tiles only
                        seen.add(name)
                        yield (f"decode_attention {dt} D={d} kv{kv_bits} G={g} block {cfg['BLOCK_S']} "
                               f"warps {cfg['num_warps']}/{cfg['num_stages']} {extra}", kv_attention._decode_kernel,
                               _decode_types(dt),
                               dict(NKV=8, G=g, D=d, KV_BITS=kv_bits, BLOCK_S=cfg["BLOCK_S"], USE_DOT=True,
                                    IEEE=dt == "fp32", ON_CODES=on_codes, **extra),
                               {}, cfg["num_warps"], cfg["num_stages"])
                if all_configs and dt == "fp16" and kv_bits != 16:
                    # bench/triton_sweep.py's launch variants: unpadded query rows with PDL (tuner candidates on
                    # sm_90) and int8 Q.K (never a candidate: it changes the result)
                    for (bs, w), extra in itertools.product(((32, 1), (64, 2)), (
                            dict(GP=4), dict(GP=4, QK_I8=True), dict(GP=4, PDL=True), dict(GP=16, QK_I8=True))):
                        yield (f"decode_attention {dt} D={d} kv{kv_bits} G={g} block {bs} warps {w}/2 {extra}",
                               kv_attention._decode_kernel,
                               _decode_types(dt),
                               dict(NKV=8, G=g, D=d, KV_BITS=kv_bits, BLOCK_S=bs, USE_DOT=True, IEEE=False,
                                    ON_CODES=True, **{"GP": 16, **extra}), {}, w, 2)
            yield (f"combine D={d} {dt}", kv_attention._combine_kernel,
                   _combine_types(dt),
                   dict(SP=64, D=d, DC=d), {}, 4, 2)
            if dt == "fp16":  # with the output's digit planes (the runner's digit_gemv)
                yield (f"combine D={d} {dt} planes PDL", kv_attention._combine_kernel, _combine_types(dt),
                       dict(SP=64, D=d, DC=d, PDL=True, PLANES=True), {}, 4, 2)
            if all_configs:  # 256 split rows: 4 warps spill, the 8-warp bench variant does not; with PDL; in
                # chunks of D (COMBINE_DC)
                for w, pdl, dc in ((4, False, d), (8, False, d), (8, True, d), (4, True, 32), (8, True, 64)):
                    yield (f"combine D={d} {dt} SP=256 warps {w} PDL={pdl} DC={dc}", kv_attention._combine_kernel,
                           _combine_types(dt), dict(SP=256, D=d, DC=min(dc, d), PDL=pdl), {}, w, 2)
        for n, pdl in ((576, False), (4096, False), (4096, True)):
            yield (f"rms_norm {dt} N={n} PDL={pdl}", norm._rms_norm_kernel,
                   dict(x_ptr=_ptr(dt), w_ptr=_ptr(dt), y_ptr=_ptr(dt), p_ptr="*i8", N="i32", stride_x="i32",
                        stride_y="i32", eps="fp32"),
                   dict(HAS_W=True, BLOCK=1 << (n - 1).bit_length(), PDL=pdl), dict(N=n, stride_x=n, stride_y=n), 4,
                   2)
        # with the output's digit planes (the runner's digit_gemv): 8 warps from 4096 features (4 spill there)
        for n, w in ((2048, 4), (4096, 8)) if dt == "fp16" else ():
            yield (f"rms_norm fp16 N={n} PDL planes", norm._rms_norm_kernel,
                   dict(x_ptr="*fp16", w_ptr="*fp16", y_ptr="*fp16", p_ptr="*i8", N="i32", stride_x="i32",
                        stride_y="i32", eps="fp32"),
                   dict(HAS_W=True, BLOCK=n, PDL=True, PLANES=True), dict(N=n, stride_x=n, stride_y=n), w, 2)
    # the decode step's argmax: the 1.2B Llama's vocabulary (126 programs) and a tiny model's; with the step's tail
    # (the pick fed back, position and length advanced) as the runner launches it, and without
    from qcompile.runtime.triton import argmax

    for dt in ("fp16", "fp32"):
        for n in (128256, 300):
            chunk = argmax.chunk_size(n, sms)
            for tail in (False, True):
                yield (f"argmax {dt} N={n}" + (" (step tail)" if tail else ""), argmax._argmax_kernel,
                       dict(x_ptr=_ptr(dt), part_ptr="*fp32", lock_ptr="*i32", out_ptr="*i64", copy_ptr="*i64",
                            a0_ptr="*i32", a1_ptr="*i32", N="i32"),
                       dict(CHUNK=chunk, PROGRAMS=1 << (-(-n // chunk) - 1).bit_length(), COPY=tail,
                            ADVANCE=2 if tail else 0), dict(N=n), 4, 2)
    # the persistent GEMV chain (gemv_chain): its default (BLOCK_N 32, 16 warps) must hold two 64 KiB slices
    # without spills; 8 warps is the bench's other configuration
    from qcompile.runtime.triton import gemv_chain

    for warps, has_zero in ((16, True), (16, False)) + (((8, True),) if all_configs else ()):
        yield (f"gemv_chain 4096 BN=32 warps {warps} zero={has_zero}", gemv_chain._chain_kernel,
               dict(x_ptr="*fp16", w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8", sync_ptr="*i32", first="i32",
                    last="i32", N="i32"),
               dict(K=4096, GROUP=128, HAS_ZERO=has_zero, BLOCK_N=32, PAIRS=True, SYNC=True), dict(N=4096), warps, 1)
    # the TMA-staged chain (Gluon): 2 and 3 stages of 67 KiB must fit the 227 KiB a block may use
    from triton.experimental.gluon import language as gl

    from qcompile.runtime.triton import gemv_chain_staged

    def desc(ty, rows, bits):
        return f"tensordesc<{ty}[{rows}, 32],{gl.NVMMASharedLayout(0, bits, 2)!r}>"

    # one launch a layer: two programs a multiprocessor (the next launch's beside this one's) need <= 128 registers
    for label, extra in (("stages 2", dict(STAGES=2)), ("stages 3", dict(STAGES=3)),
                         ("per layer (PDL)", dict(STAGES=1, PDL=True, maxnreg=128))):
        yield (f"gemv_chain_staged 4096 {label}", gemv_chain_staged._staged_chain_kernel,
               dict(w_desc=desc("i32", 256, 32), s_desc=desc("fp16", 32, 16), z_desc=desc("u8", 32, 8),
                    x_ptr="*fp16", t_ptr="*i64", epoch_ptr="*i32", first="i32", last="i32"),
               dict(K=4096, GROUP=128, BLOCK_N=32, SYNC=True, num_warps=8, **extra), {}, 8, 1)
    # the digit-plane GEMV (Gluon): 128 words a thread held across the wait; two programs a multiprocessor need
    # <= 255 registers without spills (226 when written)
    from qcompile.runtime.triton import gemv_digits

    for pace in (1, 2, 4, 8):
        yield (f"gemv_chain digits 4096 (PDL, pace {pace})", gemv_digits._digits_kernel, DIGITS_TYPES,
               dict(K=4096, LEV_W=3, PDL=True, PACE=pace, num_warps=gemv_digits.WARPS), {}, gemv_digits.WARPS, 1)
    # the runner's decode GEMV on digit planes (q|k|v and gate|up with or without bias, o with the residual), one
    # slice at default_layout's warps (K = 2048: 2): fp16 output only
    for k, bias, res in ((4096, False, False), (4096, True, False), (4096, False, True), (2048, False, False),
                         (2048, True, False), (2048, False, True)):
        splits, warps = gemv_digits.default_layout(k)
        assert splits == 1
        yield (f"gemv_digits K={k} bias={bias} residual={res} (runner, PDL, {warps} warps)",
               gemv_digits._digits_kernel, DIGITS_TYPES,
               dict(K=k, LEV_W=(k // (gemv_digits.GROUP * warps)).bit_length() - 1, PDL=True, PACE=gemv_digits.PACE,
                    HAS_BIAS=bias, HAS_RES=res, DIGITS_OUT=False, num_warps=warps), {}, warps, 1)
    # K in slices (the 4096 x 14336 down projection of Llama-3-8B: 7 of 2048), fp32 partials summed by the last;
    # the 1.2B Llama's K = 2048 in 4 and 2 slices (o with the residual, q|k|v with a bias: the GPU test's cases)
    for k, splits, warps, bias, res in ((14336, 7, 4, False, False), (14336, 7, 2, False, False),
                                        (1536, 3, 4, True, True), (2048, 4, 4, False, True),
                                        (2048, 2, 4, True, False)):
        ks = k // splits
        yield (f"gemv_digits K={k} in {splits} slices, {warps} warps, bias={bias} residual={res} (PDL)",
               gemv_digits._digits_kernel, DIGITS_TYPES,
               dict(K=k, LEV_W=(ks // (gemv_digits.GROUP * warps)).bit_length() - 1, PDL=True, PACE=gemv_digits.PACE,
                    HAS_BIAS=bias, HAS_RES=res, DIGITS_OUT=False, SPLIT=splits, num_warps=warps), {}, warps, 1)


# gemv_digits._digits_kernel's pointer and scalar arguments (here and in its SASS test)
DIGITS_TYPES = dict(w_ptr="*i32", s_ptr="*fp16", z_ptr="*i8", p_in_ptr="*i8", p_out_ptr="*i8", y_ptr="*fp16",
                    b_ptr="*fp16", r_ptr="*fp16", part_ptr="*fp32", lock_ptr="*i32", nil="i32")


def small_cases():
    """The tiny shapes the tests (and tiny models) launch on a GPU: non-dot attention (head_dim 16), batched GEMV
    tiles, padded Hadamard sizes, the Gluon W8A8 kernel's 128 x 128 tile."""
    from qcompile.runtime.triton import act_quant, hadamard, kv_attention, w8a8, wq_matmul

    for dt in ("fp32", "fp16"):
        yield (f"int8_wgmma {dt} small", w8a8._int8_wgmma_kernel, _wgmma_types(128, 128, 128, dt),
               dict(HAS_BIAS=True, GROUP_M=8, STAGES=3, INSTR_N=128, num_warps=4), {}, 4, 0)
        for g, sym in ((16, False), (96, True), (192, False)):
            yield (f"fake_quant {dt} G={g} sym={sym} small", act_quant._fake_quant_kernel,
                   dict(x_ptr=_ptr(dt), y_ptr=_ptr(dt), G="i32", clip="fp32"),
                   dict(QMAX=7 if sym else 15, SYM=sym, BLOCK=1 << (g - 1).bit_length()), {}, 4, 2)
        for d, g, use_dot in ((16, 2, False), (16, 3, False), (32, 3, True)):
            for kv_bits in (16, 8, 4):
                gp = max(16, 1 << (g - 1).bit_length()) if use_dot else 1 << (g - 1).bit_length()
                yield (f"decode_attention {dt} D={d} G={g} kv{kv_bits} small", kv_attention._decode_kernel,
                       _decode_types(dt),
                       dict(NKV=2, G=g, GP=gp, D=d, KV_BITS=kv_bits, BLOCK_S=64, USE_DOT=use_dot, IEEE=dt == "fp32",
                            ON_CODES=kv_attention.attends_on_codes(use_dot, dt == "fp16", kv_bits)),
                       {}, 4, 2)
        for bm, bn, br, split in ((2, 16, 2, 3), (8, 32, 8, 1), (1, 64, 16, 2)):
            types = dict(x_ptr=_ptr(dt), w_ptr="*i32", s_ptr=_ptr(dt), z_ptr="*u8", b_ptr=_ptr(dt), r_ptr=_ptr(dt),
                         out_ptr=_ptr(dt), part_ptr="*fp32", lock_ptr="*i32", M="i32", N="i32", K="i32",
                         stride_xm="i32", stride_rm="i32", stride_om="i32")
            yield (f"gemv {dt} small BM={bm} BN={bn} BR={br} split={split}", wq_matmul._gemv_kernel, types,
                   dict(BITS=4, GROUP=32, HAS_ZERO=True, HAS_BIAS=True, HAS_RES=True, ACT_SILU_MUL=True,
                        HALF2=bm == 1 and dt == "fp16", BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, SPLIT_K=split), {}, 4, 2)
        for n in (16, 96):
            import torch

            _, _, npad = hadamard._plan(n, None, torch.float32 if dt == "fp32" else torch.float16, "cpu")
            yield (f"hadamard dense n={n} {dt} small", hadamard._had_dense_kernel,
                   dict(x_ptr=_ptr(dt), m_ptr=_ptr(dt), y_ptr=_ptr(dt), q_ptr="*i8", qs_ptr="*fp32", M="i32",
                        N="i32", stride_x="i32", stride_y="i32", scale="fp32"),
                   dict(NP=npad, BLOCK_M=32, QUANT=True, QMAX=127, IEEE=dt == "fp32"), {}, 4, 2)
        yield (f"rope_store {dt} D=16 small", kv_attention._rope_store_kernel,
               dict(qkv_ptr=_ptr(dt), pos_ptr="*i32", cos_ptr="*fp32", sin_ptr="*fp32", qn_ptr=_ptr(dt),
                    kn_ptr=_ptr(dt), q_out=_ptr(dt), k_out=_ptr(dt), v_out=_ptr(dt), kf_ptr=_ptr(dt), vf_ptr=_ptr(dt),
                    kq_ptr="*u8", vq_ptr="*u8", ks_ptr="*fp32", kz_ptr="*u8", vs_ptr="*fp32", vz_ptr="*u8",
                    prefix_ptr="*i32", T="i32", stride_qkv="i32", eps="fp32", PCAP="i32", SMAX="i32", clip="fp32"),
               dict(NH=4, NKV=2, D=16, KV_BITS=4, KV_SYM=False, QK_NORM=True, OUT_KV=True, ROPE=True, STORE=True),
               {}, 1, 2)
        for label, nh, rope, store, out_kv in (("rope only", 4, True, False, True),
                                               ("store_kv", 0, False, True, False)):
            yield (f"rope_store {label} {dt} D=16 small", kv_attention._rope_store_kernel,
                   dict(qkv_ptr=_ptr(dt), pos_ptr="*i32", cos_ptr="*fp32", sin_ptr="*fp32", qn_ptr=_ptr(dt),
                        kn_ptr=_ptr(dt), q_out=_ptr(dt), k_out=_ptr(dt), v_out=_ptr(dt), kf_ptr=_ptr(dt),
                        vf_ptr=_ptr(dt), kq_ptr="*u8", vq_ptr="*u8", ks_ptr="*fp32", kz_ptr="*u8", vs_ptr="*fp32",
                        vz_ptr="*u8", prefix_ptr="*i32", T="i32", stride_qkv="i32", eps="fp32", PCAP="i32",
                        SMAX="i32", clip="fp32"),
                   dict(NH=nh, NKV=2, D=16, KV_BITS=8, KV_SYM=True, QK_NORM=False, OUT_KV=out_kv, ROPE=rope,
                        STORE=store), {}, 1, 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="every tuning candidate at the Llama-3-8B shapes")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--filter", default="", help="only labels containing this text")
    ap.add_argument("--small", action="store_true", help="only the tiny shapes the tests launch on a GPU")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    bad = spilled = 0
    todo = small_cases() if args.small else itertools.chain(cases(args.all), small_cases())
    for label, fn, types, consts, ints, warps, stages in todo:
        if args.filter not in label:
            continue
        try:
            r = compile_one(fn, types, consts, ints, warps, stages, args.arch)
        except Exception as e:  # report every failure, keep going
            bad += 1
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            why = " | ".join(lines[-3:]) if lines else ""
            cause = f" <- {type(e.__cause__).__name__}: {e.__cause__}" if e.__cause__ is not None else ""
            print(f"FAIL {label}: {type(e).__name__}: {why}{cause}", flush=True)
            continue
        over = r["shared"] > SHARED_LIMIT
        bad += over
        spilled += r["spills"] > 0
        tag = "FAIL" if over else "SPILL" if r["spills"] else "ok  "
        print(f"{tag} {label}: regs {r['regs']}, spills {r['spills']} B, shared {r['shared']} B", flush=True)
    print(f"aot_check: {bad} failure(s) (compile errors, shared memory over {SHARED_LIMIT} B); {spilled} "
          "configuration(s) spill registers (slower, still correct)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
