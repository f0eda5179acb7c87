"""The persistent GEMV chain against a chain of reference GEMVs: small shapes under the interpreter, 4096 x 4096 on
CUDA (where the grid barrier and the half2 decode run)."""

import pytest
import torch

from qcompile.quant.grid import QuantizedWeight, QuantSpec
from qcompile.runtime.triton import reference as R
from qcompile.runtime.triton.gemv_chain import gemv_chain, stack_chain
from qcompile.runtime.triton.packing import pack_from_export
from qcompile.runtime.triton.wq_matmul import wq_linear


def chain_weights(n, layers, sym, group, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        # scaled so that activations stay O(1) through the chain (fp16 on the GPU)
        w = torch.randn(n, n, generator=gen) / n**0.5
        qw = QuantizedWeight.from_float(w, QuantSpec(bits=4, symmetric=sym, group_size=group))
        out.append(pack_from_export(qw.qweight, qw.scale, qw.zero, bits=4, dtype=dtype).to(device))
    return out


def assert_graph_replays_equal(launch, out):
    """``launch(buf)`` captured in a CUDA graph: three replays into a zeroed buffer each reproduce ``out`` exactly
    (the chain's device-side state, counter or epoch, is left ready for the next launch)."""
    buf = torch.empty_like(out)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        launch(buf)
    for _ in range(3):
        buf.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(buf, out)


def reference_chain(x, weights):
    rows = [x.reshape(1, -1)]
    for pw in weights:
        rows.append(R.wq_linear_ref(rows[-1].float(), pw.to(dtype=torch.float32)).to(x.dtype))
    return torch.cat(rows)


@pytest.mark.parametrize("block_n", [16, 128], ids=["8-programs", "1-program"])
@pytest.mark.parametrize("sym,group", [(False, 32), (True, 64), (False, 128)])
def test_chain_matches_layer_by_layer_reference(device, sym, group, block_n):
    """Layer offsets into the stacked words, scales and zero points, and every program's columns (8 programs: a
    launch per layer under the interpreter); with one program the whole chain runs in one launch, each layer from
    the slice read a step earlier (the last step's read masked off), and with AHEAD=False (read after the wait)."""
    if device == "cuda":
        pytest.skip("the GPU case runs at a real shape below (fp16, half2 decode)")
    weights = chain_weights(128, 3, sym, group, device, torch.float32, seed=group)
    x = torch.randn(128, device=device)
    out = gemv_chain(x, stack_chain(weights), config={"BLOCK_N": block_n})
    assert torch.equal(out, gemv_chain(x, stack_chain(weights), config={"BLOCK_N": block_n, "AHEAD": False}))
    ref = reference_chain(x, weights)
    assert torch.equal(out[0], x)
    for layer in range(1, 4):
        err = (out[layer] - ref[layer]).abs().max().item()
        assert err <= 1e-4 * ref[layer].abs().max().item(), (layer, err)


def test_chain_rejects_what_it_cannot_run(device):
    dt = torch.float16 if device == "cuda" else torch.float32
    square = chain_weights(64, 1, False, 32, device, dt)
    qw = QuantizedWeight.from_float(torch.randn(32, 64), QuantSpec(bits=4, symmetric=False, group_size=32))
    wide = pack_from_export(qw.qweight, qw.scale, qw.zero, bits=4, dtype=dt).to(device)
    with pytest.raises(ValueError, match="square int4"):
        stack_chain(square + [wide])
    with pytest.raises(ValueError, match="at least one"):
        stack_chain([])
    cw = stack_chain(square)
    with pytest.raises(ValueError, match="x has 32 values"):
        gemv_chain(torch.zeros(32, device=device, dtype=dt), cw)
    with pytest.raises(ValueError, match="resident"):
        gemv_chain(torch.zeros(64, device=device, dtype=dt), cw, config={"BLOCK_N": 7})
    with pytest.raises(ValueError, match=r"unknown config keys \['SYNC'\]"):
        gemv_chain(torch.zeros(64, device=device, dtype=dt), cw, config={"SYNC": "tags"})


@pytest.mark.cuda
@pytest.mark.parametrize("sym", [False, True])
def test_chain_on_gpu_matches_runtime_gemv(sym):
    """At 4096 x 4096 over 6 layers, with the grid barrier: every layer matches ``wq_linear`` (row pairs, the same
    decode) applied to the chain's own input of that layer within fp16 rounding (the fp32 partials are summed in
    another order), and the float reference within the pair decode's rounding; a second launch is bit-identical
    (the barrier's counter is reset by the launch's last arrival), and so are CUDA-graph replays."""
    weights = chain_weights(4096, 6, sym, 128, "cuda", torch.float16, seed=1)
    cw = stack_chain(weights)
    x = torch.randn(4096, device="cuda", dtype=torch.float16)
    cfg = {"BLOCK_N": 32, "num_warps": 16}
    out = gemv_chain(x, cw, config=cfg)
    torch.cuda.synchronize()
    for layer, pw in enumerate(weights):
        step = wq_linear(out[layer].reshape(1, -1), pw).reshape(-1).float()
        ref = R.wq_linear_ref(out[layer].reshape(1, -1).float(), pw.to(dtype=torch.float32)).reshape(-1)
        scale = ref.abs().max().item()
        assert (out[layer + 1].float() - step).abs().max().item() <= 2e-3 * scale, layer
        assert (out[layer + 1].float() - ref).abs().max().item() <= 5e-3 * scale, layer
    again = gemv_chain(x, cw, config=cfg)
    assert torch.equal(again, out)
    assert_graph_replays_equal(lambda buf: gemv_chain(x, cw, out=buf, config=cfg), out)


def test_staged_repack_pairs_adjacent_inputs():
    """``gemv_chain_staged``'s re-packing: nibbles j and j + 4 of each new word hold the codes of inputs 2j and
    2j + 1 of its eight (the half2 decode pairs nibbles j and j + 4 against the adjacent activations)."""
    from qcompile.runtime.triton.gemv_chain_staged import _repack

    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (5, 8, 3), generator=gen, dtype=torch.int32)  # [rows, input of the eight, cols]
    words = torch.zeros(5, 3, dtype=torch.int32)
    for i in range(8):
        words |= codes[:, i] << (4 * i)
    new = _repack(words)
    for j in range(4):
        assert torch.equal((new >> (4 * j)) & 15, codes[:, 2 * j])
        assert torch.equal((new >> (4 * (j + 4))) & 15, codes[:, 2 * j + 1])


@pytest.mark.cuda
@pytest.mark.parametrize("stages", [2, 3, "per_layer"])
@pytest.mark.parametrize("sym", [False, True])
def test_staged_chain_on_gpu_matches_runtime_gemv(sym, stages):
    """The TMA-staged chain (Gluon) at 4096 x 4096 over 6 layers, persistent (2, 3 stages) or a PDL launch a layer:
    every layer within fp16 rounding of ``wq_linear`` on the chain's own input to it; a relaunch and CUDA-graph
    replays bit-identical (the epoch moves on)."""
    from qcompile.runtime.triton.gemv_chain_staged import gemv_chain_staged, stage_chain

    weights = chain_weights(4096, 6, sym, 128, "cuda", torch.float16, seed=2)
    sc = stage_chain(stack_chain(weights))
    x = torch.randn(4096, device="cuda", dtype=torch.float16)
    opts = {"per_layer": True} if stages == "per_layer" else {"stages": stages}
    out = gemv_chain_staged(x, sc, **opts)
    torch.cuda.synchronize()
    for layer, pw in enumerate(weights):
        step = wq_linear(out[layer].reshape(1, -1), pw).reshape(-1).float()
        scale = step.abs().max().item()
        assert (out[layer + 1].float() - step).abs().max().item() <= 2e-3 * scale, layer
    assert torch.equal(gemv_chain_staged(x, sc, **opts), out)
    assert_graph_replays_equal(lambda buf: gemv_chain_staged(x, sc, out=buf, **opts), out)


@pytest.mark.cuda
def test_staged_chain_epoch_skips_zero_on_wrap():
    """At the last 32-bit epoch (-1 as int32) the persistent staged chain's words carry it, its result is right, and
    the advance goes to 1, not 0 (0 marks the zero-filled buffer and the no-wait ablation's words, which a waiting
    launch must never take as fresh); the next launch, at epoch 1, is right too."""
    from qcompile.runtime.triton.gemv_chain_staged import _tag_state, gemv_chain_staged, stage_chain

    weights = chain_weights(4096, 3, False, 128, "cuda", torch.float16, seed=3)
    sc = stage_chain(stack_chain(weights))
    x = torch.randn(4096, device="cuda", dtype=torch.float16)
    tags, epoch = _tag_state(x.device, 4 * 2048)
    saved = epoch.clone()
    epoch.fill_(-1)
    try:
        out = gemv_chain_staged(x, sc, stages=2)
        torch.cuda.synchronize()
        assert int(epoch.item()) == 1
        assert torch.all((tags[2048:3 * 2048] >> 32) == -1)
        again = gemv_chain_staged(x, sc, stages=2)
        assert int(epoch.item()) == 2
    finally:  # never back to an epoch the buffer's words carry now (-1, 1): a later launch would take them as fresh
        epoch.fill_(max(int(saved.item()), 2))
    for layer, pw in enumerate(weights):
        step = wq_linear(out[layer].reshape(1, -1), pw).reshape(-1).float()
        assert (out[layer + 1].float() - step).abs().max().item() <= 2e-3 * step.abs().max().item(), layer
    assert torch.equal(again, out)
