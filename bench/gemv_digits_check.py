"""Is the digit-plane chain deterministic, and where does it differ from the exact GEMV? One seeded chain of four
4096 x 4096 layers, run five times: bitwise agreement between runs, and each layer's worst error in fp16 ulps of
the float64 reference (with the size of the terms at that output). On 2026-12-07 (twenty-fourth session) it also
compared the kernel's variants of that day (zero planes skipped, an early release, ``.cg`` loads): all bitwise
equal, at most 0.49 ulp (``bench/results/device_2026-12-07_s24/call8``). It runs every pace of the word loads
(``pace`` 4, the default, then 2, 1 and 8) and checks that they give the same bits.

    python bench/gemv_digits_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qcompile.quant.grid import QuantizedWeight, QuantSpec  # noqa: E402
from qcompile.runtime.triton import gemv_digits as gd  # noqa: E402
from qcompile.runtime.triton.gemv_chain import stack_chain  # noqa: E402
from qcompile.runtime.triton.packing import pack_from_export  # noqa: E402
from qcompile.runtime.triton.reference import dequantize_packed  # noqa: E402


def main() -> None:
    n, layers = 4096, 4
    gen = torch.Generator().manual_seed(0)
    pws = []
    for _ in range(layers):
        w = torch.randn(n, n, generator=gen) / n**0.5
        qw = QuantizedWeight.from_float(w, QuantSpec(bits=4, symmetric=False, group_size=128))
        pws.append(pack_from_export(qw.qweight, qw.scale, qw.zero, bits=4, dtype=torch.float16))
    wd = [dequantize_packed(pw).double() for pw in pws]  # [K, N] float64 (fp16 scales)
    dc = gd.stack_digits(stack_chain([pw.to("cuda") for pw in pws]))
    x = torch.randn(n, generator=gen).to(torch.float16).cuda()
    runs = []
    for pace in (4, 4, 4, 4, 4, 2, 1, 8):
        planes = torch.zeros(layers + 1, 8, n, dtype=torch.int8, device="cuda")
        planes[0] = gd.digit_planes(x)
        out = torch.zeros(layers + 1, n, dtype=torch.float16, device="cuda")
        out[0] = x
        gd.gemv_digits_chain(planes, dc, out, pace=pace)
        torch.cuda.synchronize()
        runs.append(out.cpu())
    line = (f"gemv_digits_chain: 5 runs (pace 4) bitwise equal {all(torch.equal(r, runs[0]) for r in runs[:5])}, "
            f"pace 2, 1 and 8 the same bits {all(torch.equal(r, runs[0]) for r in runs[5:])}")
    for layer in range(layers):
        xin = runs[0][layer].double()
        ref = xin @ wd[layer]
        mag = xin.abs() @ wd[layer].abs()  # the terms' size at each output
        got = runs[0][layer + 1].double()
        ulp = torch.finfo(torch.float16).eps * ref.abs().clamp_min(2.0**-14)
        e = (got - ref).abs() / ulp
        i = int(e.argmax())
        line += (f" | L{layer}: max {e.max():.2f} ulp (ref {ref[i]:.3g}, terms {mag[i]:.3g}), "
                 f">1.01 ulp at {int((e > 1.01).sum())}")
    print(line, flush=True)

if __name__ == "__main__":
    main()
