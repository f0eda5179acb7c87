"""Learned passes fold into ordinary integer weights: the exported graph is an RTN graph in kind and cost, and
ORT computes what the trained torch model computes."""

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from qcompile import passes
from qcompile.models import load
from qcompile.pipeline import export, run_passes
from qcompile.recipe import PassStep, Recipe
from qcompile.runtime.ort import OrtCausalLM


def _recipe(*steps) -> Recipe:
    return Recipe("test", [PassStep(name, passes.get(name).Config(**kw)) for name, kw in steps])


def _graph_kind(folder):
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    inits = sorted((i.data_type, tuple(i.dims)) for i in model.graph.initializer)
    return ops, inits


@pytest.mark.parametrize("learned", [
    ("lwc", dict(epochs=2)), ("lsi", dict(epochs=2, svd_corner=4)), ("sde", dict(epochs=2, cll_window=1)),
    ("dlqat", dict(epochs=1, magnitude_epochs=1)),
])
def test_learned_graph_equals_the_rtn_graph_in_kind(trained_llama, calib_file, tmp_path, learned):
    grid = dict(bits=3, group_size=16)
    cal = dict(calib_text=str(calib_file), calib_samples=4, calib_seq_len=32, batch_size=2)
    h = load(trained_llama)
    recipe = _recipe(("canonicalize", {}), (learned[0], {**grid, **cal, **learned[1]}))
    run_passes(h, recipe)
    export(h, tmp_path / "learned", recipe)
    hr = load(trained_llama)
    rtn_recipe = _recipe(("canonicalize", {}), ("rtn", grid))
    run_passes(hr, rtn_recipe)
    export(hr, tmp_path / "rtn", rtn_recipe)
    assert _graph_kind(tmp_path / "learned") == _graph_kind(tmp_path / "rtn")
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = h.model(input_ids=ids, use_cache=False).logits.numpy()
        rtn_ref = hr.model(input_ids=ids, use_cache=False).logits.numpy()
    got = OrtCausalLM.from_dir(tmp_path / "learned", accuracy_level=1).logits(ids.numpy())  # fp32 compute
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert np.abs(ref - rtn_ref).max() > 1e-3  # the training did change the weights
