"""Kernels reading activation rows that begin past 2^31 elements: ``python rows_past_int32.py CHECK DEVICE``.

A row-major tensor of 2^31 elements or more (a long prompt's activations: 75k tokens of a 70B model's 28672-wide
MLP) puts its last rows' offsets past int32. Each check gives a kernel the same few rows twice: contiguous, and as
a view whose row stride puts later rows (or later row tiles) past 2^31 elements, with the in-tile rows within int32
as in a real tensor; the outputs must be equal. The view's storage is mostly untouched memory (virtual on the
CPU). The tests run each check in a subprocess: with int32 offsets the load lands outside the tensor, which is a
crash (segfault on the CPU, an illegal address on the GPU), not an assertion.
"""

import sys

import torch

TILE_M = 16  # the row tile pinned for the GEMMs; the stride keeps TILE_M rows within int32, not 2 * TILE_M


def far_rows(x: torch.Tensor, stride: int) -> torch.Tensor:
    """``x`` [M, K] as a view with row stride ``stride`` (same values)."""
    m, k = x.shape
    store = torch.empty(stride * (m - 1) + k, dtype=x.dtype, device=x.device)
    view = store.as_strided((m, k), (stride, 1))
    view.copy_(x)
    return view


def check_rms_norm(device):
    from qcompile.runtime.triton.norm import rms_norm

    x = torch.randn(3, 64, device=device, dtype=torch.float16)
    w = torch.rand(64, device=device, dtype=torch.float16) + 0.5
    far = far_rows(x, 2**30 + 64)  # row 2 starts at 2^31 + 128
    assert torch.equal(rms_norm(far, w, 1e-6), rms_norm(x, w, 1e-6))


def check_rope_store(device):
    from qcompile.runtime.triton.kv_attention import KVCache, rope_store

    nh, nkv, d, t = 4, 2, 32, 3
    qkv = torch.randn(t, (nh + 2 * nkv) * d, device=device, dtype=torch.float16)
    far = far_rows(qkv, 2**30 + 256)
    ang = torch.arange(t).float()[:, None] / (10000 ** (torch.arange(0, d, 2).float() / d))[None]
    cos, sin = ang.cos().to(device), ang.sin().to(device)
    pos = torch.arange(t, dtype=torch.int32, device=device)
    prefix = torch.tensor([1], dtype=torch.int32, device=device)
    outs = []
    for x in (qkv, far):
        cache = KVCache.allocate(1, nkv, d, 8, 8, prefix_capacity=2, dtype=torch.float16, device=device)
        q, k, v = rope_store(x, pos, t, cos, sin, cache, prefix, nh, nkv, out_kv=True)
        outs.append((q, k, v, cache.k_float, cache.k_q, cache.v_q, cache.k_scale, cache.v_zero))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def check_wq_gemm(device):
    from qcompile.quant.grid import QuantizedWeight, QuantSpec
    from qcompile.runtime.triton.packing import pack_from_export
    from qcompile.runtime.triton.wq_matmul import GEMV_MAX_M, gemm_candidates, wq_linear

    n, k, m = 64, 64, 2 * TILE_M  # the second row tile starts past 2^31 elements
    assert m > GEMV_MAX_M
    qw = QuantizedWeight.from_float(torch.randn(n, k), QuantSpec(bits=4, symmetric=False, group_size=32))
    pw = pack_from_export(qw.qweight, qw.scale, qw.zero, bits=4, dtype=torch.float16).to(device)
    cfg = {**gemm_candidates(m, n, k, 32, False, 4)[0], "BLOCK_M": TILE_M}
    x = torch.randn(m, k, device=device, dtype=torch.float16)
    far = far_rows(x, 2**31 // TILE_M + 64)
    assert torch.equal(wq_linear(far, pw, config=cfg), wq_linear(x, pw, config=cfg))


def check_int_gemm(device):
    from qcompile.quant.grid import QuantizedWeight, QuantSpec
    from qcompile.runtime.triton.packing import pack_int_gemm
    from qcompile.runtime.triton.w8a8 import int_gemm_candidates, int_linear

    n, k, m = 64, 64, 2 * TILE_M
    for bits, group in ((4, None), (8, 32)):  # the pointer kernel: nibble weights, and int8 weights in groups
        qw = QuantizedWeight.from_float(torch.randn(n, k), QuantSpec(bits=bits, symmetric=True, group_size=group))
        pw = pack_int_gemm(qw.qweight, qw.scale, None, bits=bits).to(device)
        cfg = {**int_gemm_candidates(m, n, k, pw)[0], "BLOCK_M": TILE_M}
        qmax = 2 ** (bits - 1) - 1
        xq = torch.randint(-qmax - 1, qmax + 1, (m, k), dtype=torch.int8, device=device)
        xs = torch.rand(m, device=device) + 0.1
        far = far_rows(xq, 2**31 // TILE_M + 64)
        got = int_linear(far, xs, pw, config=cfg, tma=False)
        assert torch.equal(got, int_linear(xq, xs, pw, config=cfg, tma=False))


def run_in_subprocess(check: str, device: str) -> None:
    """``check`` in a subprocess (int32 row offsets crash it rather than fail an assert): the tests' entry."""
    import os
    import subprocess
    from pathlib import Path

    import qcompile

    # the child imports the qcompile this process tests (its sys.path[0] is tests/, where an installed copy from
    # another checkout would otherwise win)
    root = str(Path(qcompile.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__, check, device, qcompile.__file__], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        f"{check} on rows past 2^31 elements: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


CHECKS = {"rms_norm": check_rms_norm, "rope_store": check_rope_store, "wq_gemm": check_wq_gemm,
          "int_gemm": check_int_gemm}

if __name__ == "__main__":
    if len(sys.argv) > 3:  # the parent's qcompile: the kernels checked must be the ones it tests
        import qcompile

        assert qcompile.__file__ == sys.argv[3], (qcompile.__file__, sys.argv[3])
    CHECKS[sys.argv[1]](sys.argv[2])
    print("ok")
