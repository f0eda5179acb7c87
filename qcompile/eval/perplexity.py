"""WikiText-2 perplexity exactly as BRIEF.md defines it: the text read whole, tokenized once without BOS, cut
into non-overlapping windows (2048 tokens by default; a trailing partial window is dropped); within each window
every token after the first is predicted from the ones before it; ppl = exp(mean token NLL).

With ``prefix`` (e.g. a chat-templated system prompt, BiSup's prompt-mixed-precision setting) every window is
read after those tokens; the scored tokens are the same as without it (each window's tokens after its first),
so the two figures compare directly."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # [b, L] token ids -> [b, L, vocab] logits


@torch.no_grad()
def perplexity(logits_fn: LogitsFn, windows: torch.Tensor, batch_size: int = 1, desc: str = "ppl",
               prefix: torch.Tensor | None = None) -> dict:
    total_nll, total_tokens, t0 = 0.0, 0, time.perf_counter()
    p = 0 if prefix is None else int(prefix.numel())
    bar = tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="window", leave=False)
    for i in bar:
        ids = windows[i : i + batch_size]
        inputs = ids if p == 0 else torch.cat([prefix.view(1, -1).expand(ids.shape[0], -1).to(ids), ids], dim=1)
        logits = logits_fn(inputs).float()[:, p:]
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:].to(logp.device)
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        total_nll += nll.double().sum().item()
        total_tokens += nll.numel()
        bar.set_postfix(ppl=f"{math.exp(total_nll / total_tokens):.3f}")
    return {
        "ppl": math.exp(total_nll / total_tokens),
        "mean_nll": total_nll / total_tokens,
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "predicted_tokens": total_tokens,
        "prefix_tokens": p,
        "seconds": time.perf_counter() - t0,
    }


def torch_logits_fn(model: torch.nn.Module) -> LogitsFn:
    device = next(model.parameters()).device

    def fn(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(device), use_cache=False).logits

    return fn


def ort_logits_fn(runner) -> LogitsFn:
    """``runner`` is a ``qcompile.runtime.ort.OrtCausalLM``."""

    def fn(ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(runner.logits(ids.numpy()))

    return fn
