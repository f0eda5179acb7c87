"""The CUDA runner on graphs with run-time rewrites (online Hadamard R4/R3, per-token activation quantization, a
quantized KV cache with a float prefix), against ONNX Runtime on the same exported folders.

Recipes as the built-in ones (w8a8, w4a8, w4a4kv4, w3a3-g64) with RTN for the weights (no calibration), on tiny
models. Under Triton's interpreter (float32, eager decode, no CUDA graph) the runner must give ORT's logits on a
prompt, each decode step's logits through its KV cache, and ORT's greedy tokens.

Tolerance. The quantizers round the same float32 values the same way (the kernels implement the graph's arithmetic
bit for bit: test_act_quant.py, test_kv_attention.py), but the values they quantize come out of matmuls, norms and
attention summed in another order than ORT's, ~1e-7 relative apart (up to ~1e-5 for attention outputs that
cancel). A value that close to a rounding boundary lands on the other side: one element moves by one quantization
step (1/127 of its token's range at 8 bits, 1/7 at 4). That is a legitimate difference, rarer the coarser the
grid (about one prompt in ten at 8 bits here, e.g. one o_proj input at -2.50001 vs -2.49998 steps moved the
logits by 2e-3 of their range). So: every prompt's logits within ``flip_tol`` = 2^-(b-1) of the logit range
(b: the case's narrowest quantizer; one flip at b bits is about 1/4 of that), and at least one of three prompts
at float level (1e-4 of the range, the weight-only runner's tolerance): a wiring error (a missing or misplaced
quantizer, rotation or float prefix) moves every prompt far beyond float level. Decode through the KV cache is
checked on that prompt: ORT's greedy tokens fed step by step, each step's logits within ``flip_tol`` of ORT's on
the whole sequence (per-token quantization makes a cached position's K/V equal to a recomputed one's), and the
runner's own greedy tokens equal to ORT's where ORT's choice is not a near tie.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from qcompile import passes
from qcompile.errors import QCompileError
from qcompile.models import load
from qcompile.pipeline import export, run_passes
from qcompile.recipe import PassStep, Recipe
from greedy_checks import prompt_set, same_greedy
from qcompile.runtime.ort import OrtCausalLM
from qcompile.runtime.triton.rewrites import Hadamard
from qcompile.runtime.triton.runner import TritonCausalLM, load_exported

HAS_CUDA = torch.cuda.is_available()
PROMPTS = [[1, 7, 80, 90, 33, 250, 12, 5], [1, 200, 201, 3, 9, 44], [1, 17, 150, 260, 61, 5, 88]]
PROMPT = PROMPTS[0]
TOL = 1e-4


def recipe(*steps, **export_opts) -> Recipe:
    r = Recipe("test", [PassStep(name, passes.get(name).Config(**kw)) for name, kw in steps])
    for k, v in export_opts.items():
        setattr(r.export, k, v)
    return r


def base(r3=True):
    return [("canonicalize", dict(fuse_norms=True, untie_embeddings=True)), ("rotate", dict(online_r3=r3))]


# name -> (family, model overrides, steps, export options)
CASES = {
    # w8a8: int8 per-channel sym weights, int8 per-token sym activations (the int8 GEMM), R4; plus an int8 sym KV
    # cache with a clip ratio, R3
    "w8a8kv8": ("llama", {}, base() + [("rtn", dict(bits=8, symmetric=True, group_size=None)),
                                       ("act_quant", dict(bits=8, symmetric=True)),
                                       ("kv_quant", dict(bits=8, symmetric=True, clip_ratio=0.95))], {}),
    # w4a8: int4 asym g16 weights (weight-only kernel after the fake quantizer), Qwen2's q/k/v biases
    "w4a8": ("qwen2", {}, base(False) + [("rtn", dict(bits=4, group_size=16)),
                                         ("act_quant", dict(bits=8, symmetric=True))], {}),
    # w4a4kv4: int4 asym activations and KV cache, R3 + R4; Qwen3's q/k norms before RoPE and R3
    "w4a4kv4": ("qwen3", {}, base() + [("rtn", dict(bits=4, group_size=16)),
                                       ("act_quant", dict(bits=4, symmetric=False)),
                                       ("kv_quant", dict(bits=4))], {}),
    # rotate.online_o: a Hadamard across heads on every o_proj input as well (hidden 64 = Sylvester)
    "w4a4-online-o": ("llama", {}, [base(False)[0], ("rotate", dict(online_r3=False, online_o=True)),
                                     ("rtn", dict(bits=4, group_size=16)),
                                     ("act_quant", dict(bits=4, symmetric=False))], {}),
    "w4a4kv4-prefix": ("llama", {}, base() + [("rtn", dict(bits=4, group_size=16)),
                                              ("act_quant", dict(bits=4, symmetric=False)),
                                              ("kv_quant", dict(bits=4, prefix=3))], {}),
    # w3a3-g64 style: int3 weights, int3 asym activations in groups (16 here: the tiny model's widths), R4 of order
    # 192 = 12 x 16 (a Paley base matrix: the Kronecker form, two MatMuls in the graph, the 2-D kernel here)
    "w3a3-g16": ("mistral", dict(intermediate_size=192),
                 base(False) + [("rtn", dict(bits=3, group_size=16)),
                                ("act_quant", dict(bits=3, symmetric=False, group_size=16))], {}),
}


@pytest.fixture(scope="module")
def exported(tiny_model_dirs, tmp_path_factory):
    """Exports made on first use (each test asks only for the ones it runs)."""
    from tiny_models import make_tiny_model

    made = {}

    def get(name):
        if name not in made:
            family, overrides, steps, opts = CASES[name]
            root = tmp_path_factory.mktemp(name)
            src = make_tiny_model(family, root / "src", **overrides) if overrides else tiny_model_dirs[family]
            h = load(src)
            r = recipe(*steps, **opts)
            run_passes(h, r)
            export(h, root / "out", r)
            made[name] = root / "out"
        return made[name]

    return get


def runner(folder, **kw):
    kw.setdefault("device", "cuda" if HAS_CUDA else "cpu")
    kw.setdefault("dtype", torch.float32)
    kw.setdefault("max_seq_len", 32)
    return TritonCausalLM.from_dir(folder, **kw)


def check_against_ort(folder, r, bits, new_tokens=4):
    """See the module docstring, "Tolerance"."""
    flip_tol = 2.0 ** -(bits - 1)
    ort = OrtCausalLM.from_dir(folder, accuracy_level=1)
    exact = []
    for ids in PROMPTS:
        ref = ort.logits(np.array([ids]))[0]
        got = r.prefill(ids, all_logits=True).cpu().numpy()
        scale = max(1.0, np.abs(ref).max())
        dev = np.abs(got - ref).max() / scale
        assert dev < flip_tol, f"prompt {ids}: logits {dev:.2e} of their range from ORT's"
        if dev < TOL:
            exact.append(ids)
    assert exact, "no prompt agrees with ORT at float level"
    ids = exact[0]
    tokens = ort.generate(ids, new_tokens)
    logits = r.prefill(ids)
    seq, ours = list(ids), []
    for tok in tokens:
        ref = ort.logits(np.array([seq]))[0, -1]
        scale = max(1.0, np.abs(ref).max())
        dev = np.abs(logits.cpu().numpy() - ref).max() / scale
        assert dev < flip_tol, f"decode after {seq}: logits {dev:.2e} of their range from ORT's"
        top2 = np.sort(ref)[-2:]
        if top2[1] - top2[0] > 2 * dev * scale:  # not a near tie: the same greedy choice
            assert int(torch.argmax(logits)) == tok
        ours.append(int(torch.argmax(logits)))
        seq.append(tok)
        logits = r.decode(tok)
    return ours == tokens


def test_w8a8_runs_the_int8_gemm(exported):
    folder = exported("w8a8kv8")
    w = load_exported(folder)
    down = w.layers[0].linears["down"]
    assert isinstance(down.input_steps[0], Hadamard) and down.input_steps[1].describe() == "int8 sym per-token"
    assert w.kv_quant.describe() == "int8 sym per-token clip 0.95" and w.layers[0].r3.n == 16
    r = runner(folder)
    # every linear but the float-input head: quantized inputs on 8-bit weights
    assert r.notes == [] and len(r.integer_linears) == 4 * len(w.layers)
    check_against_ort(folder, r, bits=8)


def test_w4a8(exported):
    folder = exported("w4a8")
    r = runner(folder)
    assert r.notes == [] and r.integer_linears == [] and r.kv_spec is None
    check_against_ort(folder, r, bits=8)


def test_online_hadamard_on_o_proj_inputs(exported):
    folder = exported("w4a4-online-o")
    r = runner(folder)
    assert r.notes == [] and r.kv_spec is None
    check_against_ort(folder, r, bits=4)


@pytest.mark.parametrize("name", ["w4a4kv4", "w4a4kv4-prefix"])
def test_w4a4kv4(exported, name):
    folder = exported(name)
    r = runner(folder)
    prefix = 3 if name.endswith("prefix") else 0
    assert r.notes == [] and r.kv_bits == 4 and r.w.kv_prefix == prefix
    check_against_ort(folder, r, bits=4)
    cache = r.caches[0]  # the cache holds codes from position P on, float keys before it
    assert cache.k_q.shape[-1] == r.head_dim // 2 and cache.prefix_capacity == max(1, prefix)
    if prefix:
        assert cache.k_float[0, :, :prefix].abs().min() > 0 and cache.k_scale[0, :, :prefix].eq(0).all()
        assert cache.k_scale[0, :, prefix:5].gt(0).all()


def test_w3a3_grouped_activations_and_a_paley_r4(exported):
    folder = exported("w3a3-g16")
    w = load_exported(folder)
    r4, spec = w.layers[0].linears["down"].input_steps
    assert (r4.n, r4.m) == (192, 12) and (spec.bits, spec.group_size) == (3, 16)
    r = runner(folder)
    assert r.notes == []
    check_against_ort(folder, r, bits=3, new_tokens=3)


def test_float_prefix_argument_cannot_change_the_graphs(exported):
    """The graph fixes P: a float_prefix passed to prefill (as `qcompile run --system` does) changes nothing."""
    folder = exported("w4a4kv4-prefix")
    r = runner(folder)
    a = r.prefill(PROMPT, all_logits=True)
    b = r.prefill(PROMPT, float_prefix=6, all_logits=True)
    assert torch.equal(a, b) and int(r._prefix[0]) == 3
    with pytest.raises(QCompileError, match="cannot change"):
        runner(folder, kv_bits=8)


def test_refuses_kv_layouts_the_cache_cannot_hold(tiny_model_dirs, tmp_path):
    """Groups within a head and 2/3-bit caches: ORT runs them, the cache kernels do not; one clear error."""
    for name, kv in {"g8": dict(bits=4, group_size=8), "kv3": dict(bits=3)}.items():
        h = load(tiny_model_dirs["llama"])
        r = recipe(*base(False), ("kv_quant", kv))
        run_passes(h, r)
        export(h, tmp_path / name, r)
        assert load_exported(tmp_path / name).kv_quant.bits == kv["bits"]
        with pytest.raises(QCompileError, match="8- or 4-bit codes with one scale"):
            runner(tmp_path / name)


def test_refuses_graphs_that_disagree_with_their_metadata(exported, tmp_path):
    folder = tmp_path / "edited"
    shutil.copytree(exported("w4a8"), folder)
    meta = json.loads((folder / "qcompile.json").read_text())
    meta["runtime_quantization"]["activations"] = {"int4 asym per-token": 14}
    (folder / "qcompile.json").write_text(json.dumps(meta))
    with pytest.raises(QCompileError, match="disagree with qcompile.json.*activation"):
        load_exported(folder)


def test_refuses_an_unmapped_rewrite_among_mapped_ones(exported, tmp_path):
    """A rewrite that is not graph.runtime_quant's (here: an extra Round on a quantized linear's input) is still
    refused, by name."""
    import onnx_ir as ir

    folder = tmp_path / "rewritten"
    shutil.copytree(exported("w4a8"), folder)
    model = ir.load(folder / "model.onnx")
    mm = next(n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].name.endswith("o_proj.weight_dq"))
    node = ir.node("Round", [mm.inputs[0]], name="extra")
    model.graph.insert_before(mm, node)
    mm.replace_input_with(0, node.outputs[0])
    ir.save(model, folder / "model.onnx", external_data="model.onnx_data")
    with pytest.raises(QCompileError, match="does not map yet.*Round"):
        load_exported(folder)


def test_group_query_attention_with_fused_projections(tiny_model_dirs, tmp_path):
    """export.attention=gqa + fuse_projections: R3 and the KV quantizers sit before GroupQueryAttention's packed
    inputs, the shared activation quantizer before the fused q|k|v MatMul."""
    h = load(tiny_model_dirs["qwen2"])
    r = recipe(*base(), ("rtn", dict(bits=4, group_size=16)), ("act_quant", dict(bits=8, symmetric=True)),
               ("kv_quant", dict(bits=8)), attention="gqa", fuse_projections=True)
    run_passes(h, r)
    export(h, tmp_path / "gqa", r)
    w = load_exported(tmp_path / "gqa")
    assert w.layers[0].r3 is not None and w.kv_quant.bits == 8
    assert w.layers[0].linears["q"].input_steps == w.layers[0].linears["v"].input_steps != ()
    check_against_ort(tmp_path / "gqa", runner(tmp_path / "gqa"), bits=8, new_tokens=3)


def test_linears_with_different_input_quantizers_run_side_by_side(device):
    """q/k/v whose inputs are quantized differently (e.g. learned clip ratios per linear): one prologue each,
    outputs concatenated, each equal to its own fake-quantized input times its weight."""
    from types import SimpleNamespace

    from qcompile.quant.activations import TokenQuantSpec, fake_quantize_tokens
    from qcompile.runtime.triton.runner import ExportedLinear, _Concat

    g = np.random.default_rng(0)
    specs = [TokenQuantSpec(4, False, None, 0.9), TokenQuantSpec(4, False, None, 0.9), TokenQuantSpec(8, True)]
    parts = [ExportedLinear(qweight=g.integers(0, 16, (64, n)).astype(np.int16),
                            scale=(g.random((4, n)) * 0.02 + 0.01).astype(np.float32),
                            zero=g.integers(4, 12, (4, n)).astype(np.int16), bits=4, input_steps=(spec,))
             for n, spec in zip((64, 32, 32), specs)]
    owner = SimpleNamespace(device=torch.device(device), dtype=torch.float32, notes=[], integer_linears=[], pdl=False,
                            mma_gemv=False)
    mod = TritonCausalLM._linear(owner, parts, "qkv")
    assert isinstance(mod, _Concat) and len(mod.parts) == 2 and owner.notes == []
    x = torch.randn(5, 64) * 3
    got = mod(x.to(device)).cpu()
    ref = torch.cat([fake_quantize_tokens(x, p.input_steps[0]) @ torch.from_numpy(p.dequantize()) for p in parts], -1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# -- GPU ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def larger_quant_exports(tmp_path_factory):
    """Llama-shaped: head_dim 64 (tensor-core decode attention), R4 of order 768 = 12 x 64 (the 2-D kernel)."""
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("larger-quant")
    src = make_tiny_model("llama", root / "src", hidden_size=256, intermediate_size=768, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2)
    out = {}
    for name, steps in {
        "w8a8": base(False) + [("rtn", dict(bits=8, symmetric=True, group_size=None)),
                               ("act_quant", dict(bits=8, symmetric=True))],
        "w4a4kv4": base() + [("rtn", dict(bits=4, group_size=64)), ("act_quant", dict(bits=4, symmetric=False)),
                             ("kv_quant", dict(bits=4, prefix=4))],
    }.items():
        h = load(src)
        r = recipe(*steps)
        run_passes(h, r)
        export(h, root / name, r)
        out[name] = root / name
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["w8a8", "w4a4kv4"])
def test_gpu_greedy_tokens_and_graph_decode(larger_quant_exports, name):
    """fp32 (IEEE dots): ORT's greedy tokens, a divergence only at a near tie; the captured decode step computes
    what the eager one does; fp16 runs (its rounding flips 4-bit quantizers far more often: not compared)."""
    folder = larger_quant_exports[name]
    ort = OrtCausalLM.from_dir(folder, accuracy_level=1)
    r32 = runner(folder, max_seq_len=128)
    assert r32.notes == [] and (name != "w8a8" or r32.integer_linears)
    matched = [same_greedy(ort, r32, ids, 24, 1e-3) for ids in prompt_set(320, seed=3)]
    assert sum(matched) >= len(matched) - 1
    eager = runner(folder, max_seq_len=128, cuda_graph=False)
    assert r32._graph is not None and eager._graph is None
    for ids in prompt_set(320, seed=4)[:2]:
        r32.prefill(ids)
        eager.prefill(ids)
        for t in (5, 77, 300):
            a, b = r32.decode(t), eager.decode(t)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * b.abs().max().item())
    r16 = runner(folder, dtype=torch.float16, max_seq_len=128)
    assert len(r16.generate(prompt_set(320, seed=5)[0], 8)) == 8
