"""qcompile: a quantization compiler for large language models.

The data path is one straight line (see ``qcompile.pipeline``):
load -> canonicalize -> model passes -> export -> graph passes -> save -> run/evaluate.

``QCompileConfig`` and ``QCompileQuantizer`` (``qcompile.api``) are imported on first use, so ``import qcompile``
stays cheap (no torch) for the CLI and for tools that only read the version.
"""

__version__ = "0.1.0"

__all__ = ["QCompileConfig", "QCompileQuantizer", "__version__"]

_LAZY = {"QCompileConfig": "qcompile.api", "QCompileQuantizer": "qcompile.api"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
