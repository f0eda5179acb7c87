"""Calibration-driven machinery shared by the passes that learn from data (GPTQ, and later learned rounding)."""

from qcompile.learn.capture import LayerBatch, LayerStep, LayerwiseRunner, map_tensors, on_device, resolve_device

__all__ = ["LayerBatch", "LayerStep", "LayerwiseRunner", "map_tensors", "on_device", "resolve_device"]
