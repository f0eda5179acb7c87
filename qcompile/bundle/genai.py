"""``genai_config.json``: what onnxruntime-genai needs to load an exported folder as it is.

Written from the folder's own ``config.json``/``generation_config.json`` and from the graph's inputs and outputs
(the shapes of ``present.*`` give the cache layout), in the form onnxruntime-genai's model builder writes. Our
graph already has the names genai looks for (Optimum's: ``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.%d.key|value`` -> ``logits``, ``present.%d.key|value``); a graph with any other input is
refused, naming it, since genai would not know how to feed it.

``past_present_share_buffer`` is true only for graphs exported with ``export.attention: gqa``: their
``GroupQueryAttention`` nodes write new keys into a max-length cache in place, as the builder's graphs do; the
standard graph concatenates past and new keys (present is past + new tokens long), so it cannot share a buffer.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx

from qcompile.fsutil import read_json
from qcompile.errors import QCompileError

GENAI_CONFIG_FILE = "genai_config.json"
# model types genai runs as plain decoder-only LLMs (its ModelType::IsLLM); anything else gets the generic one
GENAI_LLM_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "granite", "olmo", "smollm3"}
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


def _dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


def tokenizer_token_id(folder: Path, token: str | dict | None) -> int | None:
    """Id of a special token named in tokenizer_config.json (a string or an AddedToken dict)."""
    if isinstance(token, dict):
        token = token.get("content")
    if not token:
        return None
    tok = read_json(folder / "tokenizer.json")
    for added in tok.get("added_tokens", []):
        if added.get("content") == token:
            return int(added["id"])
    vocab = tok.get("model", {}).get("vocab")
    return int(vocab[token]) if isinstance(vocab, dict) and token in vocab else None


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def genai_config(folder: str | Path, graph: onnx.ModelProto, model_file: str = "model.onnx") -> dict:
    """The genai_config.json for ``folder`` whose graph is ``graph`` (loaded without its weights)."""
    folder = Path(folder)
    cfg = read_json(folder / "config.json")
    gen = read_json(folder / "generation_config.json")
    tok_cfg = read_json(folder / "tokenizer_config.json")
    inputs = {i.name: i for i in graph.graph.input}
    outputs = {o.name: o for o in graph.graph.output}

    layers = sorted({int(m.group(1)) for name in inputs if (m := _PAST.match(name))})
    if not layers:
        raise QCompileError(f"{folder / model_file} has no past_key_values.* inputs: onnxruntime-genai needs a "
                            "decoder with a KV cache")
    needed = ["input_ids"] + [f"past_key_values.{i}.{kv}" for i in range(len(layers)) for kv in ("key", "value")]
    missing = [n for n in needed if n not in inputs]
    missing += [n for n in ["logits"] + [f"present.{i}.{kv}" for i in range(len(layers)) for kv in ("key", "value")]
                if n not in outputs]
    if missing:
        raise QCompileError(f"{folder / model_file} lacks {', '.join(missing[:4])}: onnxruntime-genai needs "
                            "input_ids, past_key_values.N.key|value -> logits, present.N.key|value for every layer")
    unknown = sorted(set(inputs) - set(needed) - {"attention_mask", "position_ids"})
    if unknown:
        raise QCompileError(f"{folder / model_file} has input(s) onnxruntime-genai cannot feed: {', '.join(unknown)}")

    present = _dims(outputs["present.0.key"])  # [batch, kv_heads, total_length, head_size]
    heads = int(cfg.get("num_attention_heads", 0))
    head_size = present[3] if isinstance(present[3], int) else cfg.get("head_dim") or cfg["hidden_size"] // heads
    kv_heads = present[1] if isinstance(present[1], int) else cfg.get("num_key_value_heads", heads)
    logits = _dims(outputs["logits"])
    vocab = logits[-1] if isinstance(logits[-1], int) else cfg.get("vocab_size")
    context = int(cfg.get("max_position_embeddings") or cfg.get("seq_length") or 2048)

    # eos: generation_config first (chat models list their end-of-turn token there), then config.json, then the
    # tokenizer's eos token, as genai's builder resolves it; all of them stop generation
    eos: list[int] = []
    for v in (_ids(gen.get("eos_token_id")) + _ids(cfg.get("eos_token_id"))
              + _ids(tokenizer_token_id(folder, tok_cfg.get("eos_token")))):
        if v not in eos:
            eos.append(v)
    if not eos:
        raise QCompileError(f"{folder} names no eos token (generation_config.json, config.json or the tokenizer)")
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    if bos is None:
        bos = tokenizer_token_id(folder, tok_cfg.get("bos_token"))
    pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
    pad = eos[0] if pad is None else _ids(pad)[0]

    names = {"input_ids": "input_ids"}
    for optional in ("attention_mask", "position_ids"):
        if optional in inputs:
            names[optional] = optional
    names.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
    meta = read_json(folder / "qcompile.json")
    session_options = {"log_id": "onnxruntime-genai", "provider_options": []}
    # any other key is passed to ORT as a session config entry, e.g. the MatMulNBits accuracy level
    session_options.update({k: str(v) for k, v in meta.get("ort_session_options", {}).items()})
    model_type = cfg.get("model_type", "")

    model = {
        "bos_token_id": None if bos is None else _ids(bos)[0],
        "context_length": context,
        "decoder": {
            "session_options": session_options,
            "filename": model_file,
            "head_size": int(head_size),
            "hidden_size": int(cfg["hidden_size"]),
            "inputs": names,
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"},
            "num_attention_heads": heads,
            "num_hidden_layers": len(layers),
            "num_key_value_heads": int(kv_heads),
        },
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": pad,
        "type": model_type if model_type in GENAI_LLM_TYPES else "decoder",
        "vocab_size": int(vocab),
    }
    if model["bos_token_id"] is None:
        del model["bos_token_id"]
    search = {
        "diversity_penalty": 0.0,
        "do_sample": bool(gen.get("do_sample", False)),
        "early_stopping": True,
        "length_penalty": float(gen.get("length_penalty", 1.0)),
        "max_length": context,
        "min_length": 0,
        "no_repeat_ngram_size": int(gen.get("no_repeat_ngram_size", 0)),
        "num_beams": int(gen.get("num_beams", 1)),
        "num_return_sequences": 1,
        "past_present_share_buffer": any(n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"
                                         for n in graph.graph.node),
        "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
        "temperature": float(gen.get("temperature", 1.0)),
        "top_k": int(gen.get("top_k", 50)),
        "top_p": float(gen.get("top_p", 1.0)),
    }
    return {"model": model, "search": search}


def greedy_tokens(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation of token ids ``prompt`` by an ``onnxruntime_genai.Model`` (what a bundle's user runs)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def tokenizer_note(folder: str | Path) -> str | None:
    """Why onnxruntime-genai's own tokenizer would mis-encode this folder's tokenizer.json, if we know it will.

    A byte-level BPE that also declares ``byte_fallback`` (what transformers' GGUF conversion writes; qcompile's
    loader now clears the flag, see ``loader.fix_byte_level_tokenizer_json``) is read by genai's tokenizer as a
    SentencePiece-style model and most words encode to -1. transformers ignores the flag, so our runner is
    unaffected; token ids given to genai directly are fine.
    """
    from qcompile.models.loader import byte_level_with_byte_fallback

    if byte_level_with_byte_fallback(read_json(Path(folder) / "tokenizer.json")):
        return ("tokenizer.json is a byte-level BPE with byte_fallback=true (as converted from GGUF): "
                "onnxruntime-genai's tokenizer mis-encodes it; encode with transformers and pass token ids")
    return None
