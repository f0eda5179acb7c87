import pytest
import torch

from qcompile.learn import LayerwiseRunner
from qcompile.models import load


def _windows(n=5, seq_len=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n, seq_len), generator=g)


@pytest.mark.parametrize("batch_size,cache_device", [(1, None), (2, "cpu")])
def test_replaying_layers_reproduces_the_model(tiny_model_dir, batch_size, cache_device):
    h = load(tiny_model_dir)
    ids = _windows()
    with torch.no_grad():
        ref = h.model.model(input_ids=ids, use_cache=False, output_hidden_states=True)
    runner = LayerwiseRunner(h, ids, batch_size=batch_size, cache_device=cache_device)
    assert len(runner.batches) == -(-5 // batch_size)  # the last batch may be smaller
    n_layers = len(h.adapter.layers(h.model))
    for step in runner.layers():
        # inputs of layer i: the embeddings for i == 0, else layer i-1's output (hidden_states[i], pre-norm)
        if step.index > 0:
            torch.testing.assert_close(torch.cat(runner.hidden_states()), ref.hidden_states[step.index])
    assert runner.layer_index == n_layers
    final = torch.cat(list(runner.final_norm_outputs()))
    torch.testing.assert_close(final, ref.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_kwargs_are_captured_without_cache_and_shared_between_equal_batches(tiny_model_dirs):
    h = load(tiny_model_dirs["qwen3"])
    runner = LayerwiseRunner(h, _windows(n=5), batch_size=2)
    b0, b1, b2 = runner.batches
    assert b0.kwargs is b1.kwargs  # stored once; the smaller last batch shares them too where they are equal
    for b in runner.batches:
        assert b.hidden.shape[:2] == (b.hidden.shape[0], 24)
        for k, v in b.kwargs.items():
            assert not type(v).__name__.endswith("Cache")
            if k == "use_cache":
                assert v is False


def test_next_layer_sees_the_modified_layer(tiny_model_dirs):
    """The sequential scheme: what the pass did to layer i (here: silence attention and MLP outputs) is what
    layer i+1 receives; set_outputs overrides it."""
    h = load(tiny_model_dirs["llama"])
    runner = LayerwiseRunner(h, _windows(n=3))
    steps = runner.layers()
    step = next(steps)
    before = [x.clone() for x in runner.hidden_states()]
    with torch.no_grad():
        for role in ("o", "down"):
            h.adapter.linear(step.layer, role).weight.zero_()
    step = next(steps)  # layer 0's output = its input (residual only)
    for a, b in zip(before, runner.hidden_states()):
        torch.testing.assert_close(a, b)
    custom = [torch.full_like(x, 0.5) for x in runner.hidden_states()]
    step.set_outputs(custom)
    next(steps, None)
    for a, b in zip(custom, runner.hidden_states()):
        assert torch.equal(a, b)


def test_run_keep_outputs_and_stop_after(tiny_model_dirs):
    h = load(tiny_model_dirs["mistral"])
    runner = LayerwiseRunner(h, _windows(n=4), batch_size=2)
    step = next(runner.layers())
    calls = {r: 0 for r in ("q", "k", "v", "o", "gate", "up", "down")}
    hooks = [
        h.adapter.linear(step.layer, r).register_forward_pre_hook(lambda m, a, r=r: calls.__setitem__(r, calls[r] + 1))
        for r in calls
    ]
    assert step.run(stop_after=[h.adapter.linear(step.layer, r) for r in ("q", "k", "v")]) is None
    assert calls == {"q": 2, "k": 2, "v": 2, "o": 0, "gate": 0, "up": 0, "down": 0}
    outs = step.run(keep_outputs=True)
    assert len(outs) == 2 and outs[0].shape == runner.batches[0].hidden.shape
    assert calls["down"] == 2
    for hd in hooks:
        hd.remove()
    with pytest.raises(ValueError):
        step.run(keep_outputs=True, stop_after=[h.adapter.linear(step.layer, "q")])


def test_device_helpers_on_cpu(tiny_model_dirs):
    from qcompile.learn import on_device, resolve_device

    h = load(tiny_model_dirs["llama"])
    assert resolve_device("cpu", h.model) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None, h.model).type == expected
    with on_device(h.model, "cpu") as dev:
        assert dev == torch.device("cpu") and h.device == dev
    assert h.device == torch.device("cpu")
