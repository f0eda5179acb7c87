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
