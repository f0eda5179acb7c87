"""How the int4 GEMV's two half2 decodes round, emulated on the CPU (no GPU): the per-word decode (``_dot8_half2``:
weights dequantized to fp16 per code as a DequantizeLinear would, four fp16 fma to a lane) and the row pairs
(``_pairs_step``: (c - z) exact, activations times 1/32, eight fp16 fma to a lane, the scale in fp32), against the
exact product and against HF's fp16 matmul (fp16-dequantized weights, fp32 accumulation). Each fp16 fma is
emulated as a product and sum in fp32 rounded once to fp16.

    python bench/gemv_pairs_rounding.py [--k 2048 --n 512 --group 128 --seed 0]
"""

from __future__ import annotations

import argparse

import torch


def h(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    k, n, g = a.k, a.n, a.group
    torch.manual_seed(a.seed)
    c = torch.randint(0, 16, (k, n)).float()
    z = torch.randint(0, 16, (k // g, n)).float().repeat_interleave(g, 0)
    s = h(torch.rand(k // g, n) * 0.02 + 1e-3).repeat_interleave(g, 0)
    x = h(torch.randn(k))
    w16 = h((c - z) * s)
    hf = (x[:, None] * w16).sum(0)
    exact = (x[:, None] * (c - z) * s).sum(0)
    # per word: lanes (x0,x4) (x1,x5) (x2,x6) (x3,x7) of eight codes
    xw, ww = x.view(k // 8, 8), w16.view(k // 8, 8, n)
    lane = torch.zeros(k // 8, 2, n)
    for j in range(4):
        for side, jj in enumerate((j, j + 4)):
            lane[:, side] = h(xw[:, jj, None] * ww[:, jj] + lane[:, side])
    word = (lane[:, 0] + lane[:, 1]).sum(0)
    # row pairs: two words (16 codes) of a column per lane pair
    xp, cp = h(x / 32).view(k // 16, 16), (c - z).view(k // 16, 16, n)
    lane = torch.zeros(k // 16, 2, n)
    for wi in range(2):
        for j in range(4):
            for side, jj in enumerate((j, j + 4)):
                q = wi * 8 + jj
                lane[:, side] = h(xp[:, q, None] * cp[:, q] + lane[:, side])
    pairs = ((lane[:, 0] + lane[:, 1]) * s.view(k // 16, 16, n)[:, 0]).sum(0) * 32
    top = exact.abs().max()
    for name, y in (("per word", word), ("row pairs", pairs), ("HF fp16", hf)):
        rms = ((y - hf).pow(2).mean().sqrt() / top).item()
        print(f"{name:9s}: max |y - exact| {((y - exact).abs().max() / top).item():.2e}, max |y - HF| "
              f"{((y - hf).abs().max() / top).item():.2e}, rms y - HF {rms:.2e} (of max |exact|)")


if __name__ == "__main__":
    main()
