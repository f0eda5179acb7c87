"""Parity between the torch fake-quant model and the exported graph on ONNX Runtime.

Two checks, both on the same inputs: the largest |logit difference| over a batch of token windows, and greedy
generation token by token on a fixed set of chat prompts (identical tokens expected).
"""

from __future__ import annotations

import numpy as np
import torch

PARITY_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(prompt)["input_ids"]


@torch.no_grad()
def torch_reference(model: torch.nn.Module, tokenizer, ids: torch.Tensor | None = None, prompts=PARITY_PROMPTS,
                    max_new_tokens: int = 32) -> dict:
    """What the parity checks compare ORT against, recorded from the torch model: logits on ``ids`` [b, L] and
    greedy tokens on ``prompts``. Plain tensors, lists and strings, so it can be saved with ``torch.save`` and
    checked later in another process (``torch.load(..., weights_only=True)``)."""
    device = next(model.parameters()).device
    ref: dict = {}
    if ids is not None:
        ref["ids"] = ids.cpu()
        ref["logits"] = model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()
    if prompts:
        ref["max_new_tokens"], ref["greedy"] = max_new_tokens, []
        for prompt in prompts:
            pids = prompt_ids(tokenizer, prompt)
            out = model.generate(torch.tensor([pids], device=device), max_new_tokens=max_new_tokens,
                                 attention_mask=torch.ones(1, len(pids), dtype=torch.long, device=device),
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            ref["greedy"].append({"prompt": prompt, "prompt_ids": pids, "tokens": out[0, len(pids):].tolist(),
                                  "eos_token_id": tokenizer.eos_token_id})
    return ref


def compare_logits(reference: dict, runner) -> dict:
    """max/mean |Δlogit| between a recorded torch reference and ``runner`` (OrtCausalLM) on the same ids."""
    ref = reference["logits"].numpy()
    out = runner.logits(reference["ids"].numpy())
    diff = np.abs(ref - out)
    return {
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit": float(np.abs(ref).max()),
        "argmax_agreement": float((ref.argmax(-1) == out.argmax(-1)).mean()),
        "tokens": int(reference["ids"].numel()),
    }


def compare_greedy(reference: dict, runner) -> dict:
    results = []
    for g in reference["greedy"]:
        ort_new = runner.generate(g["prompt_ids"], reference["max_new_tokens"], eos_token_id=g["eos_token_id"])
        results.append({"prompt": g["prompt"], "identical": g["tokens"] == ort_new, "torch": g["tokens"],
                        "ort": ort_new})
    return {"prompts": len(results), "identical": sum(r["identical"] for r in results), "details": results}


def logit_parity(model: torch.nn.Module, runner, ids: torch.Tensor) -> dict:
    """max/mean |Δlogit| between ``model`` (torch) and ``runner`` (OrtCausalLM) on ``ids`` [b, L]."""
    return compare_logits(torch_reference(model, None, ids, prompts=()), runner)


def greedy_parity(model: torch.nn.Module, runner, tokenizer, prompts=PARITY_PROMPTS, max_new_tokens: int = 32) -> dict:
    return compare_greedy(torch_reference(model, tokenizer, None, prompts, max_new_tokens), runner)
