"""ONNX export of layer-masked CNNs (not implemented yet; see the project's issue tracker)."""
