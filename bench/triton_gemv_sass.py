"""Instructions per code in the int4 GEMV's inner loop, from the SASS: float-mantissa path, half2 path, half2 row
pairs.

Compiles ``wq_matmul._gemv_kernel`` for sm_90 on this machine (Triton's bundled ptxas and cuobjdump; no GPU),
finds the loop (the longest backward branch) and divides its instruction count by the codes one thread decodes per
iteration. A static count: it says how much work the loop issues, not how fast it runs.

    python bench/triton_gemv_sass.py --tiles 64x16x4,64x8x4,512x8x4
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def loop_mix(cubin: bytes) -> tuple[int, collections.Counter]:
    from qcompile.runtime.triton.aot_check import sass_text

    sass = sass_text(cubin)
    ins = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in
           re.finditer(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\d\s+)?([A-Z0-9_.]+)([^;]*);", sass)]
    best = None
    for addr, op, rest in ins:
        t = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if t and int(t.group(1), 16) < addr and (best is None or addr - int(t.group(1), 16) > best[1] - best[0]):
            best = (int(t.group(1), 16), addr)
    body = [op.split(".")[0] for a, op, _ in ins if best and best[0] <= a <= best[1]]
    return len(body), collections.Counter(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", default="64x16x4,64x8x4", help="BLOCK_N x BLOCK_R x warps, comma separated")
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args()
    from qcompile.runtime.triton import wq_matmul
    from qcompile.runtime.triton.aot_check import compile_one

    types = dict(x_ptr="*fp16", w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8", b_ptr="*fp16", r_ptr="*fp16",
                 out_ptr="*fp16", part_ptr="*fp32", lock_ptr="*i32", M="i32", N="i32", K="i32", stride_xm="i32",
                 stride_rm="i32", stride_om="i32")
    for tile in args.tiles.split(","):
        bn, br, warps = (int(v) for v in tile.split("x"))
        for half2, pairs in ((False, False), (True, False), (True, True)):
            consts = dict(BITS=4, GROUP=args.group, HAS_ZERO=True, HAS_BIAS=False, HAS_RES=False,
                          ACT_SILU_MUL=False, HALF2=half2, BLOCK_M=1, BLOCK_N=bn, BLOCK_R=br, SPLIT_K=8, PAIRS=pairs)
            path = "half2 pairs" if pairs else "half2" if half2 else "float"
            stats = compile_one(wq_matmul._gemv_kernel, types, consts, dict(N=4096, K=4096, stride_xm=4096,
                                stride_rm=4096, stride_om=4096), warps, 2, keep_cubin=True)
            n, mix = loop_mix(stats["cubin"])
            codes = br * 8 * bn / (warps * 32)
            print(f"{bn}x{br} tiles, {warps} warps, {path}: {n} instructions per loop, "
                  f"{n / codes:.2f} per code; top: {', '.join(f'{k} {v}' for k, v in mix.most_common(6))}")


if __name__ == "__main__":
    main()
