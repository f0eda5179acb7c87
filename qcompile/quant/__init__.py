from qcompile.quant.grid import QuantSpec, QuantizedWeight, compute_qparams, dequantize, fake_quantize, quantize

__all__ = ["QuantSpec", "QuantizedWeight", "compute_qparams", "quantize", "dequantize", "fake_quantize"]
