"""The block-wise learning engine through the LWC / LSI / SDE passes on a tiny trained Llama (CPU, seconds)."""

import pytest
import torch

from qcompile.errors import QCompileError, RecipeError
from qcompile.learn.blockwise import BlockwiseConfig
from qcompile.models import load
from qcompile.passes import lsi, lwc, rtn, sde

SEQ = 32


def cfg(module, calib_file, **kw):
    base = dict(bits=3, group_size=16, calib_text=str(calib_file), calib_samples=8, calib_seq_len=SEQ, epochs=4,
                batch_size=2)
    return module.Config(**{**base, **kw})


def output_error(h, float_logits, ids) -> float:
    with torch.no_grad():
        q = h.model(input_ids=ids, use_cache=False).logits
    return float((q - float_logits).pow(2).mean() / float_logits.pow(2).mean())


@pytest.fixture(scope="module")
def setting(trained_llama, calib_file):
    h = load(trained_llama)
    ids = cfg(lwc, calib_file).load(h.tokenizer)
    with torch.no_grad():
        ref = h.model(input_ids=ids, use_cache=False).logits
    hr = load(trained_llama)
    rtn.apply(hr, rtn.RTNConfig(bits=3, group_size=16))
    return ids, ref, output_error(hr, ref, ids)


@pytest.mark.parametrize("module,kw", [(lwc, {}), (lsi, {"svd_corner": 4}), (sde, {"cll_window": 0}),
                                       (sde, {"cll_window": 1})])
def test_learned_passes_lower_every_block_loss_and_beat_rtn(trained_llama, calib_file, setting, module, kw):
    ids, ref, rtn_err = setting
    h = load(trained_llama)
    stats = module.apply(h, cfg(module, calib_file, **kw))
    assert stats["quantized_linears"] == 14 and len(h.quant_state) == 14
    for block in stats["blocks"]:
        assert block["loss_after"] < block["loss_before"]
    assert 0 < stats["trainable_params"]
    # the module computes exactly its stored grid, and the whole model is closer to float than RTN's
    for name, qw in h.quant_state.items():
        assert torch.equal(h.model.get_submodule(name).weight, qw.dequantize())
        assert not hasattr(h.model.get_submodule(name), "parametrizations")
    assert output_error(h, ref, ids) < rtn_err


def test_cll_lowers_the_error_after_the_next_block(trained_llama, calib_file):
    """CLL trains block 0 for what block 1 makes of its output: with block 1 left float, the output after both
    blocks is closer to the float model's with a window of 1 than with greedy per-block training."""
    from qcompile.learn.capture import _layer_output

    f = load(trained_llama)
    ids = cfg(sde, calib_file).load(f.tokenizer)

    def after_block1(h):
        got = {}
        hook = h.adapter.layers(h.model)[1].register_forward_hook(lambda m, a, o: got.setdefault("o", _layer_output(o)))
        with torch.no_grad():
            h.model(input_ids=ids, use_cache=False)
        hook.remove()
        return got["o"]

    target = after_block1(f)
    errs = {}
    for window in (0, 1):
        h = load(trained_llama)
        sde.apply(h, cfg(sde, calib_file, cll_window=window, epochs=8))
        for name, _, m in h.linears():
            if ".layers.1." in name:  # block 1 back to float
                m.weight.data.copy_(f.model.get_submodule(name).weight)
        out = after_block1(h)
        errs[window] = float((out - target).pow(2).mean() / target.pow(2).mean())
    assert errs[1] < errs[0]


def test_resume_loads_finished_blocks_and_gives_the_same_model(trained_llama, calib_file, tmp_path):
    c = cfg(sde, calib_file, state_dir=str(tmp_path / "state"), cll_window=1)
    h1 = load(trained_llama)
    first = sde.apply(h1, c)
    assert first["resumed_blocks"] == []
    assert sorted(p.name for p in (tmp_path / "state" / "sde").glob("block_*.safetensors")) == [
        "block_000.safetensors", "block_001.safetensors"]
    (tmp_path / "state" / "sde" / "block_001.safetensors").unlink()  # as if the run had stopped after block 0
    h2 = load(trained_llama)
    second = sde.apply(h2, c)
    assert second["resumed_blocks"] == [0]
    for name, qw in h1.quant_state.items():
        assert torch.equal(qw.qweight, h2.quant_state[name].qweight)
        assert torch.equal(qw.scale, h2.quant_state[name].scale)
    with pytest.raises(QCompileError, match="another configuration"):
        sde.apply(load(trained_llama), cfg(sde, calib_file, state_dir=str(tmp_path / "state"), bits=4))


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(batch_size=0), dict(cll_window=-1), dict(lr_clip=0),
                                 dict(penalty=-1.0), dict(lr_schedule="linear"), dict(penalty=float("nan")),
                                 dict(lr_clip=float("nan")), dict(weight_decay=float("inf")), dict(lr_clip="0.1")])
def test_impossible_training_settings_are_refused(bad):
    with pytest.raises(RecipeError):
        BlockwiseConfig(**bad)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_schedule(trained_llama, calib_file, monkeypatch, schedule):
    """Every block starts at the configured rates; "cosine" takes them down to 0 over the block's steps, and the
    block still trains (its loss falls); "constant" keeps them."""
    seen: list[list[float]] = []
    step = torch.optim.AdamW.step

    def recording(self, *a, **k):
        seen.append([g["lr"] for g in self.param_groups])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    c = cfg(sde, calib_file, lr_schedule=schedule, lr_clip=0.02, lr_adjust=0.004)
    stats = sde.apply(load(trained_llama), c)
    per_block = c.epochs * (c.calib_samples // c.batch_size)
    assert len(seen) == per_block * len(stats["blocks"])
    for b in range(len(stats["blocks"])):
        lrs = seen[b * per_block : (b + 1) * per_block]
        assert lrs[0] == [0.02, 0.004]
        if schedule == "constant":
            assert all(lr == lrs[0] for lr in lrs)
        else:
            assert all(x[0] > y[0] for x, y in zip(lrs, lrs[1:]))  # strictly decreasing
            assert lrs[-1][0] < 0.02 * 0.05
        assert stats["blocks"][b]["loss_after"] < stats["blocks"][b]["loss_before"]


def test_group_size_that_does_not_divide_fails_before_training(trained_llama, calib_file):
    with pytest.raises(RecipeError, match="does not divide"):
        lwc.apply(load(trained_llama), cfg(lwc, calib_file, group_size=24))


def test_after_gptq_the_targets_are_the_float_model_and_training_starts_from_gptq(trained_llama, calib_file,
                                                                                   monkeypatch):
    """gptq then sde (with CLL): the float stream and the look-ahead must run the float originals, not GPTQ's
    dequantized weights that the linears hold -- every block's targets equal those of sde on the float model --
    while the learned weights start from GPTQ's (block 0's loss before training is GPTQ's error, below RTN's)."""
    from qcompile.learn import blockwise
    from qcompile.passes import gptq

    seen: dict[int, list] = {}
    original = blockwise._train_block

    def recording(handle, runner, layer, ahead, mods, x_quant, targets_float, lookahead, *rest):
        seen.setdefault(id(handle), []).append(
            (targets_float[0].clone(), [t[0].clone() for t in lookahead]))
        return original(handle, runner, layer, ahead, mods, x_quant, targets_float, lookahead, *rest)

    monkeypatch.setattr(blockwise, "_train_block", recording)
    config = cfg(sde, calib_file, cll_window=1, epochs=1)
    fresh = load(trained_llama)
    fresh_stats = sde.apply(fresh, config)
    chained = load(trained_llama)
    gptq.apply(chained, gptq.GPTQConfig(bits=3, group_size=16, calib_text=str(calib_file), calib_samples=8,
                                        calib_seq_len=SEQ))
    gptq_weights = {n: chained.model.get_submodule(n).weight.clone() for n in chained.quant_state}
    chained_stats = sde.apply(chained, config)
    assert len(seen[id(fresh)]) == len(seen[id(chained)]) == 2
    for (t_f, look_f), (t_c, look_c) in zip(seen[id(fresh)], seen[id(chained)]):
        torch.testing.assert_close(t_c, t_f, rtol=0, atol=0)
        for a, b in zip(look_f, look_c):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    # the float originals are back in place after each float run: what sde exported is what the modules hold
    for name, qw in chained.quant_state.items():
        assert torch.equal(chained.model.get_submodule(name).weight, qw.dequantize())
        assert not torch.equal(chained.float_weights[name], gptq_weights[name])
    assert chained_stats["blocks"][0]["loss_before"] < fresh_stats["blocks"][0]["loss_before"]


def _act_clip_recipe(calib_file, **kw):
    from qcompile import passes
    from qcompile.recipe import PassStep, Recipe

    sde_cfg = dict(bits=4, group_size=16, calib_text=str(calib_file), calib_samples=8, calib_seq_len=SEQ, epochs=4,
                   batch_size=2, cll_window=1, act_clip=True, lr_act_clip=0.05)
    steps = [("canonicalize", dict(untie_embeddings=True)),
             ("act_quant", dict(bits=4, symmetric=False, clip_ratio=0.9)), ("sde", {**sde_cfg, **kw})]
    return Recipe("test", [PassStep(n, passes.get(n).Config(**c)) for n, c in steps])


def test_act_clip_learns_clip_ratios_into_the_graph_and_resumes_them(trained_llama, calib_file, tmp_path):
    """``act_clip``: the block's activation quantizers get one learned clip ratio per quantized input (q/k/v share
    one, gate/up another), starting from the recipe's, frozen into ``handle.act_quant``, saved with the block for a
    resume, and run by ORT."""
    from qcompile.pipeline import export, run_passes
    from qcompile.runtime.ort import OrtCausalLM

    state = str(tmp_path / "state")
    h0 = load(trained_llama)
    fixed = run_passes(h0, _act_clip_recipe(calib_file, act_clip=False))["2:sde"]
    h1 = load(trained_llama)
    st = run_passes(h1, _act_clip_recipe(calib_file, state_dir=state))["2:sde"]
    # the same start as the fixed ratio (0.9), 4 more parameters per block (q/k/v, o, gate/up, down)
    assert st["blocks"][0]["loss_before"] == fixed["blocks"][0]["loss_before"]
    assert st["trainable_params"] == fixed["trainable_params"] + 4 * len(st["blocks"])
    for block in st["blocks"]:
        sites = block["act_clip"]
        assert sorted(len(names) for names, _ in sites) == [1, 1, 2, 3]
        assert block["loss_after"] < block["loss_before"]
    ratios = {n: s.clip_ratio for n, s in h1.act_quant.items()}
    assert ratios == {n: r for b in st["blocks"] for names, r in b["act_clip"] for n in names}
    assert 0.9 not in ratios.values() and all(0.3 <= r <= 1.0 for r in ratios.values())
    assert st["act_clip_ratios"]["min"] < st["act_clip_ratios"]["max"]
    assert not any(hasattr(h1.model.get_submodule(n), "_qcompile_act_clip") for n in ratios)

    # resume: block 0 from the saved state, clip ratios included (block 1 then trains on the same stream)
    (tmp_path / "state" / "sde" / "block_001.safetensors").unlink()
    h2 = load(trained_llama)
    again = run_passes(h2, _act_clip_recipe(calib_file, state_dir=state))["2:sde"]
    assert again["resumed_blocks"] == [0] and again["act_clip_ratios"] == st["act_clip_ratios"]
    assert {n: s.clip_ratio for n, s in h2.act_quant.items()} == ratios
    with pytest.raises(QCompileError, match="another configuration"):  # the ratios' rate is part of the state
        run_passes(load(trained_llama), _act_clip_recipe(calib_file, state_dir=state, lr_act_clip=0.01))

    # the graph holds the learned ratios: ORT computes what the torch model computes
    export(h1, tmp_path / "out", _act_clip_recipe(calib_file))
    ids = cfg(sde, calib_file).load(h1.tokenizer)[:2]
    with torch.no_grad():
        ref = h1.model(input_ids=ids, use_cache=False).logits.numpy()
    got = OrtCausalLM.from_dir(tmp_path / "out", accuracy_level=1).logits(ids.numpy())
    assert abs(got - ref).max() < 1e-4 * max(1.0, abs(ref).max())


def test_act_clip_leaves_nothing_behind_when_training_fails(trained_llama, calib_file, monkeypatch):
    from qcompile.learn import blockwise
    from qcompile.pipeline import run_passes

    h = load(trained_llama)
    monkeypatch.setattr(blockwise, "relative_mse", lambda pred, target: (pred * float("nan")).sum())
    with pytest.raises(QCompileError, match="diverged"):
        run_passes(h, _act_clip_recipe(calib_file))
    assert {s.clip_ratio for s in h.act_quant.values()} == {0.9}
    assert not any(hasattr(m, "_qcompile_act_clip") for m in h.model.modules())


def test_act_clip_without_activation_quantization_is_refused(trained_llama, calib_file):
    with pytest.raises(RecipeError, match="act_quant"):
        sde.apply(load(trained_llama), cfg(sde, calib_file, act_clip=True))


def test_block_state_keeps_stats_once_and_reads_the_older_layout(tmp_path):
    """A finished block's weights, its statistics and the trained parameters behind them survive a save/load; the
    JSON holds the statistics once, and states written by the earlier layout (a copy of the statistics in every
    weight's spec, no trained parameters) still load."""
    import json

    from qcompile.learn.blockwise import BlockState
    from qcompile.quant.grid import QuantizedWeight, QuantSpec

    spec = QuantSpec(bits=4, symmetric=False, group_size=8)
    weights = {f"model.layers.0.{n}": QuantizedWeight.from_float(torch.randn(4, 16), spec) for n in ("q", "k")}
    stats = {"loss_before": 0.5, "loss_after": 0.25, "act_clip": [[["model.layers.0.q"], 0.8]]}
    learned = {"model.layers.0.q": {"d": torch.randn(7), "clip_hi": torch.randn(4, 2)}}
    state = BlockState(str(tmp_path), "fingerprint-1")
    state.save(0, weights, stats, learned)
    meta = json.loads((tmp_path / "block_000.json").read_text())
    assert meta["stats"] == stats and all("stats" not in s for s in meta["weights"].values())
    loaded, got, got_learned = state.load(0)
    assert got == stats and loaded.keys() == weights.keys()
    assert got_learned.keys() == learned.keys() and got_learned["model.layers.0.q"].keys() == {"d", "clip_hi"}
    for k, v in learned["model.layers.0.q"].items():
        assert torch.equal(got_learned["model.layers.0.q"][k], v)
    for name, qw in weights.items():
        assert torch.equal(loaded[name].qweight, qw.qweight) and torch.equal(loaded[name].scale, qw.scale)
        assert torch.equal(loaded[name].zero, qw.zero) and loaded[name].spec == spec
    old = {name: {**s, "stats": stats} for name, s in meta["weights"].items()}  # the earlier layout
    (tmp_path / "block_000.json").write_text(json.dumps(old))
    loaded, got, _ = state.load(0)
    assert got == stats and torch.equal(loaded["model.layers.0.k"].qweight, weights["model.layers.0.k"].qweight)
