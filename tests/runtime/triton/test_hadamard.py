"""Online Walsh-Hadamard transform (2^k and m * 2^k) against the dense Kronecker-product reference."""

import importlib.util

import pytest
import torch

from qcompile.runtime.triton import reference as R
from qcompile.runtime.triton.hadamard import PALEY_ORDERS, hadamard_transform, left_matrix, paley, split_order


@pytest.mark.parametrize("m", PALEY_ORDERS)
def test_paley_matrices_are_hadamard(m):
    h = paley(m)
    assert h.abs().eq(1).all() and torch.equal(h @ h.t(), m * torch.eye(m, dtype=h.dtype))


def test_split_order_picks_a_known_order():
    assert [split_order(n) for n in (64, 576, 1536, 14336, 160, 1280)] == [1, 36, 12, 28, 20, 20]
    with pytest.raises(ValueError):
        split_order(6)  # no Hadamard matrix of order 6 exists


# dense path (n <= 128, incl. a padded 96), two-stage path with R or C padded (576 = 36 x 16, 160 = 20 x 8)
SIZES = [16, 96, 128, 256, 576, 1536, 160]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_transform_matches_kronecker_reference(device, n, dtype):
    x = torch.randn(5, n, device=device, dtype=dtype) * 3
    m = split_order(n)
    ref = R.hadamard_ref(x.cpu().float(), left_matrix(m).float() if m > 1 else None)
    y = hadamard_transform(x)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(y.cpu().float(), ref, rtol=0, atol=tol * ref.abs().max().item())
    # orthonormal: the norm of each row is preserved
    torch.testing.assert_close(y.float().norm(dim=-1), x.float().norm(dim=-1), rtol=2e-3 if dtype == torch.float16
                               else 1e-5, atol=0)


def test_reference_is_the_kronecker_product():
    x = torch.randn(3, 96, dtype=torch.float64)
    left = paley(12)
    dense = x @ torch.kron(left, R.sylvester(8, torch.float64)) / 96**0.5
    torch.testing.assert_close(R.hadamard_ref(x, left), dense)


def test_custom_left_factor_and_scale(device):
    left = paley(12)[torch.randperm(12)]  # any +-1 matrix of the order works, e.g. the rotation pass's own
    x = torch.randn(3, 12 * 32, device=device)
    y = hadamard_transform(x, left=left.float(), scale=1.0)
    torch.testing.assert_close(y.cpu(), R.hadamard_ref(x.cpu(), left.float(), scale=1.0), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("n", [64, 576])
def test_fused_per_token_quantization(device, n):
    x = torch.randn(7, n, device=device)
    q, s = hadamard_transform(x, quant_bits=8)
    qr, sr = R.quantize_rows_ref(hadamard_transform(x).cpu(), 8)
    torch.testing.assert_close(s.cpu(), sr, rtol=1e-5, atol=0)
    assert (q.cpu().int() - qr.int()).abs().max() <= 1


@pytest.mark.skipif(importlib.util.find_spec("qcompile.quant.hadamard") is None,
                    reason="qcompile.quant.hadamard not present")
@pytest.mark.parametrize("n", [64, 576, 1536])
def test_same_matrix_as_the_rotation_pass(device, n):
    """The runtime must apply exactly the matrix the rotation pass folded: x @ hadamard_matrix(n) / sqrt(n)."""
    from qcompile.quant.hadamard import hadamard_matrix

    h = torch.as_tensor(hadamard_matrix(n)).double()  # orthonormal
    x = torch.randn(4, n, dtype=torch.float64)
    ref = (x @ h).float()
    y = hadamard_transform(x.float().to(device))
    torch.testing.assert_close(y.cpu(), ref, rtol=0, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("n", [4096, 8192, 14336, 11008, 18944, 28672])
def test_real_sizes_on_gpu(n):
    x = torch.randn(64, n, device="cuda", dtype=torch.float16)
    m = split_order(n)
    ref = R.hadamard_ref(x.float(), left_matrix(m).float() if m > 1 else None)
    y = hadamard_transform(x)
    torch.testing.assert_close(y.float(), ref.float(), rtol=0, atol=3e-3 * ref.abs().max().item())


def test_plans_are_never_evicted():
    """A plan's matrices stay allocated however many other plans are made: a CUDA graph captured on them (the
    runner's online rotations) keeps their addresses (an LRU cache of 64 would free the first of these 80)."""
    import gc
    import weakref

    from qcompile.runtime.triton.hadamard import _plan

    _, first, _ = _plan(12, None, torch.float32, "cpu")  # (not among the 80 below)
    alive = weakref.ref(first)
    del first
    for n in (2 ** k for k in range(1, 11)):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            for left in (None, ((1.0,),)):
                _plan(n, left, dtype, "cpu")
    gc.collect()
    assert alive() is not None
