"""Hadamard and random orthogonal matrices for rotations (QuaRot/SpinQuant R1-R4), and a fast transform.

A Hadamard matrix of order n has entries ±1 and ``H Hᵀ = n I``; ``H / sqrt(n)`` is orthogonal. We build order
``n = m · 2^k`` as the Kronecker product ``H_m ⊗ S_{2^k}`` of a *base* matrix and a Sylvester one, with the
smallest base order m that one of these constructions reaches:

* ``m ∈ {1, 2}``: Sylvester (n a power of two);
* Paley I, ``m = q + 1`` with q a prime power, q ≡ 3 (mod 4) (e.g. 12 = 11+1, 20, 24, 28 = 27+1, 44, 48, 60);
* Paley II, ``m = 2(q + 1)`` with q a prime power, q ≡ 1 (mod 4) (e.g. 12 = 2·6, 28 = 2·14, 36 = 2·18, 52 = 2·26
  over GF(25), 76 = 2·38, 148 = 2·74);
* the Kronecker product of two such Paley orders;
* base orders up to ``MAX_BASE_ORDER``.

Prime fields are preferred: where an order has a Paley construction over a prime field and one over GF(p^k), the
prime one is used (28 comes from Paley II q=13, not Paley I q=27). Orders that only prime powers reach (52 via
GF(25), 344 via GF(343) for Llama-2's 11008 = 344·32) use a small GF(p^k) implementation. Every base matrix is
checked on construction: ``H Hᵀ = m I`` exactly (float64 products of ±1 entries are exact integers), so a wrong
construction raises instead of silently rotating by a non-orthogonal matrix.

Not reachable here (no Williamson/Turyn/Goethals-Seidel constructions): base orders such as 92, 116, 156, 172,
184, 188; and any n that is not 1, 2 or a multiple of 4 (no Hadamard matrix exists). Such n raise a
``RecipeError`` naming the nearest supported sizes. Model sizes that are covered: SmolLM2-135M (576 = 36·16,
1536 = 12·128, head_dim 64), Qwen2-0.5B (896 = 28·32, 4864 = 76·64), Llama-3-8B / Mistral-7B (4096, 14336 =
28·512), Llama-2-7B (11008 = 344·32), Qwen2.5-7B (3584 = 28·128, 18944 = 148·128).

:func:`apply_hadamard` computes ``x @ (H_m ⊗ S_{2^k}) / sqrt(n)`` on the last dimension without the dense matrix:
reshape to ``[..., m, 2^k]``, a fast Walsh-Hadamard transform on the 2^k part (its lowest 64 as one small GEMM,
butterflies above), one m×m matmul on the other. The torch model uses it for online R4, so it is the reference
the graph's online rotations are checked against.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from qcompile.errors import RecipeError

MAX_BASE_ORDER = 4096  # largest non-Sylvester factor constructed (its m×m matmul is the transform's cost)


# -- number theory -----------------------------------------------------------------------------------------
def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k for a prime p, or None."""
    if q < 2:
        return None
    for p in range(2, math.isqrt(q) + 1):
        if q % p == 0:
            k = 0
            while q % p == 0:
                q //= p
                k += 1
            return (p, k) if q == 1 else None
    return (q, 1)


def _paley_kind(m: int) -> tuple[str, int] | None:
    """('paley1'|'paley2', q) reaching order m, preferring a prime field over GF(p^k)."""
    options = []
    if m % 4 == 0:
        pp = _prime_power(m - 1)  # m - 1 ≡ 3 (mod 4) automatically
        if pp:
            options.append(("paley1", m - 1, pp[1]))
        if m % 8 == 4:  # then m/2 - 1 ≡ 1 (mod 4)
            pp = _prime_power(m // 2 - 1)
            if pp:
                options.append(("paley2", m // 2 - 1, pp[1]))
    if not options:
        return None
    kind, q, _ = min(options, key=lambda o: (o[2] > 1, o[1]))  # prime field first, then the smaller field
    return kind, q


def _base_construction(m: int) -> tuple | None:
    """How base order m is built: ('sylvester',), ('paley1', q), ('paley2', q), ('kron', a, b), or None."""
    if m in (1, 2):
        return ("sylvester",)
    if m % 4 or m > MAX_BASE_ORDER:
        return None
    paley = _paley_kind(m)
    if paley:
        return paley
    for a in range(12, math.isqrt(m) + 1, 4):
        if m % a == 0 and (m // a) % 4 == 0 and _paley_kind(a) and _paley_kind(m // a):
            return ("kron", a, m // a)
    return None


@lru_cache(maxsize=None)
def _factor(n: int) -> tuple[int, int, tuple] | None:
    """(m, 2^k, construction of m) with n = m·2^k and the smallest constructible m; None if unsupported."""
    if not isinstance(n, int) or n < 1:
        return None
    odd, twos = n, 0
    while odd % 2 == 0:
        odd //= 2
        twos += 1
    for b in range(twos + 1):
        m = odd << b
        how = _base_construction(m)
        if how:
            return m, n // m, how
    return None


def supported_hadamard_order(n: int) -> bool:
    """True if :func:`hadamard_matrix` can build order ``n`` (cheap: no matrix is built)."""
    return _factor(n) is not None


def nearest_supported_orders(n: int) -> tuple[int | None, int]:
    """The largest supported order below ``n`` (None if none) and the smallest above it."""
    lo = next((k for k in range(n - 1, 0, -1) if supported_hadamard_order(k)), None)
    hi = next(k for k in range(n + 1, 2 * n + 3) if supported_hadamard_order(k))  # 2^ceil(log2 n) is always there
    return lo, hi


def hadamard_factors(n: int) -> tuple[int, int]:
    """(m, 2^k): the base order and Sylvester order whose Kronecker product is order ``n``; RecipeError if none."""
    f = _factor(n)
    if f is None:
        lo, hi = nearest_supported_orders(n) if isinstance(n, int) and n >= 1 else (None, 1)
        why = ("a Hadamard matrix exists only for 1, 2 and multiples of 4" if isinstance(n, int) and n > 2 and n % 4
               else "its odd part needs a base order that no Paley construction here reaches")
        near = f"{lo} and {hi}" if lo else str(hi)
        raise RecipeError(
            f"no Hadamard matrix of order {n} ({why}); supported: m·2^k with m = 1, 2, a Paley order (q+1 for a prime "
            f"power q ≡ 3 mod 4, 2(q+1) for q ≡ 1 mod 4) or a product of two, m ≤ {MAX_BASE_ORDER}; "
            f"nearest supported sizes: {near}"
        )
    return f[0], f[1]


def describe_hadamard(n: int) -> str:
    """How order ``n`` is built, e.g. '36 (Paley II, q=17) ⊗ Sylvester 16'."""
    m, s = hadamard_factors(n)
    how = _factor(n)[2]
    names = {"paley1": "Paley I", "paley2": "Paley II"}
    if how[0] == "sylvester":
        return f"Sylvester {n}"
    base = f"{m} ({names[how[0]]}, q={how[1]})" if how[0] in names else f"{m} (= {how[1]} ⊗ {how[2]})"
    return base if s == 1 else f"{base} ⊗ Sylvester {s}"


# -- finite fields and Paley constructions -------------------------------------------------------------------
def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); polynomials as coefficient lists, lowest degree first; f monic."""
    a = [c % p for c in a]
    while len(a) >= len(f):
        lead = a[-1]
        if lead:
            shift = len(a) - len(f)
            for i, c in enumerate(f):
                a[shift + i] = (a[shift + i] - lead * c) % p
        a.pop()
    return a


def _monic_polys(degree: int, p: int):
    for low in range(p**degree):
        coeffs = []
        for _ in range(degree):
            coeffs.append(low % p)
            low //= p
        yield coeffs + [1]


def _irreducible(k: int, p: int) -> list[int]:
    """A monic irreducible polynomial of degree k over GF(p): no monic factor of degree 1..k//2."""
    for f in _monic_polys(k, p):
        if f[0] == 0:
            continue
        if all(any(_poly_mod(f, g, p)) for d in range(1, k // 2 + 1) for g in _monic_polys(d, p)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _quadratic_character(q: int) -> tuple[np.ndarray, np.ndarray]:
    """Elements of GF(q) as indices 0..q-1 (base-p digits = polynomial coefficients): returns the quadratic
    character chi[0..q-1] (0, +1 square, -1 non-square) and the digit matrix [q, k] used for subtraction."""
    p, k = _prime_power(q)
    idx = np.arange(q)
    digits = np.stack([(idx // p**i) % p for i in range(k)], axis=1)
    if k == 1:
        squares = np.unique((idx * idx) % p)
    else:
        f = _irreducible(k, p)
        sq = []
        for d in digits.tolist():
            prod = [0] * (2 * k - 1)
            for i, a in enumerate(d):
                for j, b in enumerate(d):
                    prod[i + j] += a * b
            r = _poly_mod(prod, f, p)
            sq.append(sum(c * p**i for i, c in enumerate(r)))
        squares = np.unique(np.array(sq))
    chi = -np.ones(q, dtype=np.int8)
    chi[squares] = 1
    chi[0] = 0
    if (chi == 1).sum() != (q - 1) // 2:  # a field of odd order has exactly (q-1)/2 non-zero squares
        raise AssertionError(f"GF({q}) arithmetic is wrong: {(chi == 1).sum()} non-zero squares")
    return chi, digits


def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = chi(a - b) over GF(q)."""
    p, k = _prime_power(q)
    chi, digits = _quadratic_character(q)
    if k == 1:
        idx = np.arange(q)
        return chi[(idx[:, None] - idx[None, :]) % q]
    weights = p ** np.arange(k)
    out = np.empty((q, q), dtype=np.int8)
    for a in range(q):
        out[a] = chi[((digits[a][None, :] - digits) % p) @ weights]
    return out


def _paley(kind: str, q: int) -> np.ndarray:
    Q = _jacobsthal(q).astype(np.int64)
    ones = np.ones(q, dtype=np.int64)
    if kind == "paley1":  # q ≡ 3 mod 4: Q is antisymmetric; H = I + [[0, 1ᵀ], [-1, Q]]
        S = np.zeros((q + 1, q + 1), dtype=np.int64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = ones, -ones, Q
        return np.eye(q + 1, dtype=np.int64) + S
    # q ≡ 1 mod 4: C = [[0, 1ᵀ], [1, Q]] is a symmetric conference matrix; 0 -> [[1,-1],[-1,-1]], ±1 -> ±[[1,1],[1,-1]]
    C = np.zeros((q + 1, q + 1), dtype=np.int64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = ones, ones, Q
    return (np.kron(C, np.array([[1, 1], [1, -1]]))
            + np.kron(np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]])))


def sylvester(s: int) -> np.ndarray:
    """Sylvester's ±1 Hadamard matrix of order ``s`` = 2^k (integers): ``H[i, j] = (-1)^popcount(i & j)``."""
    idx = np.arange(s)
    bits = np.bitwise_and(idx[:, None], idx[None, :])
    parity = np.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits >>= 1
    return 1 - 2 * parity


@lru_cache(maxsize=64)
def _base_matrix(m: int) -> np.ndarray:
    """The ±1 base matrix of order m (int8, read-only), verified H Hᵀ = m I."""
    how = _base_construction(m)
    if how is None:
        raise RecipeError(f"no Hadamard construction for base order {m}")
    if how[0] == "sylvester":
        H = sylvester(m)
    elif how[0] == "kron":
        H = np.kron(_base_matrix(how[1]).astype(np.int64), _base_matrix(how[2]).astype(np.int64))
    else:
        H = _paley(*how)
    Hf = H.astype(np.float32)  # sums of ±1 products up to m <= 2^24 are exact in float32: an integer check
    if (H.shape != (m, m) or not np.array_equal(np.abs(H), np.ones_like(H))
            or not np.array_equal(Hf @ Hf.T, m * np.eye(m))):
        raise AssertionError(f"Hadamard construction {how} of order {m} is not orthogonal")
    H = H.astype(np.int8)
    H.flags.writeable = False
    return H


# -- public matrices -------------------------------------------------------------------------------------------
def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal Hadamard ``(H_m ⊗ S_{2^k}) / sqrt(n)``: the same matrix :func:`apply_hadamard` applies."""
    m, s = hadamard_factors(n)
    H = np.kron(_base_matrix(m).astype(np.float64), sylvester(s).astype(np.float64))
    return (torch.from_numpy(H) / math.sqrt(n)).to(dtype)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """The seeded ±1 vector s of :func:`random_hadamard` (float64)."""
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) * 2 - 1).double()


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``H · diag(s)`` with seeded signs s: orthogonal, and spreads every direction as evenly as H does (QuaRot).
    ``x @ random_hadamard(n, seed) == apply_hadamard(x, n) * random_signs(n, seed)``."""
    return (hadamard_matrix(n) * random_signs(n, seed).unsqueeze(0)).to(dtype)


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Haar-random orthogonal matrix: QR of a seeded Gaussian, with R's diagonal signs moved into Q (without the
    sign fix, QR's sign convention biases the distribution)."""
    g = torch.Generator().manual_seed(int(seed))
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * torch.sign(torch.diagonal(R)).unsqueeze(0)).to(dtype)


SYLVESTER_GEMM = 64  # the lowest Sylvester factor is one GEMM: in eager torch it beats log2(64) butterfly copies
_CONST_CACHE: dict[tuple, torch.Tensor] = {}


def _const(kind: str, order: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ±1 base ('base') or Sylvester ('sylvester') matrix as a cached tensor."""
    key = (kind, order, dtype, str(device))
    if key not in _CONST_CACHE:
        H = _base_matrix(order) if kind == "base" else sylvester(order)
        _CONST_CACHE[key] = torch.from_numpy(H.astype(np.float64)).to(device=device, dtype=dtype)
    return _CONST_CACHE[key]


def apply_hadamard(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """``x @ hadamard_matrix(n)`` on the last dimension, without the dense n×n matrix.

    With n = m·s and the row viewed as X [m, s] (index a·s + b), ``(H_m ⊗ S_s)`` acts as ``X -> H_mᵀ X S_s``.
    ``S_s = S_{s/t} ⊗ S_t`` (Sylvester matrices are Kronecker powers of [[1, 1], [1, -1]]), so ``X S_s`` is a GEMM
    with ``S_t`` on the low t = min(s, 64) indices, then the Walsh-Hadamard butterfly (a+b, a-b) at strides t, 2t,
    ..., s/2 on the high ones; one m×m GEMM contracts the base factor. Cost per row O(n (t + log(s/t) + m)) instead
    of O(n²). Computed in x's dtype; scaled by 1/sqrt(n) last.
    """
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise ValueError(f"apply_hadamard: last dimension is {x.shape[-1]}, expected {n}")
    m, s = hadamard_factors(n)
    shape = x.shape
    t = min(s, SYLVESTER_GEMM)
    y = x.reshape(-1, m, s)
    if t > 1:
        y = (y.reshape(-1, t) @ _const("sylvester", t, x.dtype, x.device)).reshape(-1, m, s)
    h = t
    while h < s:
        y = y.reshape(-1, m, s // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    y = y.reshape(-1, m, s)
    if m > 1:  # H_mᵀ X as (Xᵀ H_m)ᵀ: one [rows·s, m] @ [m, m] GEMM instead of many tiny batched ones
        y = (y.transpose(1, 2) @ _const("base", m, x.dtype, x.device)).transpose(1, 2)
    return (y * (1.0 / math.sqrt(n))).reshape(shape)
