"""Model passes: one module per pass, each with a config dataclass (``Config``) and one entry, ``apply``.

``apply(handle: ModelHandle, config) -> dict`` changes the model in place (weights, quantized state) and returns
a small dict of statistics that lands in the export report. A recipe is an ordered list of these.
"""

from __future__ import annotations

import importlib
from types import ModuleType

PASSES: dict[str, str] = {
    "canonicalize": "qcompile.passes.canonicalize",
    "rotate": "qcompile.passes.rotate",
    "rtn": "qcompile.passes.rtn",
    "gptq": "qcompile.passes.gptq",
    "act_quant": "qcompile.passes.act_quant",
    "kv_quant": "qcompile.passes.kv_quant",
    "lwc": "qcompile.passes.lwc",
    "lsi": "qcompile.passes.lsi",
    "sde": "qcompile.passes.sde",
    "dlqat": "qcompile.passes.dlqat",
    "bisup": "qcompile.passes.bisup",
    "spinquant": "qcompile.passes.spinquant",
}


def get(name: str) -> ModuleType:
    from qcompile.errors import RecipeError

    if name not in PASSES:
        raise RecipeError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}")
    return importlib.import_module(PASSES[name])
