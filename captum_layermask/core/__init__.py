"""The layer-masking engine: model -> traced graph -> graph with a mask stream -> masked module.

It imports torch only, and nothing else of the project: the Captum integration, the evaluation and the command
line build on it.
"""

from .convert import add_mask_stream, layer_masked, trace
from .errors import LayerMaskError, MaskShapeError, TracingError, UnsupportedLayerError
from .gathering import register_token_block
from .masked import Masked
from .model import LayerMaskedModel, register_mask_decoder
from .patches import patch_segments, random_patch_masks
from .primitives import neighbor_pad, propagate_mask
from .registries import unregister
from .registry import register_leaf, register_rule, register_rule_set

__all__ = [
    "LayerMaskError",
    "LayerMaskedModel",
    "Masked",
    "MaskShapeError",
    "TracingError",
    "UnsupportedLayerError",
    "add_mask_stream",
    "layer_masked",
    "neighbor_pad",
    "patch_segments",
    "propagate_mask",
    "random_patch_masks",
    "register_mask_decoder",
    "register_leaf",
    "register_rule",
    "register_rule_set",
    "register_token_block",
    "unregister",
    "trace",
]
