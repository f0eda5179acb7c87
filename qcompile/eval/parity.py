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
def logit_parity(model: torch.nn.Module, runner, ids: torch.Tensor) -> dict:
    """max/mean |Δlogit| between ``model`` (torch) and ``runner`` (OrtCausalLM) on ``ids`` [b, L]."""
    device = next(model.parameters()).device
    ref = model(input_ids=ids.to(device), use_cache=False).logits.float().cpu().numpy()
    out = runner.logits(ids.numpy())
    diff = np.abs(ref - out)
    return {
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit": float(np.abs(ref).max()),
        "argmax_agreement": float((ref.argmax(-1) == out.argmax(-1)).mean()),
        "tokens": int(ids.numel()),
    }


@torch.no_grad()
def greedy_parity(model: torch.nn.Module, runner, tokenizer, prompts=PARITY_PROMPTS, max_new_tokens: int = 32) -> dict:
    device = next(model.parameters()).device
    results = []
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt)
        ref = model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                             device=device), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        ref_new = ref[0, len(ids):].tolist()
        ort_new = runner.generate(ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        results.append({"prompt": prompt, "identical": ref_new == ort_new, "torch": ref_new, "ort": ort_new})
    return {"prompts": len(results), "identical": sum(r["identical"] for r in results), "details": results}
