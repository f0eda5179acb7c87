import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import FAMILIES, make_tiny_model  # noqa: E402

import torch  # noqa: E402

from qcompile.models import load  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """family -> folder of a tiny random model (Llama, Qwen2 with bias, Qwen3 with q/k norm, Mistral)."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_model(f, root / f) for f in FAMILIES}


@pytest.fixture(params=FAMILIES)
def tiny_model_dir(request, tiny_model_dirs):
    return tiny_model_dirs[request.param]


def calibration_text() -> str:
    rng = random.Random(0)
    subj = ["the cat", "a dog", "my friend", "the old man", "our teacher", "the small bird", "a farmer", "the queen"]
    verb = ["sees", "likes", "finds", "watches", "follows", "helps", "calls", "visits"]
    obj = ["the river", "a red ball", "the green house", "an apple", "the big tree", "a quiet town", "the night sky"]
    return "\n".join(
        f"{rng.choice(subj).capitalize()} {rng.choice(verb)} {rng.choice(obj)} every day." for _ in range(400)
    )


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(calibration_text())
    return p


@pytest.fixture(scope="session")
def trained_llama(tiny_model_dirs, tmp_path_factory, calib_file):
    """The tiny Llama after 150 AdamW steps on the calibration text (~3 s)."""
    h = load(tiny_model_dirs["llama"])
    ids = torch.tensor(h.tokenizer(calib_file.read_text(), add_special_tokens=False)["input_ids"])
    model = h.model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, ids.numel() - 65, (16,), generator=g)
        batch = torch.stack([ids[s : s + 64] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("trained") / "llama"
    model.eval().save_pretrained(out, safe_serialization=True)
    h.tokenizer.save_pretrained(out)
    return out
