"""Running exported folders (``ort``: ONNX Runtime on CPU); reads only the folder, never the passes."""
