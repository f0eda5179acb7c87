import math

import numpy as np
import pytest
import torch

from qcompile.errors import RecipeError
from qcompile.quant import hadamard as hd
from qcompile.quant.hadamard import (
    apply_hadamard,
    hadamard_factors,
    hadamard_matrix,
    random_hadamard,
    random_orthogonal,
    random_signs,
    supported_hadamard_order,
)

SUPPORTED_UP_TO_4096 = [n for n in range(1, 4097) if supported_hadamard_order(n)]


def _exact_integer_hadamard(H: torch.Tensor) -> None:
    """H is an orthonormal Hadamard matrix: sqrt(n) H has entries exactly ±1 and (sqrt(n) H)(sqrt(n) H)ᵀ = n I."""
    n = H.shape[0]
    scaled = H * math.sqrt(n)
    Hi = torch.round(scaled)
    assert (scaled - Hi).abs().max() < 1e-9
    assert torch.equal(Hi.abs(), torch.ones_like(Hi))
    # float32 products and sums of ±1 stay exact integers (|value| <= n < 2^24): this is an integer identity
    Hi = Hi.float()
    assert torch.equal(Hi @ Hi.T, n * torch.eye(n))


def test_model_sizes_are_supported_with_the_expected_factors():
    assert hadamard_factors(576) == (36, 16)  # SmolLM2 hidden
    assert hadamard_factors(1536) == (12, 128)  # SmolLM2 MLP
    assert hadamard_factors(64) == (1, 64)  # head_dim
    assert hadamard_factors(896) == (28, 32)  # Qwen2-0.5B hidden
    assert hadamard_factors(4864) == (76, 64)  # Qwen2-0.5B MLP (76 = Paley II, q = 37)
    assert hadamard_factors(14336) == (28, 512)  # Llama-3-8B / Mistral-7B MLP
    assert hadamard_factors(11008) == (344, 32)  # Llama-2-7B MLP (Paley I over GF(343))
    assert "Paley II, q=17" in hd.describe_hadamard(576)


def test_every_base_order_up_to_4096_sizes_is_exactly_orthogonal():
    """Each base matrix the supported sizes up to 4096 use, up to order 1024 (larger bases cost seconds each)."""
    bases = sorted({hadamard_factors(n)[0] for n in SUPPORTED_UP_TO_4096})
    small = [m for m in bases if m <= 1024]
    assert {1, 12, 20, 28, 36, 44, 52, 60, 76} <= set(small)
    for m in small:
        _exact_integer_hadamard(torch.from_numpy(hd._base_matrix(m).astype(np.float64)) / math.sqrt(m))


def test_every_supported_order_factors_and_small_ones_are_exact():
    assert len(SUPPORTED_UP_TO_4096) > 500
    for n in SUPPORTED_UP_TO_4096:
        m, s = hadamard_factors(n)
        assert m * s == n and s & (s - 1) == 0 and (m in (1, 2) or m % 4 == 0)
    for n in [n for n in SUPPORTED_UP_TO_4096 if n <= 320] + [576, 896, 1536]:
        H = hadamard_matrix(n)
        _exact_integer_hadamard(H)
        assert torch.allclose(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("kind,q", [("paley1", 27), ("paley2", 25), ("paley2", 9), ("paley2", 81), ("paley1", 343)])
def test_prime_power_fields_give_hadamard_matrices(kind, q):
    H = torch.from_numpy(hd._paley(kind, q).astype(np.float64))
    _exact_integer_hadamard(H / math.sqrt(H.shape[0]))


def test_prime_fields_are_preferred():
    assert hd._base_construction(28) == ("paley2", 13)  # not Paley I over GF(27)
    assert hd._base_construction(52) == ("paley2", 25)  # no prime-field construction exists


@pytest.mark.parametrize("n", [92, 116, 156, 172, 184, 188, 6, 10, 4076])
def test_unsupported_orders_raise_with_nearest_sizes(n):
    assert not supported_hadamard_order(n)
    with pytest.raises(RecipeError, match="nearest supported sizes"):
        hadamard_matrix(n)
    with pytest.raises(RecipeError):
        apply_hadamard(torch.zeros(n), n)


def test_unsupported_message_names_both_neighbours():
    with pytest.raises(RecipeError, match=r"order 92 .*nearest supported sizes: 88 and 96"):
        hadamard_factors(92)
    with pytest.raises(RecipeError, match=r"only for 1, 2 and multiples of 4.*: 4 and 8"):
        hadamard_factors(6)


@pytest.mark.parametrize("n", [1, 2, 4, 12, 24, 40, 52, 64, 96, 576, 896, 1536, 4864])
def test_apply_hadamard_equals_dense(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, n, generator=g, dtype=torch.float64)
    H = hadamard_matrix(n)
    assert torch.allclose(apply_hadamard(x, n), x @ H, atol=1e-12, rtol=0)
    x32 = x.float()
    y32 = apply_hadamard(x32)
    assert y32.dtype == torch.float32 and y32.shape == x.shape
    assert torch.allclose(y32.double(), x @ H, atol=1e-5)


def test_apply_hadamard_checks_the_last_dimension():
    with pytest.raises(ValueError, match="last dimension is 12, expected 24"):
        apply_hadamard(torch.zeros(3, 12), 24)


@pytest.mark.parametrize("n", [64, 576])
def test_random_hadamard_is_signed_hadamard_and_seeded(n):
    R = random_hadamard(n, seed=3)
    _exact_integer_hadamard(R)
    assert torch.equal(R, random_hadamard(n, seed=3))
    assert not torch.equal(R, random_hadamard(n, seed=4))
    # H diag(s): each column of R is ± the same column of H
    signs = (R / hadamard_matrix(n))[0]
    assert torch.equal(signs.abs(), torch.ones(n, dtype=torch.float64))
    assert not torch.all(signs == 1)
    x = torch.randn(4, n, dtype=torch.float64)
    assert torch.allclose(x @ R, apply_hadamard(x) * random_signs(n, 3), atol=1e-12)  # the pass's fast form


def test_random_orthogonal_is_orthogonal_and_seeded():
    Q = random_orthogonal(100, seed=1)
    assert torch.allclose(Q @ Q.T, torch.eye(100, dtype=torch.float64), atol=1e-12)
    assert torch.equal(Q, random_orthogonal(100, seed=1))
    assert not torch.allclose(Q, random_orthogonal(100, seed=2))
    assert random_orthogonal(8, 0, dtype=torch.float32).dtype == torch.float32
