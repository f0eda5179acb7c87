"""WikiText-2 perplexity exactly as BRIEF.md defines it: the text read whole, tokenized once without BOS, cut
into non-overlapping windows (2048 tokens by default; a trailing partial window is dropped); within each window
every token after the first is predicted from the ones before it; ppl = exp(mean token NLL).

With ``prefix`` (e.g. a chat-templated system prompt, BiSup's prompt-mixed-precision setting) every window is
read after those tokens; the scored tokens are the same as without it (each window's tokens after its first),
so the two figures compare directly."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # [b, L] token ids -> [b, L, vocab] logits


def _window_nll(logits_fn: LogitsFn, ids: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    p = 0 if prefix is None else int(prefix.numel())
    inputs = ids if p == 0 else torch.cat([prefix.view(1, -1).expand(ids.shape[0], -1).to(ids), ids], dim=1)
    logits = logits_fn(inputs).float()[:, p:]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = ids[:, 1:].to(logp.device)
    return -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def perplexity(logits_fn: LogitsFn | Sequence[LogitsFn], windows: torch.Tensor, batch_size: int = 1,
               desc: str = "ppl", prefix: torch.Tensor | None = None) -> dict:
    """``logits_fn`` may be several functions (e.g. one ORT session each): the windows are then shared out among
    them on threads (ORT and torch release the GIL), which keeps a many-core CPU busier than one session whose
    intra-op threads stop scaling. The figure does not depend on how many there are."""
    fns = list(logits_fn) if isinstance(logits_fn, Sequence) else [logits_fn]
    t0 = time.perf_counter()
    batches = [windows[i : i + batch_size] for i in range(0, windows.shape[0], batch_size)]
    sums = [0.0] * len(batches)
    counts = [0] * len(batches)
    bar = tqdm(total=len(batches), desc=desc, unit="window", leave=False)
    lock = threading.Lock()
    next_batch = iter(range(len(batches)))
    running = [0.0, 0]  # nll and tokens of the windows done so far, for the progress bar only

    def work(fn: LogitsFn) -> None:
        while True:
            with lock:
                i = next(next_batch, None)
            if i is None:
                return
            nll = _window_nll(fn, batches[i], prefix)
            sums[i], counts[i] = nll.double().sum().item(), nll.numel()
            with lock:
                running[0] += sums[i]
                running[1] += counts[i]
                bar.update(1)
                bar.set_postfix(ppl=f"{math.exp(running[0] / running[1]):.3f}")

    if len(fns) == 1:
        work(fns[0])
    else:
        with ThreadPoolExecutor(len(fns)) as pool:
            list(pool.map(work, fns))
    bar.close()
    total_nll, total_tokens = math.fsum(sums), sum(counts)  # summed in window order: same figure for any split
    return {
        "ppl": math.exp(total_nll / total_tokens),
        "mean_nll": total_nll / total_tokens,
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "predicted_tokens": total_tokens,
        "prefix_tokens": 0 if prefix is None else int(prefix.numel()),
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
