"""RMSNorm kernel against the torch reference, and on rows past 2^31 elements."""

import pytest
import torch
from rows_past_int32 import run_in_subprocess

from qcompile.runtime.triton import reference as R
from qcompile.runtime.triton.norm import rms_norm


@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_matches_reference(device, weighted):
    torch.manual_seed(0)
    x = (torch.randn(5, 96) * 3).to(device, torch.float16)
    w = (torch.rand(96) + 0.5).to(device, torch.float16) if weighted else None
    ref = R.rms_norm_ref(x.float().cpu(), None if w is None else w.float().cpu(), 1e-6)
    torch.testing.assert_close(rms_norm(x, w, 1e-6).float().cpu(), ref, rtol=2e-3, atol=2e-3)


def test_rms_norm_reads_rows_past_two_to_the_31_elements(device):
    run_in_subprocess("rms_norm", device)


@pytest.mark.parametrize("n", [64, 576, 2048])
def test_rms_norm_writes_the_outputs_digit_planes(device, n):
    """With ``planes``, the kernel also writes ``gemv_digits.digit_planes`` of its own fp16 output (rows 0-5; rows
    6 and 7 left as they were), over outputs from fp16's subnormals to the thousands."""
    from qcompile.runtime.triton.gemv_digits import PLANES, digit_planes

    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(1, n, generator=gen) * torch.exp2(torch.randint(-20, 10, (1, n), generator=gen))).to(
        device, torch.float16)
    w = (torch.rand(n, generator=gen) * 200).to(device, torch.float16)  # outputs up to the thousands
    noise = torch.randint(-128, 128, (8, n), generator=gen, dtype=torch.int8).to(device)
    planes = noise.clone()
    y = rms_norm(x, w, 1e-6, planes=planes)
    assert torch.equal(y, rms_norm(x, w, 1e-6))
    assert torch.equal(planes[:PLANES].cpu(), digit_planes(y[0].cpu())[:PLANES])
    assert torch.equal(planes[PLANES:], noise[PLANES:])


def test_rms_norm_planes_need_one_fp16_row_of_a_multiple_of_64(device):
    x = torch.ones(2, 64, dtype=torch.float16, device=device)
    planes = torch.zeros(8, 64, dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match="one fp16 row"):
        rms_norm(x, None, 1e-6, planes=planes)
    with pytest.raises(ValueError, match="one fp16 row"):
        rms_norm(x[:1].float(), None, 1e-6, planes=planes)
    with pytest.raises(ValueError, match="multiple of 64"):
        rms_norm(torch.ones(1, 96, dtype=torch.float16, device=device), None, 1e-6,
                 planes=torch.zeros(8, 96, dtype=torch.int8, device=device))
