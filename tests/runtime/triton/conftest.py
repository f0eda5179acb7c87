"""Kernel tests run compiled on CUDA when there is a GPU, else under Triton's interpreter on CPU tensors.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it is set here, before any test module
imports the kernel modules. Tests marked ``cuda`` (real shapes) run only with a GPU.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
else:  # correctness on the GPU: each kernel's first configuration (tuning compiles every candidate of every shape)
    os.environ.setdefault("QCOMPILE_TRITON_AUTOTUNE", "0")

pytest.importorskip("triton")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU (real shapes, compiled kernels)")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE
