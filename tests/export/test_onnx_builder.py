import json

import numpy as np
import onnx
import pytest
import torch

from qcompile.export.artifact import DATA_FILE, MODEL_FILE, write_artifact
from qcompile.export.onnx_builder import build_graph
from qcompile.models import load
from qcompile.passes import canonicalize
from qcompile.runtime.ort import OrtCausalLM

TOL = 1e-4


def export_fp32(folder, out_dir, fuse_norms=True):
    h = load(folder)
    canonicalize.apply(h, canonicalize.CanonicalizeConfig(fuse_norms=fuse_norms))
    write_artifact(h, build_graph(h), out_dir, {"recipe": "fp32"})
    return h, out_dir


def torch_past(cache):
    """HF cache -> list of (key, value) numpy arrays, whatever the transformers version's cache class."""
    return [(k.numpy(), v.numpy()) for k, v in ((cache[i][0], cache[i][1]) for i in range(len(cache)))]


@torch.no_grad()
def test_prefill_decode_and_padded_batch_match_torch(tiny_model_dir, tmp_path):
    h, out = export_fp32(tiny_model_dir, tmp_path / "out")
    runner = OrtCausalLM.from_dir(out)
    g = torch.Generator().manual_seed(0)

    # (a) prefill of one prompt
    ids = torch.randint(3, 300, (1, 12), generator=g)
    ref = h.model(input_ids=ids, use_cache=True)
    logits, past = runner.forward(ids.numpy())
    assert np.abs(logits - ref.logits.numpy()).max() < TOL
    assert [k.shape for k, _ in past] == [k.shape for k, _ in torch_past(ref.past_key_values)]

    # (b) three decode steps, present fed back as past
    cache, length = ref.past_key_values, ids.shape[1]
    for _ in range(3):
        step = torch.randint(3, 300, (1, 1), generator=g)
        ref = h.model(input_ids=step, past_key_values=cache, use_cache=True)
        cache, length = ref.past_key_values, length + 1
        logits, past = runner.forward(step.numpy(), past=past)
        assert np.abs(logits - ref.logits.numpy()).max() < TOL
        for (k, v), (rk, rv) in zip(past, torch_past(cache)):
            assert k.shape[2] == length and np.abs(k - rk).max() < TOL and np.abs(v - rv).max() < TOL

    # (c) left-padded batch of two, then one decode step with the mask extended
    ids = torch.randint(3, 300, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    ref = h.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    logits, past = runner.forward(ids.numpy(), mask.numpy(), pos.numpy())
    keep = mask.bool().numpy()
    assert np.isfinite(logits).all()
    assert np.abs(logits[keep] - ref.logits.numpy()[keep]).max() < TOL
    step = torch.randint(3, 300, (2, 1), generator=g)
    mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    pos = pos[:, -1:] + 1
    ref = h.model(input_ids=step, attention_mask=mask, position_ids=pos, past_key_values=ref.past_key_values)
    logits, _ = runner.forward(step.numpy(), mask.numpy(), pos.numpy(), past)
    assert np.abs(logits - ref.logits.numpy()).max() < TOL


@torch.no_grad()
def test_greedy_generation_equals_transformers(tiny_model_dir, tmp_path):
    h, out = export_fp32(tiny_model_dir, tmp_path / "out")
    prompt = [1, 40, 41, 42, 43, 44]
    ref = h.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           do_sample=False, max_new_tokens=8)
    assert OrtCausalLM.from_dir(out).generate(prompt, 8, eos_token_id=h.tokenizer.eos_token_id) == \
        ref[0, len(prompt):].tolist()


@torch.no_grad()
def test_sliding_window_matches_torch(tmp_path):
    from tiny_models import make_tiny_model

    folder = make_tiny_model("mistral", tmp_path / "swa")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "sliding_window": 4}))
    h, out = export_fp32(folder, tmp_path / "out")
    assert h.adapter.geometry(h.model).sliding_window == 4
    runner = OrtCausalLM.from_dir(out)
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(1))
    ref = h.model(input_ids=ids, use_cache=True)
    logits, past = runner.forward(ids.numpy())
    assert np.abs(logits - ref.logits.numpy()).max() < TOL
    step = torch.tensor([[77]])
    ref = h.model(input_ids=step, past_key_values=ref.past_key_values, use_cache=True)
    assert np.abs(runner.forward(step.numpy(), past=past)[0] - ref.logits.numpy()).max() < TOL


def test_graph_interface_is_optimums_decoder_with_past(tiny_model_dirs, tmp_path):
    h, out = export_fp32(tiny_model_dirs["qwen3"], tmp_path / "out")
    m = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    assert {o.domain for o in m.opset_import} == {""} and m.opset_import[0].version == 21
    assert {n.domain for n in m.graph.node} == {""}

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    ins = {i.name: i for i in m.graph.input}
    outs = {o.name: o for o in m.graph.output}
    assert list(ins)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert list(ins)[3:] == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert list(outs) == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert dims(ins["input_ids"]) == ["batch_size", "sequence_length"]
    assert dims(ins["attention_mask"]) == ["batch_size", "past_sequence_length + sequence_length"]
    assert dims(ins["past_key_values.1.value"]) == ["batch_size", 2, "past_sequence_length", 16]
    assert dims(outs["present.0.key"]) == ["batch_size", 2, "past_sequence_length + sequence_length", 16]
    assert dims(outs["logits"]) == ["batch_size", "sequence_length", 320]
    assert ins["input_ids"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert {t.data_type for t in m.graph.initializer} == {onnx.TensorProto.FLOAT}
    names = {t.name for t in m.graph.initializer}
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" in names
    assert "model.layers.1.self_attn.k_norm.weight" in names  # per-head q/k norms keep their scale
    assert "model.layers.0.input_layernorm.weight" not in names  # folded into q/k/v by canonicalize
    q = next(t for t in m.graph.initializer if t.name == "model.layers.0.self_attn.q_proj.weight")
    assert list(q.dims) == [64, 64]  # [in, out]
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    assert {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"} == {DATA_FILE}


def test_unfused_norms_are_multiplied(tiny_model_dirs, tmp_path):
    h, out = export_fp32(tiny_model_dirs["llama"], tmp_path / "out", fuse_norms=False)
    ids = np.array([[1, 5, 9, 200, 17]])
    with torch.no_grad():
        ref = h.model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(OrtCausalLM.from_dir(out).logits(ids) - ref).max() < TOL


@torch.no_grad()
def test_tied_embeddings_are_stored_once(tmp_path):
    from tiny_models import VOCAB, make_tiny_model

    h, out = export_fp32(make_tiny_model("llama", tmp_path / "tied", tie_word_embeddings=True), tmp_path / "out")
    assert h.adapter.ties_embeddings(h.model)
    m = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    big = [t.name for t in m.graph.initializer if sorted(t.dims) == sorted([VOCAB, 64])]
    assert big == ["model.embed_tokens.weight"]
    ids = np.array([[1, 5, 9, 200, 17]])
    assert np.abs(OrtCausalLM.from_dir(out).logits(ids) - h.model(torch.from_numpy(ids)).logits.numpy()).max() < TOL


def test_artifact_folder(tiny_model_dirs, tmp_path):
    h = load(tiny_model_dirs["llama"])
    meta = {"recipe": {"name": "fp32"}, "ort_session_options": {"session.qdq_matmulnbits_accuracy_level": "1"}}
    h.model.config.use_cache = False
    sizes = write_artifact(h, build_graph(h), tmp_path, meta)
    assert {MODEL_FILE, DATA_FILE, "config.json", "generation_config.json", "qcompile.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(sizes)
    assert sorted(p.name for p in tmp_path.glob("*.onnx*")) == [MODEL_FILE, DATA_FILE]
    assert sizes[DATA_FILE] > 4 * sum(p.numel() for p in h.model.parameters()) * 0.99
    assert json.loads((tmp_path / "config.json").read_text())["use_cache"] is True
    assert h.model.config.use_cache is False  # the handle's config is left alone
    assert json.loads((tmp_path / "qcompile.json").read_text()) == meta
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.chat_template == h.tokenizer.chat_template
    assert OrtCausalLM.from_dir(tmp_path).accuracy_level == 1


@torch.no_grad()
@pytest.mark.filterwarnings("ignore")
def test_optimum_loads_the_folder_and_generates_like_torch(tiny_model_dir, tmp_path):
    from optimum.onnxruntime import ORTModelForCausalLM

    h, out = export_fp32(tiny_model_dir, tmp_path / "out")
    model = ORTModelForCausalLM.from_pretrained(out)
    assert model.can_use_cache
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8)
    assert model.generate(ids, **kwargs).tolist() == h.model.generate(ids, **kwargs).tolist()


@torch.no_grad()
@pytest.mark.filterwarnings("ignore")
def test_optimum_with_head_dim_other_than_hidden_over_heads(tmp_path):
    """Qwen3-style head_dim (16) != hidden_size // heads (8): Optimum's empty first past is [.., 8] wide."""
    from optimum.onnxruntime import ORTModelForCausalLM
    from tiny_models import make_tiny_model

    h, out = export_fp32(make_tiny_model("qwen3", tmp_path / "q3", hidden_size=32), tmp_path / "out")
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8)
    ref = h.model.generate(ids, **kwargs).tolist()
    assert ORTModelForCausalLM.from_pretrained(out).generate(ids, **kwargs).tolist() == ref
    assert OrtCausalLM.from_dir(out).generate(ids[0].tolist(), 8, eos_token_id=2) == ref[0][ids.shape[1]:]


@torch.no_grad()
def test_group_query_attention_graph_matches_torch(tiny_model_dir, tmp_path):
    """attention="gqa": one com.microsoft.GroupQueryAttention per layer, RoPE included, instead of the RoPE
    subgraph and MatMul/Softmax/Concat; prefill and decode through the cache give torch's logits and caches
    (batch 1, unpadded)."""
    h = load(tiny_model_dir)
    canonicalize.apply(h, canonicalize.CanonicalizeConfig())
    graph = build_graph(h, attention="gqa")
    ops = [n.op_type for n in graph.graph]
    assert ops.count("GroupQueryAttention") == h.model.config.num_hidden_layers and "Softmax" not in ops
    assert "Cos" not in ops  # no graph pass needs the rotated q/k here, so the op applies RoPE itself
    out = tmp_path / "gqa"
    write_artifact(h, graph, out, {"recipe": "fp32"})
    runner = OrtCausalLM.from_dir(out)
    ids = torch.randint(3, 300, (1, 11), generator=torch.Generator().manual_seed(4))
    ref = h.model(input_ids=ids, use_cache=True)
    logits, past = runner.forward(ids.numpy())
    assert np.abs(logits - ref.logits.numpy()).max() < TOL
    cache = ref.past_key_values
    for t in (7, 123, 42):
        step = torch.tensor([[t]])
        ref = h.model(input_ids=step, past_key_values=cache, use_cache=True)
        cache = ref.past_key_values
        logits, past = runner.forward(step.numpy(), past=past)
        assert np.abs(logits - ref.logits.numpy()).max() < TOL
        for (k, v), (rk, rv) in zip(past, torch_past(cache)):
            assert np.abs(k - rk).max() < TOL and np.abs(v - rv).max() < TOL


@torch.no_grad()
def test_optimum_generates_with_the_group_query_attention_graph(tiny_model_dirs, tmp_path):
    from optimum.onnxruntime import ORTModelForCausalLM

    h = load(tiny_model_dirs["qwen3"])
    canonicalize.apply(h, canonicalize.CanonicalizeConfig())
    write_artifact(h, build_graph(h, attention="gqa"), tmp_path / "gqa", {"recipe": "fp32"})
    model = ORTModelForCausalLM.from_pretrained(tmp_path / "gqa")
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8)
    assert model.generate(ids, **kwargs).tolist() == h.model.generate(ids, **kwargs).tolist()


def test_group_query_attention_refuses_sliding_windows(tmp_path):
    from qcompile.errors import RecipeError
    from tiny_models import make_tiny_model

    folder = make_tiny_model("mistral", tmp_path / "swa")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "sliding_window": 8}))
    h = load(folder)
    with pytest.raises(RecipeError, match="sliding-window"):
        build_graph(h, attention="gqa")
