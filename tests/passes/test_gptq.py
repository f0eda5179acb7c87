"""GPTQ on tiny models (CPU, seconds).

The loss test uses a tiny Llama trained for a few seconds on the calibration text, so that its loss means
something; a random model's loss is ~log(vocab) whatever the weights.
"""

import pytest
import torch

from qcompile.errors import RecipeError
from qcompile.models import load
from qcompile.passes import gptq, rtn
from qcompile.learn import LayerwiseRunner
from qcompile.passes.gptq import GPTQConfig, HessianAccumulator, HessianCollector, gptq_quantize, relative_error
from qcompile.quant.grid import QuantizedWeight, QuantSpec, search_clip
from qcompile.quant.targets import targets

SEQ = 32


def cfg(calib_file, **kw):
    return GPTQConfig(calib_text=str(calib_file), calib_samples=8, calib_seq_len=SEQ, **kw)


def layerwise_errors(h, reference: dict, ids: torch.Tensor) -> dict:
    """Per-linear ||(W - W_hat) X||^2 / ||W X||^2, X = the inputs the (quantized) model itself feeds the linear."""
    mods = {n: h.model.get_submodule(n) for n in reference}
    accs = {n: HessianAccumulator(m.in_features, "cpu") for n, m in mods.items()}
    hooks = [m.register_forward_pre_hook(accs[n].hook()) for n, m in mods.items()]
    with torch.no_grad():
        h.model(input_ids=ids, use_cache=False)
    for hd in hooks:
        hd.remove()
    return {n: relative_error(reference[n], mods[n].weight, accs[n].hessian()) for n in mods}


# -- the algorithm on one weight ----------------------------------------------------------------------------
def _correlated_hessian(cols=64, n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    return 2 * x.T @ x / n


@pytest.mark.parametrize("spec", [QuantSpec(3, False, 16), QuantSpec(4, True, 16), QuantSpec(3, False, None)])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("mse_clip", [False, True])
def test_diagonal_hessian_gives_exactly_rtn(spec, act_order, mse_clip):
    """With uncorrelated inputs there is nothing to compensate: GPTQ must reduce to RTN bit for bit."""
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    ref = QuantizedWeight.from_float(w, spec, search_clip(w, spec) if mse_clip else 1.0)
    for source in ("updated", "original"):
        res = gptq_quantize(w, torch.eye(64) * 3.0, spec, act_order=act_order, mse_clip=mse_clip, block_size=32,
                            clip_source=source)
        assert torch.equal(res.qweight.qweight, ref.qweight) and torch.equal(res.qweight.scale, ref.scale)


@pytest.mark.parametrize("spec", [QuantSpec(3, False, 16), QuantSpec(4, True, 32), QuantSpec(3, True, None)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_and_stored_grid_reproduces_it(spec, act_order):
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    h = _correlated_hessian()
    res = gptq_quantize(w, h, spec, act_order=act_order)
    qw = res.qweight
    assert torch.equal(qw.dequantize(), res.dequantized)
    assert qw.qweight.min() >= spec.qmin and qw.qweight.max() <= spec.qmax
    assert qw.scale.shape == (32, 64 // (spec.group_size or 64)) and (qw.zero is None) == spec.symmetric
    rtn_err = relative_error(w, QuantizedWeight.from_float(w, spec).dequantize(), h)
    assert res.rel_error < 0.75 * rtn_err
    # lazy batch updates change nothing but float rounding order
    for bs in (8, 16, 48):
        other = gptq_quantize(w, h, spec, act_order=act_order, block_size=bs)
        assert other.rel_error == pytest.approx(res.rel_error, rel=1e-3)


@pytest.mark.parametrize("spec", [QuantSpec(3, False, 16), QuantSpec(4, True, 32), QuantSpec(2, False, None)])
@pytest.mark.parametrize("act_order", [False, True])
def test_refit_scales_lowers_the_error_and_keeps_the_integers(spec, act_order):
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    h = _correlated_hessian()
    base = gptq_quantize(w, h, spec, act_order=act_order)
    refit = gptq_quantize(w, h, spec, act_order=act_order, refit=True)
    assert torch.equal(refit.qweight.qweight, base.qweight.qweight)  # same integers, new scales
    assert torch.equal(refit.qweight.dequantize(), refit.dequantized)
    assert (refit.qweight.scale > 0).all()
    assert refit.rel_error < base.rel_error


def test_refit_scales_solves_the_least_squares_problem():
    """The refit scales are a stationary point: perturbing any one of them raises the error."""
    from qcompile.passes.gptq import refit_scales

    spec = QuantSpec(3, False, 16)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    h = _correlated_hessian()
    qw = QuantizedWeight.from_float(w, spec)
    s = refit_scales(w, qw.qweight, qw.scale, qw.zero, h, ridge=0.0)
    best = relative_error(w, QuantizedWeight(qw.qweight, s, qw.zero, spec).dequantize(), h)
    assert best < relative_error(w, qw.dequantize(), h)
    for r, g, f in [(0, 0, 1.01), (3, 2, 0.99), (7, 3, 1.02)]:
        s2 = s.clone()
        s2[r, g] *= f
        assert relative_error(w, QuantizedWeight(qw.qweight, s2, qw.zero, spec).dequantize(), h) > best


def _reference_gptq(w, h, spec, damp=0.01, blocksize=128):
    """A transcription of the reference implementation's fasterquant (no act_order, group size == block size, where
    its group parameters see the same weights as ours)."""
    from qcompile.quant.grid import compute_qparams

    w, h = w.clone().float(), h.clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    q_all = torch.zeros_like(w)
    h[range(cols), range(cols)] += damp * torch.mean(torch.diag(h))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    gs = spec.group_size
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, q1, err1, hinv1 = (w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1), torch.zeros(w.shape[0], i2 - i1),
                               hinv[i1:i2, i1:i2])
        for i in range(i2 - i1):
            if (i1 + i) % gs == 0:
                s, z = compute_qparams(w[:, i1 + i : i1 + i + gs], QuantSpec(spec.bits, spec.symmetric, gs))
            col = w1[:, i]
            q = torch.clamp(torch.round(col / s[:, 0]) + (0 if z is None else z[:, 0]), spec.qmin, spec.qmax)
            dq = s[:, 0] * (q - (0 if z is None else z[:, 0]))
            q1[:, i] = dq
            e = (col - dq) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = e
        q_all[:, i1:i2] = q1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return q_all


def test_matches_reference_transcription():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    h = _correlated_hessian()
    h[5, :] = h[:, 5] = 0  # a dead input
    spec = QuantSpec(3, False, 16)
    ours = gptq_quantize(w, h, spec, block_size=16)
    ref = _reference_gptq(w, h, spec, blocksize=16)
    assert (ours.dequantized != ref).float().mean() < 0.01  # identical (up to a rare float tie on other CPUs)
    assert torch.all(ours.dequantized[:, 5] == 0)


def test_indefinite_hessian_gets_more_dampening():
    h = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    res = gptq_quantize(torch.randn(3, 2), h, QuantSpec(4, False, None), damp=0.01)
    assert res.damp > 0.01 and torch.isfinite(res.dequantized).all()


def test_linears_reading_one_input_share_one_hessian(tiny_model_dirs):
    h = load(tiny_model_dirs["qwen2"])
    runner = LayerwiseRunner(h, torch.randint(3, 300, (3, 16)), batch_size=2)
    step = next(runner.layers())
    lin = {r: h.adapter.linear(step.layer, r) for r in ("q", "k", "v", "o", "gate", "up", "down")}
    separate = {r: HessianAccumulator(m.in_features, "cpu") for r, m in lin.items()}
    hooks = [m.register_forward_pre_hook(separate[r].hook()) for r, m in lin.items()]
    with HessianCollector(list(lin.values()), "cpu") as collector:
        step.run()
    for hd in hooks:
        hd.remove()
    acc = {r: collector.accumulator(m) for r, m in lin.items()}
    assert acc["q"] is acc["k"] is acc["v"] and acc["gate"] is acc["up"]
    assert len({id(a) for a in acc.values()}) == 4
    for r in lin:
        assert acc[r].tokens == 3 * 16
        torch.testing.assert_close(acc[r].hessian(), separate[r].hessian())


# -- the pass -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_layerwise_error_lower_than_rtn(trained_llama, calib_file, bits, symmetric):
    c = cfg(calib_file, bits=bits, symmetric=symmetric, group_size=16)
    ids = c.load(load(trained_llama).tokenizer)
    hg, hr = load(trained_llama), load(trained_llama)
    reference = {n: m.weight.detach().clone() for n, _, m in hg.linears()}
    stats = gptq.apply(hg, c)
    rtn.apply(hr, rtn.RTNConfig(bits=bits, symmetric=symmetric, group_size=16))
    e_gptq, e_rtn = layerwise_errors(hg, reference, ids), layerwise_errors(hr, reference, ids)
    assert sum(e_gptq.values()) < 0.8 * sum(e_rtn.values())
    # with true_sequential every Hessian GPTQ used is the one the quantized model produces: the reported
    # errors are the errors of the final model
    for n, e in stats["rel_errors"].items():
        assert e == pytest.approx(e_gptq[n], rel=2e-3, abs=1e-7)
    assert stats["samples"] == 8 and stats["tokens"] == 8 * SEQ and stats["wall_seconds"] > 0
    assert stats["mean_rel_error"] == pytest.approx(sum(e_gptq.values()) / len(e_gptq), rel=2e-3)


def test_3bit_model_closer_to_float_than_rtn(trained_llama, calib_file):
    """At 3 bits: the KL divergence from the float model on the calibration text is lower than RTN's, for sym and
    asym, and so is the summed loss increase.

    Why this assertion: a 3-bit tiny model's loss moves by only ~0.01 nats, and on a single configuration it can
    move either way by chance (RTN occasionally *lowers* it); the KL to the float model is what GPTQ's layer-wise
    objective targets and was 2-5x lower than RTN's on all 12 (family, seed, sym/asym) combinations tried while
    writing this test. The loss is checked summed over sym+asym, where the effect dominates the noise."""
    ids = cfg(calib_file).load(load(trained_llama).tokenizer)
    h = load(trained_llama)
    with torch.no_grad():
        out = h.model(input_ids=ids, labels=ids)
    logp_fp, loss_fp = torch.log_softmax(out.logits, -1), out.loss.item()

    def measure(handle):
        with torch.no_grad():
            o = handle.model(input_ids=ids, labels=ids)
        kl = (logp_fp.exp() * (logp_fp - torch.log_softmax(o.logits, -1))).sum(-1).mean().item()
        return o.loss.item() - loss_fp, kl

    dloss = {"gptq": 0.0, "rtn": 0.0}
    for symmetric in (False, True):
        hg, hr = load(trained_llama), load(trained_llama)
        gptq.apply(hg, cfg(calib_file, bits=3, symmetric=symmetric, group_size=16))
        rtn.apply(hr, rtn.RTNConfig(bits=3, symmetric=symmetric, group_size=16))
        (lg, kg), (lr, kr) = measure(hg), measure(hr)
        assert kg < kr
        dloss["gptq"] += lg
        dloss["rtn"] += lr
    assert dloss["gptq"] < dloss["rtn"]


@pytest.mark.parametrize(
    "options",
    [
        dict(act_order=True),
        dict(act_order=True, mse_clip=True, symmetric=True),
        dict(true_sequential=False),
        dict(true_sequential=False, act_order=True, group_size=None),
        dict(mse_clip=True, block_size=8, batch_size=3, offload_activations=True),
        dict(mse_clip=True, mse_clip_source="original", group_size=32, block_size=24),
        dict(act_order=True, mse_clip=True, refit_scales=True),
    ],
)
def test_variants_store_exact_quantized_weights(tiny_model_dirs, calib_file, options):
    h = load(tiny_model_dirs["qwen3"])
    c = cfg(calib_file, **{"bits": 3, "group_size": 16, **options})
    stats = gptq.apply(h, c)
    names = [n for n, _, _, _ in targets(h, c)]
    assert sorted(h.quant_state) == sorted(names) == sorted(stats["rel_errors"])
    for n in names:
        qw = h.quant_state[n]
        assert qw.spec == c.spec()
        assert qw.qweight.min() >= qw.spec.qmin and qw.qweight.max() <= qw.spec.qmax
        assert torch.equal(qw.dequantize(), h.model.get_submodule(n).weight)
    assert 0 < stats["mean_rel_error"] < 0.2


def test_lm_head_gets_its_own_hessian_and_spec(tmp_path, calib_file):
    from tiny_models import make_tiny_model

    h = load(make_tiny_model("llama", tmp_path / "tied", tie_word_embeddings=True))
    emb = h.adapter.embed(h.model).weight.clone()
    c = cfg(calib_file, bits=4, group_size=16, quantize_lm_head=True, lm_head_bits=8, lm_head_group_size=32)
    stats = gptq.apply(h, c)
    assert len(h.quant_state) == 15 and stats["quantized_linears"] == 15
    head = h.quant_state["lm_head"]
    assert head.spec == QuantSpec(8, False, 32)
    assert torch.equal(head.dequantize(), h.model.lm_head.weight)
    assert not h.adapter.ties_embeddings(h.model) and torch.equal(h.adapter.embed(h.model).weight, emb)
    assert 0 < stats["rel_errors"]["lm_head"] < 1e-3


def test_bad_group_size_fails_before_any_forward(tiny_model_dirs, calib_file):
    h = load(tiny_model_dirs["llama"])
    before = {n: m.weight.clone() for n, _, m in h.linears()}
    calls = []
    hook = h.adapter.embed(h.model).register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(RecipeError, match="does not divide in_features 64"):
        gptq.apply(h, cfg(calib_file, bits=4, group_size=48))
    hook.remove()
    assert not calls and not h.quant_state
    assert all(torch.equal(m.weight, before[n]) for n, _, m in h.linears())


def test_quant_state_has_one_entry_per_target(tiny_model_dirs, calib_file):
    h = load(tiny_model_dirs["mistral"])
    c = cfg(calib_file, bits=4, group_size=32)
    gptq.apply(h, c)
    names = [n for n, _, _, _ in targets(h, c)]
    assert len(names) == 14 and sorted(h.quant_state) == sorted(names)
    assert "lm_head" not in h.quant_state


def test_half_precision_model_runs(tiny_model_dirs, calib_file):
    h = load(tiny_model_dirs["qwen2"], dtype=torch.bfloat16)
    stats = gptq.apply(h, cfg(calib_file, bits=4, group_size=16))
    assert h.dtype == torch.bfloat16 and len(h.quant_state) == 14
    assert 0 < stats["mean_rel_error"] < 0.1


@pytest.mark.parametrize(
    "field,value",
    [("damp", 0.0), ("damp", 1.5), ("block_size", 0), ("batch_size", 0), ("mse_clip_source", "clipped")],
)
def test_config_checks(field, value):
    with pytest.raises(RecipeError, match=field):
        GPTQConfig(**{field: value})


def test_recipe_builds_gptq_config():
    from qcompile.recipe import load_recipe

    step = load_recipe("w4a16-g64-gptq").step("gptq")
    assert isinstance(step.config, GPTQConfig) and step.config.act_order and step.config.true_sequential


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_matches_cpu_and_leaves_model_where_it_was(tiny_model_dirs, calib_file):
    c = cfg(calib_file, bits=3, group_size=16, act_order=True)
    h_cpu, h_gpu = load(tiny_model_dirs["llama"]), load(tiny_model_dirs["llama"])
    s_cpu = gptq.apply(h_cpu, c)
    s_gpu = gptq.apply(h_gpu, cfg(calib_file, bits=3, group_size=16, act_order=True, device="cuda"))
    assert s_gpu["device"].startswith("cuda") and h_gpu.device.type == "cpu"
    for n, qw in h_gpu.quant_state.items():
        assert torch.equal(qw.dequantize(), h_gpu.model.get_submodule(n).weight)
    assert s_gpu["mean_rel_error"] == pytest.approx(s_cpu["mean_rel_error"], rel=0.05)
    # a model already on the GPU stays there, in half precision too
    h16 = load(tiny_model_dirs["qwen3"], dtype=torch.float16, device="cuda")
    s16 = gptq.apply(h16, cfg(calib_file, bits=4, group_size=16))
    assert h16.device.type == "cuda" and s16["device"].startswith("cuda") and len(h16.quant_state) == 14
