"""ONNX export of layer-masked CNNs, served by stock onnxruntime.

>>> from onnx_export import export_masked
>>> export_masked(model, "resnet50-masked.onnx", input_shape=(1, 3, 224, 224))
"""

from .export import ExportError, export_masked, verify
from .functions import DOMAIN, NeighborPad

__all__ = ["DOMAIN", "ExportError", "NeighborPad", "export_masked", "verify"]
