import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import FAMILIES, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """family -> folder of a tiny random model (Llama, Qwen2 with bias, Qwen3 with q/k norm, Mistral)."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_model(f, root / f) for f in FAMILIES}


@pytest.fixture(params=FAMILIES)
def tiny_model_dir(request, tiny_model_dirs):
    return tiny_model_dirs[request.param]
