"""captum-layermask: trustworthy perturbation-based explanations of CNNs with layer masking.

Layer masking (Balasubramanian & Feizi, ICCV 2023) runs a CNN on the visible pixels of its input only, so that
removed pixels, whatever fills them, have no influence on the output.
"""

from .baseline import LayerMask
from .convert import LayerMaskedModel, add_mask_stream, layer_masked, trace
from .errors import LayerMaskError, MaskShapeError, TracingError, UnsupportedLayerError
from .masked import Masked
from .masking import neighbor_pad, propagate_mask
from .registry import RuleHandle, register_rule

__all__ = [
    "LayerMask",
    "LayerMaskError",
    "LayerMaskedModel",
    "Masked",
    "MaskShapeError",
    "RuleHandle",
    "TracingError",
    "UnsupportedLayerError",
    "add_mask_stream",
    "layer_masked",
    "neighbor_pad",
    "propagate_mask",
    "register_rule",
    "trace",
]
__version__ = "0.1.0"
