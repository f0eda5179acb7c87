"""The decode step's argmax against torch.argmax: ties across and within chunks, NaN, signed zeros, -inf rows."""

import pytest
import torch

from qcompile.runtime.triton._tune import num_sms
from qcompile.runtime.triton.argmax import argmax, chunk_size


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 300, 4099, 49152])
def test_argmax_equals_torch(device, dtype, n):
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=gen) * 4).to(device, dtype)
    out = argmax(x)
    assert out.dtype == torch.int64 and out.shape == (1,)
    assert out.item() == torch.argmax(x.cpu()).item()


def test_argmax_ties_take_the_first_index_within_and_across_chunks(device):
    n = 5000
    chunk = chunk_size(n, num_sms(device))
    assert n > 2 * chunk + 7  # the ties below sit in different programs
    x = torch.zeros(n, device=device)
    for i in (2 * chunk + 7, chunk + 5, chunk + 9, 2 * chunk - 1):  # the first of them is in the second chunk
        x[i] = 2.5
    assert argmax(x).item() == chunk + 5 == torch.argmax(x.cpu()).item()
    x[chunk + 5] = 2.0  # now the second tie of that chunk
    assert argmax(x).item() == chunk + 9


def test_argmax_follows_torch_on_nan_signed_zeros_and_infinities(device):
    n = 3000
    x = torch.full((n,), float("-inf"), device=device)
    assert argmax(x).item() == 0 == torch.argmax(x.cpu()).item()  # all -inf: the first
    x[n - 1] = -0.0
    x[1200] = 0.0
    x[700] = -0.0
    assert argmax(x).item() == 700 == torch.argmax(x.cpu()).item()  # -0.0 and +0.0 tie
    x[2500] = float("inf")
    assert argmax(x).item() == 2500 == torch.argmax(x.cpu()).item()
    x[2900] = float("nan")
    x[2950] = -float("nan")
    assert argmax(x).item() == 2900 == torch.argmax(x.cpu()).item()  # NaN above inf, the first NaN
    x[5] = -float("nan")
    assert argmax(x).item() == 5 == torch.argmax(x.cpu()).item()  # a NaN's sign does not matter


def test_argmax_of_a_row_longer_than_a_program_per_multiprocessor_holds(device):
    """Past MAX_CHUNK x multiprocessors the chunks stop growing and the programs multiply (the last one's reduction
    of every program's pair included)."""
    from qcompile.runtime.triton import argmax as argmax_mod

    n = argmax_mod.MAX_CHUNK * num_sms(device) * 3 + 5
    assert chunk_size(n, num_sms(device)) == argmax_mod.MAX_CHUNK
    x = torch.zeros(n, device=device, dtype=torch.float16)
    x[n - 3] = x[n - 2] = 1.0  # in the last program
    assert argmax(x).item() == n - 3


def test_argmax_writes_into_out_and_runs_again(device):
    """A second launch must start from a reset arrival counter (the captured decode step replays it)."""
    out = torch.full((1,), -1, dtype=torch.int64, device=device)
    for peak in (17, 4000, 17):
        x = torch.arange(4096, device=device, dtype=torch.float16) * 0
        x[peak] = 1
        assert argmax(x, out=out) is out and out.item() == peak


def test_argmax_feeds_the_pick_back_and_advances_counters_once_a_launch(device):
    """The decode step's tail in the same launch: the pick also lands in ``copy_to`` and each ``advance`` counter
    goes up by exactly one a launch (once, by the last program, however many programs there are); with neither,
    they are untouched."""
    tok = torch.full((1,), -1, dtype=torch.int64, device=device)
    pos = torch.full((1,), 5, dtype=torch.int32, device=device)
    lens = torch.full((1,), 6, dtype=torch.int32, device=device)
    out = torch.empty(1, dtype=torch.int64, device=device)
    for step, peak in enumerate((3, 9000, 17)):
        x = torch.zeros(12000, device=device, dtype=torch.float16)  # several programs
        x[peak] = 2
        argmax(x, out=out, copy_to=tok, advance=(pos, lens))
        assert (out.item(), tok.item(), pos.item(), lens.item()) == (peak, peak, 6 + step, 7 + step)
    argmax(x, out=out, advance=(pos,))
    assert (tok.item(), pos.item(), lens.item()) == (17, 9, 9)
    argmax(x, out=out)
    assert (tok.item(), pos.item(), lens.item()) == (17, 9, 9)


def test_argmax_rejects_what_it_cannot_take(device):
    with pytest.raises(ValueError, match="1-D"):
        argmax(torch.zeros(2, 3, device=device))
    with pytest.raises(ValueError, match="1-D"):
        argmax(torch.zeros(0, device=device))
    with pytest.raises(ValueError, match="1-D"):
        argmax(torch.zeros(8, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="int64"):
        argmax(torch.zeros(8, device=device), out=torch.zeros(1, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="copy_to must be one torch.int64"):
        argmax(torch.zeros(8, device=device), copy_to=torch.zeros(2, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="advance must be one torch.int32"):
        argmax(torch.zeros(8, device=device), advance=(torch.zeros(1, dtype=torch.int64, device=device),))
    one = torch.zeros(1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="at most two"):
        argmax(torch.zeros(8, device=device), advance=(one, one, one))


@pytest.mark.cuda
@pytest.mark.parametrize("n", [128256, 151936, 262144 + 3])
def test_argmax_at_vocabulary_sizes_on_gpu(n):
    gen = torch.Generator().manual_seed(n)
    for dtype in (torch.float16, torch.float32):
        x = (torch.randn(n, generator=gen) * 8).to("cuda", dtype)
        x[n // 2] = x[n // 3] = x.max() + 1  # a tie across programs
        for _ in range(3):
            assert argmax(x).item() == torch.argmax(x).item() == n // 3
