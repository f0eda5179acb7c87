"""qcompile: a quantization compiler for large language models.

The data path is one straight line (see ``qcompile.pipeline``):
load -> canonicalize -> model passes -> export -> graph passes -> save -> run/evaluate.
"""

__version__ = "0.1.0"
