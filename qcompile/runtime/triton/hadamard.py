"""Online Walsh-Hadamard transform ``y = x @ kron(H_m, H_p) / sqrt(n)`` along the last dim, n = m * p, p = 2^k.

H_p is Sylvester's; the factorization n = m * p and H_m (m = 1 for powers of two, else a Hadamard order such as
12, 20, 28, 36, 76, 148, 344) come from ``qcompile.quant.hadamard`` (``hadamard_factors``, ``hadamard_matrix``),
so the runtime applies exactly the matrix the rotation pass folded into the weights; without that module, from
the prime-field Paley constructions below. Pass ``left=`` to use any other +-1 matrix of order m.

How it runs: with the row viewed as a matrix X [R, C] (row-major, n = R * C, C = 2^c), ``x @ kron(P, H_C)`` is
``P^T X H_C`` where ``P = kron(H_m, H_{2^(k-c)})`` (Sylvester matrices split as Kronecker products). So one
program per row does two tensor-core matmuls with constant matrices (the first in K-chunks read from L2) instead
of log2(n) butterfly passes over shuffled registers; ±1 entries are exact in fp16, each stage is normalized (1/sqrt(R),
then 1/sqrt(C)) so the fp16 intermediate cannot overflow. Rows of n <= 128 use one dense [n, n] matrix on a block of
rows. Both kernels can quantize the result per token in the epilogue (the fused producer of a W4A4/W8A8 down_proj).
"""

from __future__ import annotations

import functools
import math

import torch

from qcompile.errors import QCompileError
from qcompile.runtime.triton._env import interpreting, require_triton
from qcompile.runtime.triton.reference import sylvester

triton = require_triton()
import triton.language as tl  # noqa: E402

from qcompile.runtime.triton._jit import MIN_SCALE, round_half_even, row_ptr, tile_rows  # noqa: E402

MAX_DENSE = 128  # rows up to this size: one dense matrix
MAX_TILE = 32768  # elements of the [R, C] tile one program holds (fp32 accumulators: 64 per thread at 16 warps)
MAX_C = 256


# -- Hadamard matrices of non-power-of-two order ------------------------------------------------------------


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]  # Q[i, j] = chi(j - i)


def paley(m: int) -> torch.Tensor:
    """A Hadamard matrix of order m from Paley's constructions over a prime field: I (m = q + 1, q = 3 mod 4) or II
    (m = 2(q + 1), q = 1 mod 4). Raises for orders neither reaches with a prime q."""
    q = m - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        h = torch.eye(m, dtype=torch.float64) + s
    elif m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        q = m // 2 - 1
        s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, 1, _jacobsthal(q)
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        h = torch.kron(s, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    else:
        raise ValueError(f"no Paley construction over a prime field gives a Hadamard matrix of order {m}")
    if not torch.equal(h @ h.t(), m * torch.eye(m, dtype=torch.float64)):
        raise AssertionError(f"Paley construction of order {m} is not Hadamard")
    return h


PALEY_ORDERS = (12, 20, 28, 36, 44, 60, 68, 76, 84, 108, 124)


def _shared():
    """The rotation pass's Hadamard module, if this checkout has it."""
    try:
        from qcompile.quant import hadamard
    except ImportError:
        return None
    return hadamard


@functools.cache
def left_matrix(m: int) -> torch.Tensor:
    """H_m as a float64 +-1 matrix: the shared module's base matrix when present, else Paley's."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    shared = _shared()
    if shared is None:
        return paley(m)
    h = torch.round(torch.as_tensor(shared.hadamard_matrix(m)).double() * math.sqrt(m))
    if not h.abs().eq(1).all() or not torch.equal(h @ h.t(), m * torch.eye(m, dtype=torch.float64)):
        raise AssertionError(f"qcompile.quant.hadamard.hadamard_matrix({m}) * sqrt({m}) is not a +-1 Hadamard matrix")
    return h


def split_order(n: int) -> int:
    """The base order m of n = m * 2^k: the shared module's choice when present, else the smallest Paley order."""
    shared = _shared()
    if shared is not None:
        try:
            return shared.hadamard_factors(n)[0]
        except QCompileError as e:
            raise ValueError(str(e)) from e
    for m in (1, *PALEY_ORDERS):
        if n % m == 0 and (n // m) & (n // m - 1) == 0:
            return m
    raise ValueError(f"no Hadamard transform of size {n}: it must be m * 2^k with m in {(1, *PALEY_ORDERS)}")


# -- kernels ---------------------------------------------------------------------------------------------


@triton.jit
def _quant_store(y, q_ptr, s_ptr, row, offs, mask, QMAX: tl.constexpr):
    scale = tl.maximum(tl.div_rn(tl.max(tl.max(tl.abs(y), axis=1), axis=0), QMAX), MIN_SCALE)
    q = tl.minimum(tl.maximum(round_half_even(tl.div_rn(y, scale)), -QMAX - 1), QMAX)
    tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _had_2d_kernel(x_ptr, l_ptr, h_ptr, y_ptr, q_ptr, qs_ptr, R, C, stride_x, stride_y, s1, s2,
                   RP: tl.constexpr, CP: tl.constexpr, BK: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
                   IEEE: tl.constexpr):
    row = tl.program_id(0)
    r = tl.arange(0, RP)
    c = tl.arange(0, CP)
    x_row = row_ptr(x_ptr, row, stride_x)
    t = tl.zeros((RP, CP), dtype=tl.float32)
    for k0 in tl.static_range(0, RP, BK):  # t = P^T X, K-chunks of X re-read from L2
        kr = k0 + tl.arange(0, BK)
        lt = tl.load(l_ptr + r[:, None] * RP + kr[None, :])
        xk = tl.load(x_row + kr[:, None] * C + c[None, :], mask=(kr < R)[:, None] & (c < C)[None, :], other=0.0)
        if IEEE:
            t = tl.dot(lt, xk, t, input_precision="ieee")
        else:
            t = tl.dot(lt, xk, t)
    hc = tl.load(h_ptr + c[:, None] * CP + c[None, :])
    if IEEE:
        y = tl.dot((t * s1).to(hc.dtype), hc, input_precision="ieee") * s2
    else:
        y = tl.dot((t * s1).to(hc.dtype), hc) * s2
    mask = (r < R)[:, None] & (c < C)[None, :]
    inner = r[:, None] * C + c[None, :]
    if QUANT:
        _quant_store(y, row_ptr(q_ptr, row, stride_y), qs_ptr, row, inner, mask, QMAX)
    else:
        tl.store(row_ptr(y_ptr, row, stride_y) + inner, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _had_dense_kernel(x_ptr, m_ptr, y_ptr, q_ptr, qs_ptr, M, N, stride_x, stride_y, scale,
                      NP: tl.constexpr, BLOCK_M: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
                      IEEE: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, NP)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    x = tl.load(tile_rows(x_ptr, m0, rows, stride_x) + cols[None, :], mask=mask, other=0.0)
    h = tl.load(m_ptr + cols[:, None] * NP + cols[None, :])
    if IEEE:
        y = tl.dot(x, h, input_precision="ieee") * scale
    else:
        y = tl.dot(x, h) * scale
    if QUANT:  # per row: one quantizer per token
        s = tl.maximum(tl.div_rn(tl.max(tl.abs(y), axis=1), QMAX), MIN_SCALE)
        q = tl.minimum(tl.maximum(round_half_even(tl.div_rn(y, s[:, None])), -QMAX - 1), QMAX)
        tl.store(tile_rows(q_ptr, m0, rows, stride_y) + cols[None, :], q.to(tl.int8), mask=mask)
        tl.store(qs_ptr + rows, s, mask=rows < M)
    else:
        tl.store(tile_rows(y_ptr, m0, rows, stride_y) + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


# -- plans -----------------------------------------------------------------------------------------------


def warps_2d(rp: int, cp: int, fp32: bool) -> int:
    """Warps for the two-stage kernel: enough threads for the [RP, CP] tile (fp32 FMA dots need twice as many)."""
    elems = rp * cp * (2 if fp32 else 1)
    return 4 if elems <= 4096 else 8 if elems <= 16384 else 16


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.cache  # never evicted: a CUDA graph captured on a plan's matrices keeps their addresses (few plans a model)
def _plan(n: int, left_key, dtype: torch.dtype, device: str):
    left = left_matrix(split_order(n)) if left_key is None else torch.tensor(left_key, dtype=torch.float64)
    m = left.shape[0]
    if n % m or (n // m) & (n // m - 1):
        raise ValueError(f"size {n} is not {m} * 2^k for a left factor of order {m}")
    p = n // m
    if n <= MAX_DENSE:
        npad = max(16, _pow2(n))
        full = torch.zeros(npad, npad, dtype=torch.float64)
        full[:n, :n] = torch.kron(left, sylvester(p, torch.float64))
        return ("dense", full.to(device, dtype), npad)
    c = min(p, 128)
    while max(16, _pow2(n // c)) * max(16, c) > MAX_TILE and c < min(p, MAX_C):
        c *= 2
    r = n // c
    rp, cp = max(16, _pow2(r)), max(16, c)
    if rp * cp > MAX_TILE:
        raise ValueError(f"Hadamard size {n} = {m} * {p} needs a {rp} x {cp} tile, more than one program holds "
                         f"({MAX_TILE} elements)")
    lt = torch.zeros(rp, rp, dtype=torch.float64)
    lt[:r, :r] = torch.kron(left, sylvester(r // m, torch.float64)).t()
    hc = torch.zeros(cp, cp, dtype=torch.float64)
    hc[:c, :c] = sylvester(c, torch.float64)
    return ("2d", (lt.to(device, dtype), hc.to(device, dtype)), (r, c, rp, cp))


def hadamard_transform(x: torch.Tensor, *, left: torch.Tensor | None = None, scale: float | None = None,
                       quant_bits: int | None = None):
    """``x @ kron(left, H_p) * scale`` over the last dim (default left: ``left_matrix(split_order(n))``, default
    scale 1/sqrt(n): orthonormal). With ``quant_bits`` (4 or 8) returns the per-token quantized result instead:
    (int8 [.., n], float32 scales [..])."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    rows = x2.shape[0]
    left_key = None if left is None else tuple(map(tuple, torch.as_tensor(left).double().tolist()))
    kind, mats, geo = _plan(n, left_key, x.dtype, str(x.device))
    extra = (1.0 if scale is None else scale * math.sqrt(n))
    ieee = x.dtype == torch.float32
    qmax = 0 if quant_bits is None else 2 ** (quant_bits - 1) - 1
    if quant_bits is not None:
        out = torch.empty((rows, n), dtype=torch.int8, device=x.device)
        qs = torch.empty((rows,), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty_like(x2)
        qs = out
    if kind == "dense":
        npad = geo
        block_m = 16 if npad >= 128 else 32
        opts = {} if interpreting() else {"num_warps": 8 if ieee and npad >= 128 else 4}
        _had_dense_kernel[(triton.cdiv(rows, block_m),)](
            x2, mats, out, out, qs, rows, n, x2.stride(0), out.stride(0), extra / math.sqrt(n),
            NP=npad, BLOCK_M=block_m, QUANT=quant_bits is not None, QMAX=qmax, IEEE=ieee, **opts)
    else:
        lt, hc = mats
        r, c, rp, cp = geo
        opts = {} if interpreting() else {"num_warps": warps_2d(rp, cp, ieee)}
        _had_2d_kernel[(rows,)](
            x2, lt, hc, out, out, qs, r, c, x2.stride(0), out.stride(0), 1.0 / math.sqrt(r), extra / math.sqrt(c),
            RP=rp, CP=cp, BK=min(rp, 64), QUANT=quant_bits is not None, QMAX=qmax, IEEE=ieee, **opts)
    if quant_bits is not None:
        return out.reshape(*x.shape[:-1], n), qs.reshape(x.shape[:-1])
    return out.reshape(x.shape)
