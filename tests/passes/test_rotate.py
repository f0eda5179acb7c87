import pytest
import torch

from qcompile.errors import RecipeError
from qcompile.models import load
from qcompile.passes import rotate, rtn
from qcompile.pipeline import run_passes
from qcompile.quant.hadamard import hadamard_matrix
from qcompile.recipe import recipe_from_dict

# non-power-of-two sizes: hidden 96 = 12·8, MLP 224 = 28·8, head_dim 24 = 12·2 (Qwen3 keeps head_dim 16)
ODD_SIZES = dict(hidden_size=96, intermediate_size=224)

CONFIGS = {
    "all-hadamard": rotate.RotateConfig(),
    "all-orthogonal": rotate.RotateConfig(r1="orthogonal", r2="orthogonal", seed=5),
    "r1-hadamard": rotate.RotateConfig(r2=None, online_r3=False, online_r4=False),
    "r1-orthogonal": rotate.RotateConfig(r1="orthogonal", r2=None, online_r3=False, online_r4=False),
    "r2": rotate.RotateConfig(r1=None, online_r3=False, online_r4=False),
    "r4": rotate.RotateConfig(r1=None, r2=None, online_r3=False),
    "all-hadamard+online-o": rotate.RotateConfig(online_o=True),
    "online-o": rotate.RotateConfig(r1=None, r2=None, online_r3=False, online_r4=False, online_o=True),
}


@pytest.fixture(scope="module")
def odd_model_dirs(tmp_path_factory):
    from tiny_models import FAMILIES, make_tiny_model

    root = tmp_path_factory.mktemp("tiny_odd")
    return {f: make_tiny_model(f, root / f, seed=1, **ODD_SIZES) for f in FAMILIES}


def _logits(h, ids):
    with torch.no_grad():
        return h.model(input_ids=ids).logits


def _rel_err(out, ref) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("sizes", ["pow2", "odd"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_rotation_preserves_logits(tiny_model_dir, odd_model_dirs, sizes, name):
    folder = tiny_model_dir if sizes == "pow2" else odd_model_dirs[tiny_model_dir.name]
    h = load(folder)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = _logits(h, ids)
    before = {n: m.weight.clone() for n, _, m in h.linears()}
    stats = rotate.apply(h, CONFIGS[name])
    out = _logits(h, ids)
    err = _rel_err(out, ref)
    print(f"{tiny_model_dir.name} {sizes} {name}: max|Δlogit|/max|logit| = {err:.2e}")
    assert err < 1e-5
    changed = {n for n, _, m in h.linears() if not torch.equal(m.weight, before[n])}
    assert changed  # every config here rotates something
    if CONFIGS[name].r1 is not None:
        assert stats["norms_fused"] == 5 and not h.adapter.ties_embeddings(h.model)
        assert all(torch.all(n.weight == 1) for n in h.adapter.residual_norms(h.model))


def test_records_online_rotations_and_hooks(tiny_model_dirs):
    h = load(tiny_model_dirs["qwen3"])
    rotate.apply(h, rotate.RotateConfig())
    assert h.online_rotations["r4"]["size"] == 128 and h.online_rotations["r4"]["where"] == "down_proj input"
    assert h.online_rotations["r3"]["size"] == 16
    assert len(h.rotation_hooks) == 2  # one per down_proj
    H = rotate.qk_rotation_matrix(h)
    assert torch.equal(H, hadamard_matrix(16))
    assert torch.equal(rotate.online_rotation_matrix(h, "r4", torch.float32), hadamard_matrix(128, torch.float32))
    # R3 needs no weight change: (q H)(k H)ᵀ = q kᵀ for every q, k
    q, k = torch.randn(5, 16, dtype=torch.float64), torch.randn(7, 16, dtype=torch.float64)
    assert torch.allclose((q @ H) @ (k @ H).T, q @ k.T, atol=1e-12)


def test_r4_hooks_are_what_keeps_the_function(tiny_model_dirs):
    """down_proj holds W H; without the online x -> x H the model is wrong, with it the model is the float one."""
    h = load(tiny_model_dirs["llama"])
    ids = torch.randint(3, 300, (1, 16))
    ref = _logits(h, ids)
    rotate.apply(h, CONFIGS["r4"])
    h.model.to(torch.float64).to(torch.float32)  # hooks survive moves and casts (to_export_precision does this)
    assert _rel_err(_logits(h, ids), ref) < 1e-5
    for hk in h.rotation_hooks:
        hk.remove()
    assert _rel_err(_logits(h, ids), ref) > 1e-2


def test_no_r3_r4_means_nothing_online(tiny_model_dirs):
    h = load(tiny_model_dirs["mistral"])
    rotate.apply(h, rotate.RotateConfig(online_r3=False, online_r4=False))
    assert h.online_rotations == {} and h.rotation_hooks == [] and rotate.qk_rotation_matrix(h) is None


def test_seeds_give_different_rotations_of_the_same_function(tiny_model_dirs):
    ids = torch.randint(3, 300, (1, 16))
    hs = []
    for seed in (0, 1):
        h = load(tiny_model_dirs["llama"])
        rotate.apply(h, rotate.RotateConfig(seed=seed))
        hs.append(h)
    q0, q1 = (h.adapter.linear(h.adapter.layers(h.model)[0], "q").weight for h in hs)
    assert not torch.allclose(q0, q1)
    assert _rel_err(_logits(hs[0], ids), _logits(hs[1], ids)) < 1e-5


def test_rtn_after_rotation_through_a_recipe(tiny_model_dirs):
    h = load(tiny_model_dirs["qwen2"])
    ids = torch.randint(3, 300, (2, 24))
    ref = _logits(h, ids)
    recipe = recipe_from_dict({"name": "rot-w4", "passes": [
        {"pass": "rotate", "seed": 2},
        {"pass": "rtn", "bits": 4, "group_size": 16},
    ]})
    stats = run_passes(h, recipe)
    assert stats["0:rotate"]["online"] == ["r3", "r4"] and stats["1:rtn"]["quantized_linears"] == 14
    for name, qw in h.quant_state.items():
        assert torch.equal(h.model.get_submodule(name).weight, qw.dequantize())
    out = _logits(h, ids)
    assert torch.isfinite(out).all()
    assert 1e-4 < _rel_err(out, ref) < 0.5  # quantized (not identical), still the same model


def test_refuses_after_quantization_and_twice(tiny_model_dirs):
    h = load(tiny_model_dirs["llama"])
    rtn.apply(h, rtn.RTNConfig(bits=4, group_size=16))
    with pytest.raises(RecipeError, match="before any quantization"):
        rotate.apply(h, rotate.RotateConfig())
    h = load(tiny_model_dirs["llama"])
    rotate.apply(h, rotate.RotateConfig())
    with pytest.raises(RecipeError, match="already applied"):
        rotate.apply(h, rotate.RotateConfig())


def test_recipe_fields_and_bad_kind():
    r = recipe_from_dict({"name": "x", "passes": [{"pass": "rotate", "r1": None, "r2": "orthogonal", "seed": 3}]})
    assert r.passes[0].config == rotate.RotateConfig(r1=None, r2="orthogonal", seed=3)
    with pytest.raises(RecipeError, match="rotate.r1 must be one of hadamard, orthogonal or null"):
        recipe_from_dict({"name": "x", "passes": [{"pass": "rotate", "r1": "givens"}]})
    with pytest.raises(RecipeError, match="unknown field"):
        recipe_from_dict({"name": "x", "passes": [{"pass": "rotate", "r3": True}]})


def test_unsupported_hidden_size_is_refused_unless_orthogonal(tmp_path):
    from tiny_models import make_tiny_model

    # hidden 92 has no Hadamard construction here (nearest: 88, 96); nor has head_dim 10 (not a multiple of 4)
    folder = make_tiny_model("llama", tmp_path / "h92", hidden_size=92, intermediate_size=128, head_dim=10)
    h = load(folder)
    before = {n: p.clone() for n, p in h.model.named_parameters()}
    with pytest.raises(RecipeError, match=r"hidden size = 92 .*88 and 96.*use r1: orthogonal"):
        rotate.apply(h, rotate.RotateConfig())
    with pytest.raises(RecipeError, match=r"R2: head_dim = 10 .*use r2: orthogonal or r2: null"):
        rotate.apply(h, rotate.RotateConfig(r1="orthogonal"))
    assert all(torch.equal(p, before[n]) for n, p in h.model.named_parameters())  # refused before any change
    ids = torch.randint(3, 300, (1, 16))
    ref = _logits(h, ids)
    rotate.apply(h, rotate.RotateConfig(r1="orthogonal", r2="orthogonal", online_r3=False))
    assert _rel_err(_logits(h, ids), ref) < 1e-5


def test_unsupported_mlp_size_names_online_r4(tmp_path):
    from tiny_models import make_tiny_model

    h = load(make_tiny_model("llama", tmp_path / "m92", intermediate_size=92))
    with pytest.raises(RecipeError, match=r"R4: MLP size .* = 92 .*online_r4: false"):
        rotate.apply(h, rotate.RotateConfig())
    rotate.apply(h, rotate.RotateConfig(online_r4=False))
    assert "r4" not in h.online_rotations


@pytest.mark.slow
def test_smollm2_rotation_preserves_logits():
    h = load("smollm2-135m")
    prompts = ["The tower is 324 metres tall, about the same height as an 81-storey building.",
               "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
               "Paris is the capital of"]
    refs = []
    ids_list = [h.tokenizer(p, return_tensors="pt")["input_ids"] for p in prompts]
    refs = [_logits(h, ids) for ids in ids_list]
    stats = rotate.apply(h, rotate.RotateConfig())
    assert stats["r1_matrix"] == "36 (Paley II, q=17) ⊗ Sylvester 16" and h.online_rotations["r4"]["size"] == 1536
    worst, scale = 0.0, 0.0
    for ids, ref in zip(ids_list, refs):
        out = _logits(h, ids)
        worst, scale = max(worst, (out - ref).abs().max().item()), max(scale, ref.abs().max().item())
        assert torch.equal(out.argmax(-1), ref.argmax(-1))
    print(f"SmolLM2 float32 R1+R2+R4: max|Δlogit| = {worst:.2e} (max|logit| = {scale:.1f})")
    assert worst < 1e-4 * scale
