"""captum-layermask: trustworthy perturbation-based explanations of CNNs with layer masking.

Layer masking (Balasubramanian & Feizi, ICCV 2023) runs a CNN on the visible pixels of its input only, so that
removed pixels, whatever fills them, have no influence on the output.

- :mod:`captum_layermask.core`: the engine (``layer_masked``, rules, neighbor padding); torch only.
- :mod:`captum_layermask.integrations.captum`: ``LayerMask()``, the Captum baseline.
- :mod:`captum_layermask.integrations.detection`: ``DetectionScores``, a detector as one score per image, how well
  it still finds a chosen detection (D-RISE's target).
- :mod:`captum_layermask.integrations.torchvision_detection`: torchvision's detectors converted by parts, installed
  the first time a torchvision model is converted.
- :mod:`captum_layermask.integrations.segmentation`: ``RegionScores``, a segmentation model as per-class scores
  over a region (the target of Captum's methods).
- :mod:`captum_layermask.integrations.timm`: the rules and leaves of timm's layers, installed the first time a
  timm model is converted.
- :mod:`captum_layermask.integrations.torchvision`: Swin's window attention and patch merging, stochastic depth,
  installed the first time a torchvision model is converted.
- :mod:`captum_layermask.evaluation`: maskers, segmenters, diagnostics and evaluation of missingness bias.
- :mod:`captum_layermask.cli`: the ``layermask`` command.
"""

import importlib

from .core import (
    LayerMaskedModel,
    LayerMaskError,
    Masked,
    MaskShapeError,
    TracingError,
    UnsupportedLayerError,
    add_mask_stream,
    layer_masked,
    neighbor_pad,
    patch_segments,
    propagate_mask,
    random_patch_masks,
    register_leaf,
    register_mask_decoder,
    register_rule,
    register_rule_set,
    register_token_block,
    trace,
    unregister,
)
from .integrations.captum import LayerMask
from .integrations.detection import DetectionScores
from .integrations.segmentation import RegionScores

register_rule_set("timm", lambda: importlib.import_module("captum_layermask.integrations.timm"))
register_rule_set("transformers", lambda: importlib.import_module("captum_layermask.integrations.transformers"))
register_rule_set("torchvision", lambda: importlib.import_module("captum_layermask.integrations.torchvision"))

__all__ = [
    "DetectionScores",
    "LayerMask",
    "LayerMaskError",
    "LayerMaskedModel",
    "Masked",
    "MaskShapeError",
    "TracingError",
    "RegionScores",
    "UnsupportedLayerError",
    "add_mask_stream",
    "layer_masked",
    "neighbor_pad",
    "patch_segments",
    "propagate_mask",
    "random_patch_masks",
    "register_leaf",
    "register_mask_decoder",
    "register_rule",
    "register_rule_set",
    "register_token_block",
    "unregister",
    "trace",
]
__version__ = "0.2.0"
