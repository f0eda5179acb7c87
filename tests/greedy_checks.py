"""Greedy-token comparison shared by the runtime tests (Triton runner vs ORT), and their random prompts."""

import numpy as np


def same_greedy(ort, r, ids, n, tie_tol) -> bool:
    """True if the runner's greedy tokens equal ORT's. Where they part, ORT's own logits must show a near tie there
    (its token beats ours by less than ``tie_tol`` logits): rounding may flip a tie, a bug flips clear choices."""
    ours, ref = r.generate(ids, n), ort.generate(ids, n)
    if ours == ref:
        return True
    i = next(j for j, (a, b) in enumerate(zip(ours, ref)) if a != b)
    logits = ort.logits(np.array([ids + ref[:i]]))[0, -1]
    margin = float(logits[ref[i]] - logits[ours[i]])
    assert margin < tie_tol, f"prompt {ids}: step {i} picked {ours[i]} over ORT's {ref[i]} (margin {margin:.3g})"
    return False


def prompt_set(vocab, n=4, seed=0):
    """``n`` seeded prompts of 5 to 20 token ids below ``vocab``, each starting with id 1."""
    g = np.random.default_rng(seed)
    return [[1, *g.integers(3, vocab, size=int(g.integers(4, 20))).tolist()] for _ in range(n)]
