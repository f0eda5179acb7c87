"""``_gluon``: Gluon kernels compiled on the GPU, run by Triton's interpreter on the CPU. The Gluon kernels' own tests
(test_gemv_digits, test_gemv_mma, test_w8a8) run them through it against their references; these check the
machinery itself."""

import pytest
import torch

from qcompile.runtime.triton import _gluon
from qcompile.runtime.triton._env import interpreting
from qcompile.runtime.triton._gluon import gl, gluon

INTERPRETED = pytest.mark.skipif(not interpreting(), reason="checks the interpreter's side")


@gluon.jit
def _rows_reversed_kernel(x_ptr, y_ptr, levels_ptr, N: gl.constexpr, num_warps: gl.constexpr):
    """y[i, :] = x[N - 1 - i, :] * 2 for an [N, 32] int32 tile, through layouts, a layout conversion, a reshape
    of ``v.shape[:-1] + [..]`` and a split (a relabelling of registers when compiled); ``levels`` = log2(N) from
    ``v.shape[0].bit_length()``."""
    L: gl.constexpr = gl.BlockedLayout([1, 2], [2, 16], [num_warps, 1], [1, 0])  # split: 2 a thread
    rows = gl.arange(0, N, layout=gl.SliceLayout(1, L))
    cols = gl.arange(0, 32, layout=gl.SliceLayout(0, L))
    v = gl.load(x_ptr + (N - 1 - rows)[:, None] * 32 + cols[None, :])
    lo, hi = gl.split(gl.reshape(v, v.shape[:-1] + [16, 2]))
    w = gl.convert_layout(gl.reshape(gl.join(lo, hi), [N, 32]), L)
    gl.store(y_ptr + rows[:, None] * 32 + cols[None, :], w * 2)
    LEV: gl.constexpr = v.shape[0].bit_length() - 1
    gl.store(levels_ptr + rows * 0, gl.zeros([N], gl.int32, gl.SliceLayout(1, L)) + LEV)


def test_a_gluon_kernel_runs_where_the_tests_run(device):
    """The same Gluon source, compiled on a GPU or interpreted on the CPU, computes what it says; under the
    interpreter, the shape semantics it needs are switched on for the run only (Triton kernels keep theirs)."""
    import triton.language as tl

    x = torch.arange(8 * 32, dtype=torch.int32, device=device).view(8, 32)
    y = torch.zeros_like(x)
    levels = torch.zeros(1, dtype=torch.int32, device=device)
    _rows_reversed_kernel[(1,)](x, y, levels, N=8, num_warps=4)
    assert torch.equal(y.cpu(), x.flip(0).cpu() * 2)
    assert levels.item() == 3
    assert "shape" not in tl.tensor.__dict__


@gluon.jit
def _unknown_ptx_kernel(x_ptr):
    v = gl.load(x_ptr + gl.arange(0, 32, layout=gl.BlockedLayout([1], [32], [1], [0])))
    w = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [v], dtype=gl.int32, is_pure=True, pack=1)
    gl.store(x_ptr + gl.arange(0, 32, layout=gl.BlockedLayout([1], [32], [1], [0])), w)


@INTERPRETED
def test_inline_ptx_without_an_emulation_is_refused_by_name():
    from triton.runtime.errors import InterpreterError

    with pytest.raises(InterpreterError, match="no interpreter emulation is registered .*mov.b32"):
        _unknown_ptx_kernel[(1,)](torch.zeros(32, dtype=torch.int32))


def test_mma_operands_must_put_the_lanes_last():
    """An emulated mma reads lane l of a warp from index l of the operands' last dimension: anything else is a
    kernel whose layout the emulation does not know, refused rather than computed wrong."""
    import numpy as np

    regs, shape = _gluon.lane_registers([np.zeros((4, 32), np.int32), np.zeros((1, 32), np.int32)])
    assert shape == (4, 32) and regs[1].shape == (4, 32)
    with pytest.raises(ValueError, match="32 lanes"):
        _gluon.lane_registers([np.zeros((4, 16), np.int32)])


def test_u8_s8_mma_sums_products_over_k():
    """Independent of where the fragments put each element: A all ones gives, in every C register, B's column
    sums (column 2t + i % 2 of lane (g, t)); B's bytes are read as signed, A's as unsigned."""
    import numpy as np

    rng = np.random.default_rng(0)
    b = [rng.integers(-2**31, 2**31, (3, 32)).astype(np.int64) & 0xFFFFFFFF for _ in range(2)]
    ones = [np.full((3, 32), 0x01010101, np.int64)] * 4
    c = _gluon.mma_m16n8k32_u8_s8(ones, b)
    # column n of B: lane (g = n, t) holds rows 4t + j (register 0) and 16 + 4t + j (register 1)
    signed = [[((r >> (8 * j)) & 0xFF) - (((r >> (8 * j)) & 0x80) << 1) for j in range(4)] for r in b]
    col_sums = np.stack([sum(signed[i][j][:, 4 * n: 4 * n + 4].sum(1) for i in range(2) for j in range(4))
                         for n in range(8)], axis=1)  # [3, 8]
    lane = np.arange(32)
    for i in range(4):
        assert np.array_equal(c[i], col_sums[:, 2 * (lane % 4) + i % 2])
    high = [np.full((3, 32), 0xFFFFFFFF, np.int64)] * 4  # A's bytes as u8: 255, not -1
    assert np.array_equal(_gluon.mma_m16n8k32_u8_s8(high, b)[0], 255 * c[0])
