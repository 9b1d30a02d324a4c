"""Measuring missingness bias: maskers, segmenters, diagnostics and the paper's evaluation (section 4).

- :mod:`.maskers`: ways of removing pixels (``"layer"``, ``"grey"``, ``"black"``, ``"blur"``, ``"mean"``).
- :mod:`.segmentation`: the features that are removed (patches, SLIC, quickshift).
- :mod:`.diagnostics`: linearity, output collapse, feature magnitude (supplementary section 7).
- :mod:`.removal`: removal curves and shape bias (sections 4.1, 4.2).
- :mod:`.attribution_metrics`: LIME under any masker and its metrics (section 4.4.2).
- :mod:`.dense`: the same questions for segmentation models, per pixel (mean IoU removal curves, where a
  region's explanation lies).
- :mod:`.report`: all of them at once, as tables and figures (``layermask evaluate``); :mod:`.plots`.
"""

from ._common import class_entropy
from .attribution_metrics import (
    LimeMetrics,
    alignment_score,
    binary_cosine_kernel,
    lime_attributions,
    lime_metrics,
    segment_scores,
    top_segments_mask,
    topk_ablation_accuracy,
    topk_jaccard,
)
from .dense import IoUCurve, RegionMass, region_attribution_mass, segmentation_removal_curve
from .diagnostics import SizeCurve, linearity, magnitude_curve, output_collapse
from .maskers import (
    MASKER_NAMES,
    BlurFill,
    ConstantFill,
    LayerMasking,
    Masker,
    MeanColourFill,
    black,
    get_masker,
    grey,
    masker_title,
)
from .normalization import IMAGENET_MEAN, IMAGENET_STD, normalizer
from .removal import (
    DEFAULT_FRACTIONS,
    ORDERS,
    RemovalCurve,
    ShapeBias,
    broken_mask,
    removal_curve,
    removal_order,
    shape_bias,
)
from .report import EvaluationData, EvaluationReport, default_top_k, evaluate
from .segmentation import SEGMENTER_NAMES, SLIC, Patches, Quickshift, consecutive_ids, get_segmenter, segment_images

__all__ = [
    "IoUCurve",
    "RegionMass",
    "region_attribution_mass",
    "segmentation_removal_curve",
    "BlurFill",
    "ConstantFill",
    "DEFAULT_FRACTIONS",
    "EvaluationData",
    "EvaluationReport",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LayerMasking",
    "LimeMetrics",
    "MASKER_NAMES",
    "Masker",
    "MeanColourFill",
    "ORDERS",
    "Patches",
    "Quickshift",
    "RemovalCurve",
    "SEGMENTER_NAMES",
    "SLIC",
    "ShapeBias",
    "SizeCurve",
    "alignment_score",
    "binary_cosine_kernel",
    "black",
    "class_entropy",
    "broken_mask",
    "consecutive_ids",
    "default_top_k",
    "evaluate",
    "get_masker",
    "get_segmenter",
    "grey",
    "lime_attributions",
    "lime_metrics",
    "linearity",
    "magnitude_curve",
    "masker_title",
    "normalizer",
    "output_collapse",
    "removal_curve",
    "removal_order",
    "segment_images",
    "segment_scores",
    "shape_bias",
    "top_segments_mask",
    "topk_ablation_accuracy",
    "topk_jaccard",
]
