"""Graph passes: rewrites of the exported ONNX graph (``weight_qdq``: integer weights + DequantizeLinear)."""
