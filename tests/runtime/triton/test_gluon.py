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


_IDENTITY_PTX = "mov.b32 $0, $1; // qcompile test: one register through"


@_gluon.emulates(_IDENTITY_PTX)
def _identity_emulated(x):
    return _gluon.from_numpy(_gluon.as_numpy(x), gl.int32)


@gluon.jit
def _ptx_lanes_kernel(x_ptr, LANES_LAST: gl.constexpr):
    """An inline-PTX operand laid out with the lanes on its last dimension, or (``LANES_LAST=False``) on the first."""
    if LANES_LAST:
        L: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [1, 1], [1, 0])
    else:
        L: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [1, 1], [1, 0])
    rows = gl.arange(0, 32, layout=gl.SliceLayout(1, L))
    offs = rows[:, None] * 32 + gl.arange(0, 32, layout=gl.SliceLayout(0, L))[None, :]
    v = gl.convert_layout(gl.load(x_ptr + offs), L)
    w = gl.inline_asm_elementwise(_IDENTITY_PTX, "=r,r", [v], dtype=gl.int32, is_pure=True, pack=1)
    gl.store(x_ptr + offs, w + 1)


@INTERPRETED
def test_inline_ptx_operands_must_hold_the_lanes_on_their_last_dimension():
    """The emulations read lane l of a warp at index l of the last dimension: an operand laid out otherwise (a
    layout change that would make the GPU's lanes hold other elements) is refused, not computed wrong."""
    from triton.runtime.errors import InterpreterError

    x = torch.zeros(32, 32, dtype=torch.int32)
    _ptx_lanes_kernel[(1,)](x, LANES_LAST=True)
    assert torch.equal(x, torch.ones_like(x))
    with pytest.raises(InterpreterError, match=r"threads per warp, warps\) \(1, 1, 1\), not \(1, 32, 1\)"):
        _ptx_lanes_kernel[(1,)](x, LANES_LAST=False)


def test_mma_operands_must_put_the_lanes_last():
    """An emulated mma takes operands whose last dimension is a warp's 32 lanes (and broadcasts the others)."""
    import numpy as np

    regs, shape = _gluon.lane_registers([np.zeros((4, 32), np.int32), np.zeros((1, 32), np.int32)])
    assert shape == (4, 32) and regs[1].shape == (4, 32)
    with pytest.raises(ValueError, match="32 lanes"):
        _gluon.lane_registers([np.zeros((4, 16), np.int32)])


def test_u8_s8_mma_sums_products_over_k():
    """Independent of where the fragments put each element along K: A all ones gives, in every C register, B's
    column sums (column 2t + i % 2 of lane (g, t)), B all ones A's row sums; B's bytes are read as signed, A's as
    unsigned."""
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
    # B all ones: every C register holds A's row sums (row g + 8 (i // 2) of lane (g, t))
    a = [rng.integers(0, 2**32, (3, 32)).astype(np.int64) for _ in range(4)]
    c = _gluon.mma_m16n8k32_u8_s8(a, [np.full((3, 32), 0x01010101, np.int64)] * 2)
    # row r of A: lanes with g = r % 8, registers i with i % 2 = r // 8
    row_sums = np.stack([sum(((a[i] >> (8 * j)) & 0xFF)[:, 4 * (r % 8): 4 * (r % 8) + 4].sum(1)
                             for i in range(4) if i % 2 == r // 8 for j in range(4)) for r in range(16)], axis=1)
    for i in range(4):
        assert np.array_equal(c[i], row_sums[:, lane // 4 + 8 * (i // 2)])


def test_f16_mma_sums_products_over_k():
    """The fp16 mma the same two ways: A all ones gives B's column sums, B all ones A's row sums (distinct
    columns and rows, so a column or row read from the wrong lane changes the result)."""
    import numpy as np

    rng = np.random.default_rng(1)
    lane = np.arange(32)

    def regs(n):
        return [_gluon.pack_halves(rng.integers(-64, 64, (2, 32)) / 8, rng.integers(-64, 64, (2, 32)) / 8)
                for _ in range(n)]

    one = _gluon.pack_halves(np.ones((2, 32)), np.ones((2, 32)))
    b = regs(2)
    c = _gluon.mma_m16n8k16_f16_f32([one] * 4, b)
    # column n of B: lanes with g = n, registers i, halves h (rows 2t + h + 8i)
    col_sums = np.stack([sum(_gluon.halves(b[i])[h][:, 4 * n: 4 * n + 4].sum(1) for i in range(2) for h in range(2))
                         for n in range(8)], axis=1)
    for i in range(4):
        assert np.array_equal(c[i], col_sums[:, 2 * (lane % 4) + i % 2].astype(np.float32))
    a = regs(4)
    c = _gluon.mma_m16n8k16_f16_f32(a, [one] * 2, c)  # and C accumulates
    row_sums = np.stack([sum(_gluon.halves(a[i])[h][:, 4 * (r % 8): 4 * (r % 8) + 4].sum(1)
                             for i in range(4) if i % 2 == r // 8 for h in range(2)) for r in range(16)], axis=1)
    for i in range(4):
        want = row_sums[:, lane // 4 + 8 * (i // 2)] + col_sums[:, 2 * (lane % 4) + i % 2]
        assert np.allclose(c[i], want, rtol=0, atol=1e-6)
