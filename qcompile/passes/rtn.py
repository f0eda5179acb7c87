"""Round-to-nearest weight quantization: per-group min/max scales, optionally MSE-searched clipping."""

from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from qcompile.models.handle import ModelHandle
from qcompile.quant.grid import QuantizedWeight, search_clip
from qcompile.quant.targets import WeightQuantConfig, targets


@dataclass
class RTNConfig(WeightQuantConfig):
    pass


def apply(handle: ModelHandle, config: RTNConfig) -> dict:
    config.validate(handle)
    todo = targets(handle, config)
    for name, _, module, spec in tqdm(todo, desc="rtn", unit="linear", leave=False):
        w = module.weight.detach()
        clip = search_clip(w, spec, name=name) if config.mse_clip else 1.0
        handle.set_quantized(name, QuantizedWeight.from_float(w, spec, clip, name))
    return {"quantized_linears": len(todo)}


Config = RTNConfig
