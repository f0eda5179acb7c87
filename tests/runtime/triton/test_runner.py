"""The CUDA runner against ONNX Runtime on the same exported folders.

On CPU the runner runs under Triton's interpreter (float32, no CUDA graph): it must reproduce ORT's logits and
greedy tokens, which checks the graph reading (weights, scales, zero points, norms, RoPE constants, tied head)
and the wiring of every kernel. On a GPU: same greedy tokens as ORT on a prompt set, CUDA-graph decode.
"""

import os
import shutil

import numpy as np
import pytest
import torch

from qcompile.errors import QCompileError
from qcompile.runtime.ort import OrtCausalLM
from qcompile.runtime.triton.runner import TritonCausalLM, load_exported
from greedy_checks import prompt_set, same_greedy
from tiny_models import export_tiny

HAS_CUDA = torch.cuda.is_available()


def export(folder, out, **rtn_kwargs):
    return export_tiny(folder, out, **rtn_kwargs)[1]


# family -> quantization: int4 asym g16 (Llama), int8 sym per-group with q/k/v biases (Qwen2), int4 sym with
# q/k norms (Qwen3), int4 asym per-channel (Mistral)
CONFIGS = {
    "llama": dict(bits=4, group_size=16),
    "qwen2": dict(bits=8, group_size=32, symmetric=True),
    "qwen3": dict(bits=4, group_size=32, symmetric=True),
    "mistral": dict(bits=4, group_size=None),
}
PROMPTS = [[1, 7, 80, 90, 33, 250, 12, 5], [1, 200, 201, 3, 9]]


@pytest.fixture(scope="module")
def exported(tiny_model_dirs, tmp_path_factory):
    return {f: export(tiny_model_dirs[f], tmp_path_factory.mktemp(f"x-{f}"), **kw) for f, kw in CONFIGS.items()}


def runner(folder, **kw):
    kw.setdefault("device", "cuda" if HAS_CUDA else "cpu")
    kw.setdefault("dtype", torch.float32)
    kw.setdefault("max_seq_len", 64)
    return TritonCausalLM.from_dir(folder, **kw)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_prefill_logits_match_ort(exported, family):
    r = runner(exported[family])
    assert r.notes == []  # every linear runs on the packed kernels
    ort = OrtCausalLM.from_dir(exported[family], accuracy_level=1)
    ids = PROMPTS[0]
    ref = ort.logits(np.array([ids]))[0]
    got = r.prefill(ids, all_logits=True).cpu().numpy()
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_greedy_tokens_match_ort(exported):
    """Prefill, then token-by-token decode through the split-K attention over the cache."""
    r = runner(exported["llama"])
    ort = OrtCausalLM.from_dir(exported["llama"], accuracy_level=1)
    for ids in PROMPTS:
        assert r.generate(ids, 6) == ort.generate(ids, 6)


def test_decode_logits_match_ort_along_its_tokens(exported):
    """Each decode step's logits, fed ORT's greedy tokens, against ORT's logits of the same positions; and each
    step returns a tensor of its own (in float32 the step's buffer is not handed out to be overwritten)."""
    r = runner(exported["llama"])
    ort = OrtCausalLM.from_dir(exported["llama"], accuracy_level=1)
    ids = PROMPTS[1]
    ref_tokens = ort.generate(ids, 5)
    ref = ort.logits(np.array([ids + ref_tokens[:-1]]))[0, len(ids) - 1:]
    steps = [r.prefill(ids)] + [r.decode(t) for t in ref_tokens[:-1]]
    got = torch.stack(steps).cpu().numpy()
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert len({s.data_ptr() for s in steps}) == len(steps)


def host_fed_greedy(r, ids, n):
    """The reference greedy loop: each step's argmax read on the host and fed to ``decode``."""
    out = [int(torch.argmax(r.prefill(ids)))]
    while len(out) < n:
        out.append(int(torch.argmax(r.decode(out[-1]))))
    return out


def test_greedy_steps_choose_what_the_host_fed_loop_does(exported):
    """``greedy_steps`` (each step fed its own argmax on the device) gives the host-fed loop's tokens after the
    first, continues from where ``decode`` left off, and refuses a cache overrun or no steps."""
    r = runner(exported["llama"])
    ids = PROMPTS[0]
    want = host_fed_greedy(r, ids, 9)
    first = int(torch.argmax(r.prefill(ids)))
    assert first == want[0]
    assert r.greedy_steps(first, 8).tolist() == want[1:]
    r.prefill(ids)
    r.decode(first)
    assert r.greedy_steps(want[1], 7).tolist() == want[2:]
    with pytest.raises(QCompileError, match="exceed the 64-token cache"):
        r.greedy_steps(want[-1], 64)
    with pytest.raises(QCompileError, match="at least 1"):
        r.greedy_steps(want[-1], 0)


def test_greedy_generate_runs_in_chunks_and_stops_at_eos(exported, monkeypatch):
    """Greedy ``generate`` runs ``greedy_steps`` chunks: across chunk borders it gives the host-fed loop's tokens,
    streams each to ``on_token`` in order, and stops at an eos inside a chunk (the steps run past it dropped)."""
    from qcompile.runtime.triton import runner as runner_mod

    monkeypatch.setattr(runner_mod, "GREEDY_CHUNK", 3)
    r = runner(exported["llama"])
    ids = PROMPTS[1]
    want = host_fed_greedy(r, ids, 8)
    heard = []
    assert r.generate(ids, 8, on_token=heard.append) == want == heard  # 1 + chunks of 3, 3, 1
    eos = want[5]
    assert want.index(eos) == 5  # first seen mid-chunk (chunks 1-3, 4-6)
    assert r.generate(ids, 8, eos_token_id=[999_999, eos]) == want[:6]
    assert r.generate(ids, 0) == []


def test_sampling_generate_is_seeded_and_temperature_zero_is_greedy(exported):
    """Sampling takes the host-fed path: one seed gives one sequence, another seed (almost surely) another; a
    temperature of 0 is the greedy path's tokens."""
    r = runner(exported["llama"])
    ids = PROMPTS[0]
    a = r.generate(ids, 6, do_sample=True, temperature=5.0, seed=1)
    assert len(a) == 6 and r.generate(ids, 6, do_sample=True, temperature=5.0, seed=1) == a
    assert r.generate(ids, 6, do_sample=True, temperature=5.0, seed=2) != a
    assert r.generate(ids, 6, do_sample=True, temperature=0.0) == r.generate(ids, 6)


def test_pdl_decode_step_computes_the_same(exported, monkeypatch):
    """``pdl=True`` (the decode step's RMSNorms, RoPE/cache stores, attention and GEMVs as programmatic dependents;
    the GEMVs read their first weight tile before waiting) changes when kernels run, not what they compute: the
    same logits through prefill and decode as the plain launches, and every one of those kernels of the pdl runner
    is asked for it. Under the interpreter PDL is a plain launch, so on CPU this covers the forwarding and the
    GEMV's peeled first tile (here the whole of K; tests/runtime/triton/test_wq_matmul.py covers longer K)."""
    from qcompile.runtime.triton import kv_attention, norm, wq_matmul

    seen = {"gemv": [], "rms_norm": [], "rope_store": [], "decode_attention": []}

    def spy(mod, name, flag):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, **kw: seen[name.strip("_")].append(flag(a, kw)) or real(*a, **kw))

    spy(wq_matmul, "_gemv", lambda a, kw: a[-1])
    for mod, name in ((norm, "rms_norm"), (kv_attention, "rope_store"), (kv_attention, "decode_attention")):
        spy(mod, name, lambda a, kw: kw.get("pdl", False))
    ids = PROMPTS[0]
    # eager decode (no CUDA graph on a GPU either), so every call passes the spies
    plain = runner(exported["llama"], pdl=False, cuda_graph=False)
    pdl = runner(exported["llama"], pdl=True, cuda_graph=False)
    torch.testing.assert_close(pdl.prefill(ids), plain.prefill(ids), rtol=0, atol=0)
    for t in (40, 41, 7):
        for flags in seen.values():
            flags.clear()
        b = plain.decode(t)
        assert all(flags and not any(flags) for flags in seen.values()), seen
        for flags in seen.values():
            flags.clear()
        a = pdl.decode(t)
        assert all(flags and all(flags) for flags in seen.values()), seen
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(HAS_CUDA and torch.cuda.get_device_capability()[0] >= 9, reason="checks the refusal")
def test_mma_gemv_refused_where_it_cannot_run(exported):
    """The tensor-core GEMV needs compiled kernels on sm_90+: asked for elsewhere (a CPU under the interpreter, an
    older GPU), the runner says so instead of silently running the pointer GEMV."""
    with pytest.raises(QCompileError, match="mma_gemv .* needs an sm_90"):
        runner(exported["llama"], mma_gemv=True, dtype=torch.float16)


def test_mma_gemv_refused_off_float16(exported):
    """The tensor-core GEMV is the fp16 decode's: with fp32 or bf16 activations its words would only take memory."""
    with pytest.raises(QCompileError, match="mma_gemv runs the float16 decode"):
        runner(exported["llama"], mma_gemv=True, dtype=torch.float32)


@pytest.mark.skipif(HAS_CUDA and torch.cuda.get_device_capability()[0] >= 9, reason="checks the refusal")
def test_digit_gemv_refused_where_it_cannot_run(exported, monkeypatch):
    """The digit-plane GEMV is a Gluon kernel for sm_90+ (or Triton's interpreter, through ``_gluon``): compiled on
    anything else, a clear refusal."""
    from qcompile.runtime.triton import runner as runner_mod

    monkeypatch.setattr(runner_mod, "interpreting", lambda: False)  # as if compiling, on a device without sm_90
    with pytest.raises(QCompileError, match="digit_gemv .* needs float16 .* sm_90"):
        runner(exported["llama"], digit_gemv=True, dtype=torch.float16)


def test_digit_gemv_refused_off_float16(exported):
    with pytest.raises(QCompileError, match=r"digit_gemv .* needs float16 \(torch.float32 asked\)"):
        runner(exported["llama"], digit_gemv=True, dtype=torch.float32)


def test_pdl_defaults_to_what_the_device_supports(exported):
    """``pdl=None`` (the default) turns programmatic dependent launches on exactly where ``supports_pdl`` says
    the device runs them (sm_90+, compiled kernels): off under the interpreter and below Hopper, on an H100."""
    from qcompile.runtime.triton._tune import supports_pdl

    device = "cuda" if HAS_CUDA else "cpu"
    assert runner(exported["llama"]).pdl is supports_pdl(device)
    assert runner(exported["llama"], pdl=False).pdl is False


def test_runs_a_group_query_attention_export(tiny_model_dirs, tmp_path):
    """export.attention=gqa computes the same attention through ORT's contrib op: the runner maps it too."""
    from qcompile.cli import main

    out = tmp_path / "gqa"
    assert main(["export", str(tiny_model_dirs["qwen3"]), "-o", str(out), "--recipe", "w4a16-g64-rtn", "--group-size",
                 "16", "--set", "export.attention=gqa"]) == 0
    r = runner(out)
    ort = OrtCausalLM.from_dir(out, accuracy_level=1)
    assert r.notes == [] and r.generate(PROMPTS[0], 6) == ort.generate(PROMPTS[0], 6)


@pytest.mark.parametrize("attention", ["standard", "gqa"])
def test_runs_a_fused_projection_export(tiny_model_dirs, tmp_path, attention):
    """export.fuse_projections: q|k|v and gate|up as one weight each (a Split after them, or q|k|v packed into
    GroupQueryAttention); the runner slices them back and computes what ORT does. Qwen2: with q/k/v biases."""
    from qcompile.cli import main

    out = tmp_path / "fused"
    assert main(["export", str(tiny_model_dirs["qwen2"]), "-o", str(out), "--recipe", "w4a16-g64-rtn", "--group-size",
                 "16", "--set", f"export.attention={attention}", "--set", "export.fuse_projections=true"]) == 0
    w = load_exported(out)
    q, k, v = (w.layers[1].linears[r] for r in ("q", "k", "v"))
    assert q.shape == (64, 64) and k.shape == v.shape == (64, 32) and q.bias.shape == (64,) and q.zero is not None
    r = runner(out)
    ort = OrtCausalLM.from_dir(out, accuracy_level=1)
    assert r.notes == [] and r.generate(PROMPTS[0], 6) == ort.generate(PROMPTS[0], 6)


def test_reads_the_graph(exported):
    w = load_exported(exported["qwen3"])
    assert (w.num_heads, w.num_kv_heads, w.head_dim, len(w.layers)) == (4, 2, 16, 2)
    assert w.has_qk_norm and w.layers[0].q_norm is not None and w.layers[0].input_norm is None  # folded
    assert w.lm_head is not None and not w.lm_head.quantized
    q = w.layers[0].linears["q"]
    assert q.quantized and q.bits == 4 and q.zero is None and q.group_size == 32 and q.shape == (64, 64)
    np.testing.assert_allclose(w.inv_freq[:2], [1.0, 10000 ** (-2 / 16)], rtol=1e-6)
    m = load_exported(exported["mistral"]).layers[1].linears["down"]
    assert m.group_size == 128 and m.zero is not None and m.scale.shape == (64,)  # per-channel: scale [out]


def test_quantized_kv_cache_stays_close(exported):
    """8-bit and 4-bit caches (prompt kept in float) against the float cache: small, ordered logit deviations."""
    ids = PROMPTS[0]
    logits = {}
    for bits in (16, 8, 4):
        r = runner(exported["llama"], kv_bits=bits, prefix_capacity=4)
        r.prefill(ids, float_prefix=3)
        logits[bits] = torch.stack([r.decode(t) for t in (40, 41)])
    scale = logits[16].abs().max()
    d8, d4 = ((logits[b] - logits[16]).abs().max() for b in (8, 4))
    assert 0 < d8 < d4 and d8 < 0.05 * scale


def test_refuses_graphs_with_unmapped_rewrites(exported, tmp_path):
    import onnx_ir as ir

    folder = tmp_path / "rewritten"
    shutil.copytree(exported["llama"], folder)
    model = ir.load(folder / "model.onnx")
    graph = model.graph
    mm = next(n for n in graph if n.op_type == "MatMul")
    node = ir.node("Round", [mm.inputs[0]], name="fake_quant")
    graph.insert_before(mm, node)
    mm.replace_input_with(0, node.outputs[0])
    ir.save(model, folder / "model.onnx", external_data="model.onnx_data")
    with pytest.raises(QCompileError, match="does not map yet.*Round"):
        load_exported(folder)
    with pytest.raises(QCompileError, match="not an exported folder"):
        load_exported(tmp_path / "missing")


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on machines without CUDA")
def test_cli_refuses_cuda_without_gpu(exported, capsys):
    from qcompile.cli import main

    assert main(["run", str(exported["llama"]), "hi", "--device", "cuda", "--raw"]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err


def test_cli_hands_pdl_gemv_choices_and_kv_bits_to_the_runner(exported, capsys, monkeypatch):
    """``qcompile run --device cuda --pdl --mma-gemv --digit-gemv --kv-bits 8`` builds the runner with those
    settings (the runner is stopped right there: this machine may have no GPU)."""
    from qcompile.cli import main

    seen = {}

    def from_dir(folder, **kw):
        seen.update(kw, folder=str(folder))
        raise QCompileError("stopped after from_dir")

    monkeypatch.setattr(TritonCausalLM, "from_dir", staticmethod(from_dir))
    folder = str(exported["llama"])
    assert main(["run", folder, "hi", "--device", "cuda", "--raw", "--pdl", "--mma-gemv", "--digit-gemv",
                 "--kv-bits", "8"]) == 2
    assert "stopped after from_dir" in capsys.readouterr().err
    assert seen == {"folder": folder, "kv_bits": 8, "pdl": True, "mma_gemv": True, "digit_gemv": True}
    assert main(["run", folder, "hi", "--device", "cuda", "--raw"]) == 2
    assert seen["pdl"] is None and seen["kv_bits"] is None  # the runner's default: on where the GPU supports it
    assert seen["mma_gemv"] is False and seen["digit_gemv"] is False
    assert main(["run", folder, "hi", "--device", "cuda", "--raw", "--no-pdl"]) == 2
    assert seen["pdl"] is False  # (both flags without --device cuda: refused, tests/test_cli.py)


# -- GPU ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def larger_exports(tmp_path_factory):
    """Llama-shaped models with real head sizes (64) on the GPU path's int4/int8 layouts."""
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("larger")
    src = make_tiny_model("llama", root / "src", hidden_size=256, intermediate_size=768, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return {name: export(src, root / name, **kw) for name, kw in {
        "w4-asym-g64": dict(bits=4, group_size=64), "w4-sym-g128": dict(bits=4, group_size=128, symmetric=True),
        "w8-sym-g64": dict(bits=8, group_size=64, symmetric=True), "w3-asym-g32": dict(bits=3, group_size=32)}.items()}


@pytest.mark.cuda
@pytest.mark.parametrize("family", list(CONFIGS))
def test_gpu_greedy_tokens_match_ort_tiny(exported, family):
    r = runner(exported[family], max_seq_len=128)
    ort = OrtCausalLM.from_dir(exported[family], accuracy_level=1)
    matched = [same_greedy(ort, r, ids, 24, 1e-4) for ids in prompt_set(320)]
    assert sum(matched) >= len(matched) - 1


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["w4-asym-g64", "w4-sym-g128", "w8-sym-g64", "w3-asym-g32"])
def test_gpu_greedy_tokens_match_ort(larger_exports, name):
    """fp32 path (IEEE dots): ORT's greedy tokens. fp16 path: ORT's logits up to fp16 rounding."""
    folder = larger_exports[name]
    ort = OrtCausalLM.from_dir(folder, accuracy_level=1)
    r32 = runner(folder, max_seq_len=128)
    r16 = runner(folder, dtype=torch.float16, max_seq_len=128)
    assert r32.notes == [] and r16.notes == []
    prompts = prompt_set(320, seed=1)
    matched = [same_greedy(ort, r32, ids, 32, 1e-4) for ids in prompts]
    assert sum(matched) >= len(matched) - 1
    for ids in prompts:
        seq = ids + ort.generate(ids, 32)
        ref = ort.logits(np.array([seq]))[0]
        got = r16.prefill(seq, all_logits=True).cpu().numpy()
        assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()


@pytest.mark.cuda
def test_gpu_cuda_graph_decode_equals_eager(larger_exports):
    """The captured decode step computes what the eager one does (same kernels and configs; cuBLAS may pick
    another algorithm for the fp16 head inside a graph, hence a rounding-level tolerance)."""
    folder = larger_exports["w4-asym-g64"]
    for bits in (16, 8):
        graphed = runner(folder, dtype=torch.float16, max_seq_len=256, kv_bits=bits)
        eager = runner(folder, dtype=torch.float16, max_seq_len=256, kv_bits=bits, cuda_graph=False)
        assert graphed._graph is not None and eager._graph is None
        for ids in prompt_set(320, seed=2):
            graphed.prefill(ids)
            eager.prefill(ids)
            for t in (5, 77, 300, 12):
                a, b = graphed.decode(t), eager.decode(t)
                torch.testing.assert_close(a, b, rtol=0, atol=1e-3 * b.abs().max().item())


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] < 9, reason="PDL needs sm_90+")
def test_gpu_pdl_decode_step_in_the_captured_step(larger_exports):
    """fp16 prefill and decode (captured in a CUDA graph) with the RMSNorms, RoPE/cache stores, attention and GEMVs
    as programmatic dependents (each releasing the next kernel early; the GEMVs' half2 path reading weights before
    its wait): the same logits as the plain launches, bit for bit, over 48 replays per cache width (an ordering
    race would show as a difference in some of them)."""
    folder = larger_exports["w4-asym-g64"]
    for bits in (16, 4):
        plain = runner(folder, dtype=torch.float16, max_seq_len=256, kv_bits=bits, pdl=False)
        pdl = runner(folder, dtype=torch.float16, max_seq_len=256, kv_bits=bits, pdl=True)
        assert pdl._graph is not None
        for ids in prompt_set(320, seed=3)[:2]:
            torch.testing.assert_close(pdl.prefill(ids), plain.prefill(ids), rtol=0, atol=0)
            for t in [5, 77, 300, 12] * 6:
                torch.testing.assert_close(pdl.decode(t), plain.decode(t), rtol=0, atol=0)


@pytest.fixture(scope="module")
def digit_export(tmp_path_factory):
    """A Llama-shaped model whose q|k|v, o and gate|up fit ``gemv_digits`` (hidden 512: K = 512, int4 in groups
    of 128); down (K = 1024, SwiGLU's input) keeps the pointer GEMV."""
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("digits")
    src = make_tiny_model("llama", root / "src", hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    return {sym: export(src, root / f"w4-g128-{sym}", bits=4, group_size=128, symmetric=sym) for sym in (False, True)}


@pytest.fixture(scope="module")
def digit_export_wide(tmp_path_factory):
    """Wider models for the GPU test only, exported on first use, by hidden size: 1024 (q|k|v 48 programs of 32 rows,
    o 32, gate|up 128; K = 1024, one slice at 4 warps) and 2048 (the 1.2B Llama's K, one slice at 2 warps)."""
    from tiny_models import make_tiny_model

    built = {}

    def get(hidden: int):
        if hidden not in built:
            root = tmp_path_factory.mktemp(f"digits_{hidden}")
            src = make_tiny_model("llama", root / "src", hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=2, num_attention_heads=hidden // 64,
                                  num_key_value_heads=hidden // 256, tie_word_embeddings=True)
            built[hidden] = export(src, root / "w4-g128", bits=4, group_size=128, symmetric=False)
        return built[hidden]

    return get


def test_digit_gemv_wiring_on_the_interpreter(digit_export, monkeypatch):
    """The runner's ``digit_gemv`` wiring apart from the kernel: its GEMV replaced by "decode the planes (exact),
    then the pointer GEMV on them", the runner must compute bit for bit what the plain
    fp16 runner does, through a multi-token prefill (no planes there) and decode steps in which q|k|v, o and gate|up
    of both layers read planes written by the RMSNorm and the attention's combine (and o adds the residual)."""
    from qcompile.runtime.triton import gemv_digits, runner as runner_mod

    if HAS_CUDA:
        pytest.skip("checks the wiring under the interpreter; the GPU test runs the kernel")
    calls = []

    def from_planes(self, planes, residual=None):
        calls.append(planes.shape[1])
        x = gemv_digits.planes_to_values(planes).to(torch.float16).view(1, -1)  # exact: planes hold fp16 values
        return self(x, residual=residual)

    monkeypatch.setattr(runner_mod._Linear, "from_planes", from_planes)
    folder = digit_export[False]
    dig = runner(folder, dtype=torch.float16, pdl=False, digit_gemv=True, cuda_graph=False)
    monkeypatch.undo()  # the plain runner built as usual
    monkeypatch.setattr(runner_mod._Linear, "from_planes", from_planes)
    base = runner(folder, dtype=torch.float16)
    assert dig.notes == []
    ids = [1, 200, 201, 3, 9]
    torch.testing.assert_close(dig.prefill(ids), base.prefill(ids), rtol=0, atol=0)
    assert calls == []
    for t in (5, 77):
        torch.testing.assert_close(dig.decode(t), base.decode(t), rtol=0, atol=0)
    assert calls == [512, 512, 512] * 4  # q|k|v, o, gate|up (K = 512) of two layers, two steps


def test_digit_gemv_decode_on_the_interpreter(digit_export, monkeypatch):
    """The runner's ``digit_gemv`` with the Gluon kernel itself under Triton's interpreter (``_gluon``): through a
    multi-token prefill (no planes there: the same bits as the plain runner) and decode steps in which q|k|v, o and
    gate|up of both layers read planes written by the RMSNorm and the attention's combine (o adds the residual), the
    logits are the plain fp16 runner's to fp16 rounding of the GEMVs (the digit GEMV's products are exact, the
    pointer GEMV's are fp32 sums), and the greedy next token is the same."""
    from qcompile.runtime.triton import runner as runner_mod

    if HAS_CUDA:
        pytest.skip("the GPU test runs the kernel compiled")
    calls = []
    from_planes = runner_mod._Linear.from_planes

    def counted(self, planes, residual=None):
        calls.append(planes.shape[1])
        return from_planes(self, planes, residual=residual)

    monkeypatch.setattr(runner_mod._Linear, "from_planes", counted)
    folder = digit_export[False]
    dig = runner(folder, dtype=torch.float16, pdl=False, digit_gemv=True, cuda_graph=False)
    base = runner(folder, dtype=torch.float16)
    assert dig.notes == []
    assert [lin.digits is not None for layer in dig.layers for lin in (layer.qkv, layer.o, layer.gate_up,
                                                                          layer.down)] == [True, True, True, False] * 2
    ids = [1, 200, 201, 3, 9]
    torch.testing.assert_close(dig.prefill(ids), base.prefill(ids), rtol=0, atol=0)
    assert calls == []
    for t in (5, 77):
        a, b = dig.decode(t), base.decode(t)
        # 3e-3 of the largest logit: about 5x the GEMVs' rounding differences here (a wrong wiring is off by more
        # than the logits' own size)
        torch.testing.assert_close(a, b, rtol=0, atol=3e-3 * b.abs().max().item())
        assert a.argmax() == b.argmax()
    assert calls == [512, 512, 512] * 4  # q|k|v, o, gate|up (K = 512) of two layers, two steps


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] < 9, reason="digit_gemv needs sm_90+")
@pytest.mark.parametrize("sym", [False, True, 1024, 2048], ids=["asym", "sym", "wide1024", "wide2048"])
@pytest.mark.parametrize("pdl", [True, False], ids=["pdl", "plain"])
def test_gpu_digit_gemv_decode(digit_export, digit_export_wide, sym, pdl):
    """``digit_gemv``: the decode step's q|k|v, o and gate|up run on digit planes written by the RMSNorm or the
    attention before them (all three in both layers, down not), each in one K slice at ``default_layout``'s warps
    (2 at K = 2048); its captured decode steps give the pointer-GEMV runner's logits to fp16 rounding, and ORT's
    greedy tokens up to near ties."""
    from qcompile.runtime.triton.gemv_digits import WARPS

    folder = digit_export_wide(sym) if isinstance(sym, int) and not isinstance(sym, bool) else digit_export[sym]
    base = runner(folder, dtype=torch.float16, max_seq_len=256, pdl=pdl)
    dig = runner(folder, dtype=torch.float16, max_seq_len=256, pdl=pdl, digit_gemv=True)
    assert dig.notes == []
    assert [lin.digits is not None for layer in dig.layers for lin in (layer.qkv, layer.o, layer.gate_up,
                                                                          layer.down)] == [True, True, True, False] * 2
    layouts = {(lin.digits.splits, lin.digits.warps) for layer in dig.layers for lin in (layer.qkv, layer.o,
                                                                                         layer.gate_up)}
    assert layouts == {(1, 2 if sym == 2048 else WARPS)}
    assert dig._graph is not None
    for ids in prompt_set(320, seed=4)[:3]:
        torch.testing.assert_close(dig.prefill(ids), base.prefill(ids), rtol=0, atol=0)  # prefill: no digits
        for t in (5, 77, 300, 12, 9, 41):
            a, b = dig.decode(t), base.decode(t)
            torch.testing.assert_close(a, b, rtol=0, atol=2e-2 * b.abs().max().item())
    ort = OrtCausalLM.from_dir(folder, accuracy_level=1)
    matched = [same_greedy(ort, dig, ids, 24, 3e-2) for ids in prompt_set(320, seed=5)]
    assert sum(matched) >= len(matched) - 1


@pytest.mark.cuda
@pytest.mark.skipif(not os.environ.get("QCOMPILE_SMOLLM2_EXPORT"), reason="set QCOMPILE_SMOLLM2_EXPORT to an "
                    "exported SmolLM2 folder")
@pytest.mark.parametrize("dtype,tie", [(torch.float32, 1e-3), (torch.float16, 3e-2)])
def test_gpu_smollm2_greedy_tokens_match_ort(dtype, tie):
    """Chat prompts: the same greedy tokens as ORT (fp32 ORT, accuracy level 1); a divergence is allowed only at a
    near tie (``tie`` times the logit range), and at most one prompt may have one."""
    from transformers import AutoTokenizer

    folder = os.environ["QCOMPILE_SMOLLM2_EXPORT"]
    tok = AutoTokenizer.from_pretrained(folder)
    ort = OrtCausalLM.from_dir(folder, accuracy_level=1)
    r = TritonCausalLM.from_dir(folder, dtype=dtype, max_seq_len=512)
    matched = []
    for q in ("What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
              "Explain gravity to a child.", "Translate 'good morning' to Spanish."):
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        scale = float(np.abs(ort.logits(np.array([ids]))[0, -1]).max())
        matched.append(same_greedy(ort, r, ids, 32, tie * scale))
    assert sum(matched) >= len(matched) - 1


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] < 9, reason="the mma GEMV needs sm_90")
@pytest.mark.parametrize("name", ["w4-asym-g64", "w4-sym-g128"])
def test_gpu_mma_gemv_decode_follows_ort(larger_exports, name, monkeypatch):
    """``mma_gemv=True`` with the pointer GEMV's candidates taken away: the decode's int4 GEMVs on tensor cores
    (gemv_mma). Fed ORT's greedy tokens, each decode step's logits stay within fp16 rounding of ORT's, as the
    default fp16 decode's do."""
    from qcompile.runtime.triton import gemv_mma, wq_matmul

    calls = []
    real = gemv_mma.launch
    monkeypatch.setattr(gemv_mma, "launch", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    gemv = wq_matmul.gemv_candidates
    # batch 1 on fp16 (the half2 path) has only the mma candidates; prefill's M <= 8 GEMVs keep theirs
    monkeypatch.setattr(wq_matmul, "gemv_candidates", lambda m, *a: [] if m == 1 else gemv(m, *a))
    folder = larger_exports[name]
    ort = OrtCausalLM.from_dir(folder, accuracy_level=1)
    r = runner(folder, dtype=torch.float16, max_seq_len=128, mma_gemv=True)
    assert calls  # the warm-up before capture ran the mma kernel
    for ids in prompt_set(320, seed=1)[:3]:
        tokens = ort.generate(ids, 16)
        ref = ort.logits(np.array([ids + tokens[:-1]]))[0, len(ids) - 1:]
        got = torch.stack([r.prefill(ids)] + [r.decode(t) for t in tokens[:-1]]).cpu().numpy()
        assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()
