"""The tensor-core GEMV (``gemv_mma``, the runner's ``mma_gemv``): its packing against a fragment-level emulation,
how the GEMV's tuner offers it, and the kernel against the torch reference: on an sm_90 GPU, and on the CPU under
Triton's interpreter (``_gluon``)."""

import pytest
import torch

from qcompile.quant.grid import QuantizedWeight, QuantSpec
from qcompile.runtime.triton import gemv_mma
from qcompile.runtime.triton import reference as R
from qcompile.runtime.triton.packing import pack_from_export
from qcompile.runtime.triton.wq_matmul import wq_linear

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def packed(n, k, sym, group, bias=False, seed=0):
    torch.manual_seed(seed)
    qw = QuantizedWeight.from_float(torch.randn(n, k), QuantSpec(bits=4, symmetric=sym, group_size=group))
    return pack_from_export(qw.qweight, qw.scale, qw.zero, bits=4, dtype=torch.float16,
                            bias=torch.randn(n) if bias else None)


@pytest.mark.parametrize("group,sym", [(128, False), (64, True)])
def test_packing_matches_the_fragment_emulation(group, sym):
    """The words, decoded lane by lane as the mma fragments define them (PTX ISA, m16n8k16), give the reference
    product: the packing and the kernel's reading of it agree."""
    pw = packed(32, 2 * group, sym, group)
    mw = gemv_mma.mma_weight(pw)
    assert mw.words.shape == (32 // 16, 2, 32, group // 16) and mw.zero.dtype == torch.uint8
    x = torch.randn(2 * group).half()
    got = gemv_mma.emulate(x, mw.words, pw.scale, mw.zero, group)
    ref = R.wq_linear_ref(x.float()[None], pw.to(dtype=torch.float32))[0]
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_packing_refuses_shapes_it_cannot_hold():
    with pytest.raises(ValueError, match="groups of 64 or 128"):
        gemv_mma.pack_mma(torch.zeros(96, 16, dtype=torch.uint8), 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        gemv_mma.pack_mma(torch.zeros(128, 24, dtype=torch.uint8), 128)


def test_attached_only_where_it_runs():
    """Never on a CPU or under the interpreter; moving a weight drops the re-packed copy (it would be on the old
    device)."""
    pw = packed(32, 128, False, 128)
    assert gemv_mma.attach(pw) is pw  # a CPU weight
    fake = gemv_mma.MmaWeight(torch.zeros(1), torch.zeros(1))
    from dataclasses import replace

    assert replace(pw, mma=fake).to("cpu").mma is None


def test_tuner_times_it_beside_the_pointer_gemv(monkeypatch):
    """A weight that carries the mma words: the batch-1 fp16 GEMV's tuner gets the pointer GEMV's candidates and
    the mma kernel's under a key of its own (picks made without them stay valid); without the words, or off the
    half2 path, it gets none of them, and a config that asks for the kernel anyway is refused."""
    from dataclasses import replace

    from qcompile.runtime.triton import wq_matmul

    seen = {}
    monkeypatch.setattr(wq_matmul._GEMV, "run", lambda key, cands, launch, config, timing=None: seen.update(
        key=key, cands=cands, launch=launch))
    monkeypatch.setattr(wq_matmul, "num_sms", lambda device: 132)
    pw = packed(256, 256, False, 128)
    with_words = replace(pw, mma=gemv_mma.MmaWeight(torch.zeros(1), torch.zeros(1)))
    x = torch.randn(1, 256, dtype=torch.float16)
    monkeypatch.setattr(wq_matmul, "half2_gemv", lambda bits, m, dtype: True)  # as on a GPU
    wq_linear(x, with_words)
    mma = [c for c in seen["cands"] if c.get("MMA")]
    assert mma == gemv_mma.candidates(256, 132) and len(seen["cands"]) > len(mma)
    assert seen["key"][-1] == "mma" and seen["key"] == wq_matmul.gemv_tuning_key(x, with_words)
    wq_linear(x, pw)
    assert not any(c.get("MMA") for c in seen["cands"]) and "mma" not in seen["key"]
    with pytest.raises(ValueError, match="MMA needs a weight that carries"):
        seen["launch"](mma[0])
    monkeypatch.setattr(wq_matmul, "half2_gemv", lambda bits, m, dtype: False)  # e.g. under the interpreter
    wq_linear(x, with_words)
    assert not any(c.get("MMA") for c in seen["cands"])


# groups of 128 and 64, symmetric or not, bias (with a residual), SwiGLU in the prologue
KERNEL_CASES = [(128, False, False, None), (64, True, True, None), (128, False, True, "silu_mul"),
                (64, False, False, "silu_mul")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs the kernel compiled")
@pytest.mark.parametrize("group,sym,bias,act", KERNEL_CASES)
def test_kernel_under_the_interpreter_matches_reference(group, sym, bias, act):
    """The Gluon kernel itself under Triton's interpreter (``_gluon``: its decode-and-mma PTX emulated instruction
    by instruction, lane by lane): every candidate for 64 outputs (splits of K and row blocks a warp that leave
    programs with no rows or no groups included, and one split), plain and as a programmatic dependent, against the fp32
    reference within fp16 rounding, the same bits when repeated; one flipped code moves the output."""
    from dataclasses import replace

    n, k = 64, 4 * group
    pw = packed(n, k, sym, group, bias=bias)
    pw = replace(pw, mma=gemv_mma.mma_weight(pw))
    x = torch.randn(1, 2 * k if act else k, dtype=torch.float16)
    res = torch.randn(1, n, dtype=torch.float16) if bias else None
    ref = R.wq_linear_ref(x.float(), pw.to(dtype=torch.float32), residual=None if res is None else res.float(),
                          act=act)

    def run(w, cfg, pdl):
        out = torch.empty(1, n, dtype=torch.float16)
        gemv_mma.launch(x, w, res, act, out, cfg, pdl=pdl)
        return out

    cands = gemv_mma.candidates(n, 1)
    cands += [dict(cands[0], SPLIT_K=1)]  # one program, no workspace
    assert {c["SPLIT_K"] for c in cands} == {1, 2, 4, 8} and {c["E"] for c in cands} == {1, 2, 4}
    for cfg in cands:
        for pdl in (False, True):
            y = run(pw, cfg, pdl)
            assert (y.float() - ref).abs().max() <= 2e-3 * ref.abs().max(), (cfg, pdl)
            assert torch.equal(y, run(pw, cfg, pdl)), (cfg, pdl)
    flipped = pw.mma.words.clone()
    flipped[0, 0, 0, 0] ^= 0x4  # one code of row 0 (nibble 0), two steps apart from its neighbours
    assert (run(replace(pw, mma=replace(pw.mma, words=flipped)), cands[0], False).float() - ref).abs()[0, 0] > 1e-3


@pytest.mark.cuda
@pytest.mark.skipif(not SM90, reason="the mma GEMV needs an sm_90 GPU")
@pytest.mark.parametrize("group,sym,bias,act", KERNEL_CASES)
def test_gpu_every_candidate_matches_reference(group, sym, bias, act):
    """Every candidate (splits included), plain and as a programmatic dependent launch, against the fp32
    reference within fp16 rounding, and bit-identical when repeated (split-K sums in a fixed order)."""
    n, k = 1024, 4 * group
    pw = gemv_mma.attach(packed(n, k, sym, group, bias=bias).to("cuda"))
    assert pw.mma is not None
    x = torch.randn(1, 2 * k if act else k, device="cuda", dtype=torch.float16)
    res = torch.randn(1, n, device="cuda", dtype=torch.float16) if bias else None
    ref = R.wq_linear_ref(x.float(), pw.to(dtype=torch.float32), residual=None if res is None else res.float(),
                          act=act)
    for cfg in gemv_mma.candidates(n, torch.cuda.get_device_properties(0).multi_processor_count):
        for pdl in (False, True):
            y = wq_linear(x, pw, residual=res, act=act, config=cfg, pdl=pdl)
            assert (y.float() - ref).abs().max() <= 2e-3 * ref.abs().max(), (cfg, pdl)
            assert torch.equal(y, wq_linear(x, pw, residual=res, act=act, config=cfg, pdl=pdl)), (cfg, pdl)
