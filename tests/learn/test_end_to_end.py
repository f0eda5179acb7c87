"""The end-to-end learning engine through DL-QAT and BiSup on a tiny trained Llama (CPU, seconds)."""

import pytest
import torch
from hook_checks import module_hooks

from qcompile import passes
from qcompile.errors import QCompileError, RecipeError
from qcompile.learn.end_to_end import EndToEndConfig
from qcompile.models import load
from qcompile.pipeline import run_passes
from qcompile.recipe import PassStep, Recipe

SEQ = 32


def _recipe(*steps) -> Recipe:
    return Recipe("test", [PassStep(name, passes.get(name).Config(**kw)) for name, kw in steps])


def calib(calib_file, **kw):
    return dict(calib_text=str(calib_file), calib_samples=8, calib_seq_len=SEQ, **kw)


def kl_to_float(h, f, ids) -> float:
    with torch.no_grad():
        s = torch.log_softmax(h.model(input_ids=ids, use_cache=False).logits, -1)
        t = torch.log_softmax(f.model(input_ids=ids, use_cache=False).logits, -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_dlqat_starts_from_gptq_exactly_and_lowers_the_kl(trained_llama, calib_file):
    f = load(trained_llama)
    gptq = ("gptq", dict(bits=3, group_size=16, **calib(calib_file)))
    ids = EndToEndConfig(**calib(calib_file)).load(f.tokenizer)
    hg = load(trained_llama)
    run_passes(hg, _recipe(("canonicalize", {}), gptq))
    # zero epochs: the parametrization's export must give GPTQ's integers and scales back
    h0 = load(trained_llama)
    run_passes(h0, _recipe(("canonicalize", {}), gptq, ("dlqat", dict(bits=3, group_size=16, epochs=0,
                                                                         magnitude_epochs=0, **calib(calib_file)))))
    for name, qw in hg.quant_state.items():
        assert torch.equal(h0.quant_state[name].qweight, qw.qweight)
        assert torch.equal(h0.quant_state[name].scale, qw.scale)
    h = load(trained_llama)
    stats = run_passes(h, _recipe(("canonicalize", {}), gptq, ("dlqat", dict(bits=3, group_size=16, epochs=3,
                                                                            batch_size=2, **calib(calib_file)))))
    st = stats["2:dlqat"]
    assert st["kl_after"] < st["kl_before"] and st["epochs"] == 4  # 1 magnitude-only + 3
    assert kl_to_float(h, f, ids) < kl_to_float(hg, f, ids)
    for name, qw in h.quant_state.items():  # ordinary integer weights on the same grid kind
        assert qw.spec == hg.quant_state[name].spec
        assert torch.equal(h.model.get_submodule(name).weight, qw.dequantize())


def test_end_to_end_resume_continues_from_the_saved_epoch(trained_llama, calib_file, tmp_path):
    def run(epochs, state):
        h = load(trained_llama)
        st = run_passes(h, _recipe(("canonicalize", {}), ("dlqat", dict(
            bits=4, group_size=16, epochs=epochs, magnitude_epochs=0, batch_size=2, state_dir=state,
            **calib(calib_file)))))
        return h, st["1:dlqat"]

    full, _ = run(2, None)
    run(1, str(tmp_path / "s"))  # "stopped" after one epoch
    resumed, st = run(2, str(tmp_path / "s"))
    assert len(st["kl_per_epoch"]) == 1  # only the second epoch ran
    for name, qw in full.quant_state.items():
        assert torch.equal(resumed.quant_state[name].qweight, qw.qweight)
        assert torch.allclose(resumed.quant_state[name].scale, qw.scale, rtol=1e-6, atol=0)


def test_other_settings_train_beside_a_saved_state(trained_llama, calib_file, tmp_path):
    """A state is kept per configuration: other settings train into their own file and leave the first alone, and
    going back to the first settings finds their training finished (same model, no epoch run again). A file whose
    fingerprint does not match its name is refused, and a state saved under the old single-file name resumes."""
    kw = dict(group_size=16, epochs=1, magnitude_epochs=0, batch_size=4, state_dir=str(tmp_path / "s"),
              **calib(calib_file))
    folder = tmp_path / "s" / "dlqat"

    def run(bits):
        h = load(trained_llama)
        st = run_passes(h, _recipe(("canonicalize", {}), ("dlqat", dict(bits=bits, **kw))))["1:dlqat"]
        return h, st

    h4, st4 = run(4)
    (first,) = folder.glob("e2e_state-*.pt")
    saved = first.read_bytes()
    with pytest.warns(UserWarning, match="training states of other settings"):
        _, st3 = run(3)
    assert len(st3["kl_per_epoch"]) == 1 and len(list(folder.glob("e2e_state-*.pt"))) == 2
    assert first.read_bytes() == saved  # untouched by the other settings
    again, st = run(4)
    assert st["kl_per_epoch"] == [] and len(st4["kl_per_epoch"]) == 1  # finished: nothing trained again
    for name, qw in h4.quant_state.items():
        assert torch.equal(again.quant_state[name].qweight, qw.qweight)
    other = next(p for p in folder.glob("e2e_state-*.pt") if p != first)
    first.write_bytes(other.read_bytes())  # a bits=3 state under the bits=4 name
    with pytest.raises(QCompileError, match="another configuration than its name says"):
        run(4)
    first.unlink()
    legacy = folder / "e2e_state.pt"
    other.rename(legacy)  # the bits=3 state as an earlier qcompile named it
    _, st = run(3)
    assert st["kl_per_epoch"] == [] and not list(folder.glob("e2e_state-*.pt"))  # resumed from it: finished
    kept = legacy.read_bytes()
    with pytest.warns(UserWarning, match=r"other settings \(e2e_state.pt\)"):
        _, st = run(4)  # another configuration: trains into its own file, the old one untouched
    assert len(st["kl_per_epoch"]) == 1 and len(list(folder.glob("e2e_state-*.pt"))) == 1
    assert legacy.read_bytes() == kept


def test_bisup_trains_clips_smoothing_and_low_rank_into_the_graph(trained_llama, calib_file, tmp_path):
    from qcompile.pipeline import export
    from qcompile.runtime.ort import OrtCausalLM

    f = load(trained_llama)
    base = [("canonicalize", dict(untie_embeddings=True)), ("rotate", {}),
            ("gptq", dict(bits=4, group_size=16, **calib(calib_file))), ("act_quant", dict(bits=3, symmetric=False)),
            ("kv_quant", dict(bits=4, prefix=2))]
    ids = EndToEndConfig(**calib(calib_file)).load(f.tokenizer)
    hb = load(trained_llama)
    run_passes(hb, _recipe(*base))
    h = load(trained_llama)
    # W4A3KV4 and 16 windows in batches of 8: at A4 the rotated tiny model's KL (0.003) left nothing to learn, and
    # with 8 windows in batches of 2 the step-to-step noise of the loss decided the sign of the change, which went
    # either way by CPU (here, A3: 0.035 -> 0.021 on the training windows, 0.039 -> 0.016 on ``ids``)
    recipe = _recipe(*base, ("bisup", dict(bits=4, group_size=16, epochs=16, batch_size=8,
                                           **{**calib(calib_file), "calib_samples": 16})))
    st = run_passes(h, recipe)["5:bisup"]
    assert st["kl_after"] < 0.8 * st["kl_before"]
    assert kl_to_float(h, f, ids) < 0.8 * kl_to_float(hb, f, ids)
    assert st["smoothed_norms"] == 4 and st["smoothing_max_abs_log_scale"] > 0
    clips = {spec.clip_ratio for spec in h.act_quant.values()}
    assert clips != {1.0} and all(0.3 <= c <= 1.0 for c in clips)
    norms = [h.adapter.input_norm(layer) for layer in h.adapter.layers(h.model)]
    assert not all(torch.all(n.weight == 1) for n in norms)  # smoothing lives in the norm weights
    # the graph computes what the trained torch model computes
    report = export(h, tmp_path / "out", recipe)
    runner = OrtCausalLM.from_dir(tmp_path / "out", accuracy_level=1)
    x = ids[:2]
    with torch.no_grad():
        ref = h.model(input_ids=x, use_cache=False).logits.numpy()
    got = runner.logits(x.numpy())
    assert abs(got - ref).max() < 1e-4 * max(1.0, abs(ref).max())
    assert report["runtime_quantization"]["kv_cache"]["prefix"] == 2


@pytest.mark.parametrize("bad", [dict(epochs=-1), dict(batch_size=0), dict(lr_adjust=0)])
def test_impossible_settings_are_refused(bad):
    with pytest.raises(RecipeError):
        EndToEndConfig(**bad)


@pytest.mark.parametrize("tokens", [7, 64])
def test_chunked_kl_equals_the_whole_batch_formula_in_value_and_gradient(tokens):
    """kl_loss computes a chunk of tokens at a time (recomputing each in backward); the value and the gradient
    are the whole-batch formula's, chunk sizes that do not divide the token count included."""
    from qcompile.learn.end_to_end import kl_loss

    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, tokens, 50, generator=g, requires_grad=True)
    t = torch.randn(2, tokens, 50, generator=g)
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    whole = (lt.exp() * (lt - ls)).sum(-1).mean()
    (g_whole,) = torch.autograd.grad(whole, s)
    for chunk in (1, 5, 2 * tokens, 1024):
        kl = kl_loss(s, t, chunk_tokens=chunk)
        (g_chunk,) = torch.autograd.grad(kl, s)
        assert torch.allclose(kl, whole, rtol=1e-5, atol=1e-7)
        assert torch.allclose(g_chunk, g_whole, rtol=1e-5, atol=1e-8)
    with torch.no_grad():
        assert torch.allclose(kl_loss(s, t, chunk_tokens=3), whole, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["dlqat", "bisup"])
def test_gradient_checkpointing_trains_the_same_model(trained_llama, calib_file, method):
    """grad_checkpoint recomputes each decoder layer in backward: the trained integers and scales (and BiSup's
    activation clips) are those of a run without it, and the model is left in eval mode with checkpointing off."""
    base = [("canonicalize", {})]
    if method == "bisup":  # on the rotated W4A4KV4 model, its extras (clips, smoothing) inside the layers
        base = [("canonicalize", dict(untie_embeddings=True)), ("rotate", {}), ("act_quant", dict(bits=4)),
                ("kv_quant", dict(bits=4))]
    runs, layer_calls = [], []
    for ckpt in (False, True):
        h = load(trained_llama)
        calls = []
        # a pre-hook on the layer's first linear: the recompute stops early, after that layer's last saved tensor
        h.model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda *_: calls.append(1))
        run_passes(h, _recipe(*base))
        hooks_before = module_hooks(h.model)  # the quantizers' hooks included (act_quant, kv_quant)
        stats = run_passes(h, _recipe((method, dict(
            bits=4, group_size=16, epochs=2, batch_size=2, grad_checkpoint=ckpt, **calib(calib_file)))))
        assert not h.model.training and not h.model.is_gradient_checkpointing
        # the same hooks on every module as before, the quantizers' included (transformers 5's
        # gradient_checkpointing_enable leaves one on the embedding)
        assert module_hooks(h.model) == hooks_before
        assert not h.model(input_ids=torch.tensor([[1, 2, 3]])).logits.requires_grad
        runs.append((h, stats[f"0:{method}"]))
        layer_calls.append(len(calls))
    (plain, s0), (ckpt, s1) = runs
    steps = s0["epochs"] * 8 // 2  # 8 windows in batches of 2
    assert layer_calls[1] == layer_calls[0] + steps  # each training step ran the layer again in backward
    assert s1["kl_per_epoch"] == pytest.approx(s0["kl_per_epoch"], rel=1e-5)
    for name, qw in plain.quant_state.items():
        assert torch.equal(ckpt.quant_state[name].qweight, qw.qweight)
        assert torch.allclose(ckpt.quant_state[name].scale, qw.scale, rtol=1e-6, atol=0)
    for name, spec in plain.act_quant.items():
        assert ckpt.act_quant[name].clip_ratio == pytest.approx(spec.clip_ratio, rel=1e-6)


def test_gradient_checkpointing_is_refused_where_training_mode_would_turn_on_dropout(tmp_path, calib_file):
    from tiny_models import make_tiny_model

    folder = make_tiny_model("llama", tmp_path / "m", attention_dropout=0.1)
    with pytest.raises(QCompileError, match="dropout"):
        run_passes(load(folder), _recipe(("canonicalize", {}), ("dlqat", dict(
            bits=4, group_size=16, epochs=1, grad_checkpoint=True, **calib(calib_file)))))


@pytest.mark.parametrize("ckpt", [False, True])
def test_running_out_of_memory_names_the_settings_that_lower_it(trained_llama, calib_file, monkeypatch, ckpt):
    """Out of memory in a training step (after the KL before training was measured on all 4 batches): one message
    naming the settings that lower memory, and the model is left as it was (no parametrization, eval mode,
    checkpointing off)."""
    from qcompile.learn import end_to_end

    calls, real = {"n": 0}, end_to_end.kl_loss

    def oom(*a, **k):
        calls["n"] += 1
        if calls["n"] > 6:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*a, **k)

    monkeypatch.setattr(end_to_end, "kl_loss", oom)
    h = load(trained_llama)
    hint = "batch_size" if ckpt else "grad_checkpoint: true.*batch_size"
    with pytest.raises(QCompileError, match=f"out of CPU memory in end-to-end training.*{hint}"):
        run_passes(h, _recipe(("canonicalize", {}), ("dlqat", dict(bits=4, group_size=16, epochs=1, batch_size=2,
                                                                  grad_checkpoint=ckpt, **calib(calib_file)))))
    assert calls["n"] == 7  # the training's third step
    for name, m in h.model.named_modules():  # the parametrizations are gone again
        assert not hasattr(m, "parametrizations"), name
    assert not h.model.training and not h.model.is_gradient_checkpointing
