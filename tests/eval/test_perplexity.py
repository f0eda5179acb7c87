import math

import torch

from qcompile.eval.perplexity import perplexity


def _bigram_logits(table: torch.Tensor):
    """A fixed 'model': the logits of each next token depend only on the current one."""

    def fn(ids: torch.Tensor) -> torch.Tensor:
        return table[ids]

    return fn


def test_perplexity_is_exp_of_mean_nll_over_every_token_after_the_first():
    torch.manual_seed(0)
    vocab, table = 11, torch.randn(11, 11)
    windows = torch.randint(0, vocab, (5, 9))
    logp = torch.log_softmax(table, dim=-1)
    nll = [-logp[w[i], w[i + 1]].item() for w in windows for i in range(8)]
    out = perplexity(_bigram_logits(table), windows)
    assert out["predicted_tokens"] == 40
    assert math.isclose(out["ppl"], math.exp(sum(nll) / len(nll)), rel_tol=1e-6)


def test_windows_shared_among_several_sessions_give_the_same_figure():
    torch.manual_seed(1)
    table = torch.randn(13, 13)
    windows = torch.randint(0, 13, (7, 6))
    one = perplexity(_bigram_logits(table), windows)
    three = perplexity([_bigram_logits(table)] * 3, windows)
    assert three["ppl"] == one["ppl"] and three["predicted_tokens"] == one["predicted_tokens"] == 35


def test_prefix_tokens_are_read_but_not_scored():
    torch.manual_seed(2)
    table = torch.randn(7, 7)
    windows = torch.randint(0, 7, (3, 5))
    out = perplexity(_bigram_logits(table), windows, prefix=torch.tensor([1, 2, 3]))
    # a bigram model ignores everything before the previous token: the prefix cannot change the figure
    assert out["prefix_tokens"] == 3 and out["predicted_tokens"] == 12
    assert math.isclose(out["ppl"], perplexity(_bigram_logits(table), windows)["ppl"], rel_tol=1e-12)
