"""Tiny random models of every supported family, saved as real Hugging Face folders (safetensors + tokenizer).

Built from configs, never downloaded. The tokenizer is a byte-level BPE with no merges (256 byte tokens plus
specials), enough for generation and perplexity code paths.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
VOCAB = 320


def _config(family: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if family == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    if family == "qwen3":
        return Qwen3Config(head_dim=16, use_sliding_window=False, **common)
    raise ValueError(family)


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {tok: i + 3 for i, tok in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **byte_vocab}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    return tok


def make_tiny_model(family: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random ``family`` model with a byte tokenizer into ``folder`` and return it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg)
    # random norms so norm fusion is actually exercised (HF initialises them to ones)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    return folder


def export_tiny(folder: Path, out_dir: Path, meta: dict | None = None, **rtn_kwargs):
    """Canonicalize, optionally RTN-quantize (``rtn_kwargs``), and write the exported folder, stage by stage
    (no recipe machinery); returns ``(handle, out_dir)``."""
    from qcompile.export.artifact import write_artifact
    from qcompile.export.onnx_builder import build_graph
    from qcompile.graph import weight_qdq
    from qcompile.models import load
    from qcompile.passes import canonicalize, rtn

    h = load(folder)
    canonicalize.apply(h, canonicalize.CanonicalizeConfig())
    if rtn_kwargs:
        rtn.apply(h, rtn.RTNConfig(**rtn_kwargs))
    graph = build_graph(h)
    weight_qdq.apply(graph, h.quant_state)
    write_artifact(h, graph, out_dir, meta or {})
    return h, out_dir
