"""Export: the float32 decoder graph written from the weights (``onnx_builder``) and the saved folder (``artifact``)."""
