"""Every Hugging Face image classifier (and semantic segmentation model) under layer masking, at a tiny random
configuration (no downloads).

Run ``python -m tests.hf_zoo`` (``make hf-zoo``) for the report in docs/hf.md; ``tests/test_hugging_face.py``
checks a fast subset in ``make test`` and the whole zoo in ``make test-slow``.

Each architecture of ``transformers``' ``AutoModelForImageClassification`` is built from its configuration class
with every size shrunk (:func:`tiny_config`), converted with ``layer_masked(model)`` and checked with
:func:`~captum_layermask.testing.check_layer_masking` on a 32x32 batch (or the size the architecture needs)
with a quarter of the image removed. The outcome is "converts" or the error that names why not.
``--segmentation`` does the same for ``AutoModelForSemanticSegmentation`` at 64x64 (:func:`check_segmenter`).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import transformers
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES,
)

from captum_layermask import layer_masked
from captum_layermask.core.capture import first_line
from captum_layermask.testing import check_layer_masking

_SCALARS = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
    "embed_dim": 16,
    "embedding_size": 16,
    "num_channels": 3,
    "num_labels": 3,
    "projection_dim": 16,
    "mlp_ratio": 2,
}
_PER_STAGE = {"depths": 1, "num_heads": 2, "num_attention_heads": 2, "hidden_sizes": None, "embed_dims": None}
SKIPPED = {
    "shieldgemma2": "a multimodal Gemma 3 language model (image and text), not an image classifier at vision sizes",
    "imagegpt": "takes colour-cluster token ids (input_ids), not images",
    "siglip2": "takes images as variable-length patch sequences (NaFlex: pixel_values (N, P, C*p*p) with "
    "spatial_shapes), not (N, C, H, W) images",
    "dinat": "needs the natten package (neighborhood-attention kernels), which has no wheel for this platform",
}
"""Architectures the sweep leaves out, with the reason."""

REFUSED: Dict[str, str] = {
    "mobilevit": "MobileViT unfolds each feature map into patch sequences whose layer normalisation runs across a "
    "spatial dimension (refused by the layer-norm rule: removed cells would enter the statistics)",
    "mobilevitv2": "MobileViTV2 unfolds and folds feature maps with im2col/col2im (nn.Unfold/nn.Fold), which have no "
    "masking rule",
}
"""Architectures that do not convert yet, with what stands in the way (docs/hf.md)."""

_SWIN = {"image_size": 128, "patch_size": 4, "window_size": 4, "embed_dim": 16, "num_heads": [2, 2, 2, 2]}
OVERRIDES: Dict[str, Dict[str, Any]] = {
    "bit": {"embedding_size": 16, "hidden_sizes": [16, 32, 64, 128], "num_groups": 8, "image_size": 64},
    "convnext": {"patch_size": 4, "image_size": 64},
    "convnextv2": {"patch_size": 4, "image_size": 64},
    "efficientnet": {"image_size": 64, "num_block_repeats": [1] * 7},
    "swin": _SWIN,
    "donut-swin": _SWIN,
    "swinv2": {**_SWIN, "pretrained_window_sizes": [0, 0, 0, 0]},
    "levit": {
        "image_size": 64,
        "patch_size": 16,
        "hidden_sizes": [16, 32, 48],
        "num_attention_heads": [2, 2, 2],
        "key_dim": [8, 8, 8],
        "depths": [1, 1, 1],
    },
    "mobilevitv2": {"image_size": 64, "patch_size": 2},
    "mobilevit": {"image_size": 64, "patch_size": 2},
    "hgnet_v2": {"image_size": 64, "hidden_sizes": [128, 512, 1024, 2048], "depths": [1, 1, 1, 1]},
    "timm_wrapper": {"architecture": "resnet18"},  # any timm architecture; the timm zoo covers them all
    "perceiver": {
        "num_latents": 8,
        "d_latents": 32,
        "num_blocks": 1,
        "num_self_attends_per_block": 1,
        "num_self_attention_heads": 2,
        "num_cross_attention_heads": 1,
        "image_size": 32,
    },
}
"""Sizes for architectures whose stages or windows the generic shrinking does not fit."""


def _shrink_stages(config: Any) -> None:
    stages = len(getattr(config, "depths", None) or getattr(config, "hidden_sizes", None) or [])
    for name, value in _PER_STAGE.items():
        current = getattr(config, name, None)
        if isinstance(current, (list, tuple)) and len(current) == stages:
            setattr(config, name, [value or 8 * 2**i for i in range(stages)] if value is None else [value] * stages)


def _nested(config: Any) -> List[Any]:
    return [getattr(config, name) for name in ("vision_config", "text_config") if hasattr(config, name)]


def tiny_config(model_type: str) -> Any:
    """The architecture's configuration with every size shrunk (random weights; two layers, width 32)."""
    config = transformers.AutoConfig.for_model(model_type)
    for part in [config, *_nested(config)]:
        aliases = getattr(type(part), "attribute_map", {})
        for name, value in _SCALARS.items():
            current = getattr(part, name, None)
            if name not in aliases and isinstance(current, int) and not isinstance(current, bool):
                setattr(part, name, value)
        _shrink_stages(part)
    for name, value in OVERRIDES.get(model_type, {}).items():
        setattr(config, name, value)
    config.num_labels = 3
    return config


def classifiers() -> List[Tuple[str, str]]:
    """``(model_type, class name)`` for every image classifier ``transformers`` maps."""
    pairs = []
    for model_type, names in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.items():
        for name in (names,) if isinstance(names, str) else names:
            pairs.append((model_type, name))
    return pairs


def check(model_type: str, class_name: str, size: int = 32) -> Optional[str]:
    """None when the classifier converts with layer masking's properties, else why not (one line)."""
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(tiny_config(model_type)).eval()
    size = getattr(model.config, "image_size", size)
    size = size if isinstance(size, int) else size[0] if isinstance(size, (list, tuple)) else 32
    images = torch.rand(2, 3, size, size)
    mask = torch.ones(2, 1, size, size)
    mask[0, :, : size // 2, : size // 2] = 0
    mask[1, :, size // 2 :, :] = 0
    try:
        with torch.no_grad():
            model(images)
    except Exception as error:
        raise RuntimeError(f"the plain model fails on {size}x{size} images: {error}") from error
    try:
        check_layer_masking(model, images, mask, layer_masked(model), rtol=1e-4, check_padding=False)
    except Exception as error:  # the sweep reports every failure by its message
        return first_line(error)
    return None


SEGMENTATION_OVERRIDES: Dict[str, Dict[str, Any]] = {
    "beit": {"num_hidden_layers": 4, "out_indices": [1, 2, 3, 4], "use_auxiliary_head": False},
    "data2vec-vision": {
        "num_hidden_layers": 4,
        "out_indices": [1, 2, 3, 4],
        "use_auxiliary_head": False,
        "image_size": 64,
    },
    "dpt": {
        "num_hidden_layers": 4,
        "backbone_out_indices": [0, 1, 2, 3],
        "neck_hidden_sizes": [16, 32, 64, 64],
        "fusion_hidden_size": 32,
        "use_auxiliary_head": False,
    },
}
"""Sizes for segmentation heads that read four stages of a two-layer encoder otherwise."""


def segmenters() -> List[Tuple[str, str]]:
    """``(model_type, class name)`` for every semantic segmentation model ``transformers`` maps."""
    return list(MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.items())


def check_segmenter(model_type: str, class_name: str, size: int = 64) -> Tuple[Optional[str], float]:
    """``(None, visible share)`` when the segmentation model converts with layer masking's properties (its
    ``logits`` checked, and the output mask of the right half removed), else ``(why not, nan)``."""
    torch.manual_seed(0)
    config = tiny_config(model_type)
    for name, value in SEGMENTATION_OVERRIDES.get(model_type, {}).items():
        setattr(config, name, value)
    model = getattr(transformers, class_name)(config).eval()
    images = torch.rand(2, 3, size, size)
    mask = torch.ones(2, 1, size, size)
    mask[:, :, :, size // 2 :] = 0
    with torch.no_grad():
        model(images)  # a tiny configuration the model cannot run raises here: "not built"
    try:
        masked = layer_masked(model, output="logits")
        plain = _Logits(model)
        check_layer_masking(plain, images, mask, masked, rtol=1e-4, check_padding=False)
        with torch.no_grad():
            _, visible = masked(images, mask, return_mask=True)
    except Exception as error:  # the sweep reports every failure by its message
        return first_line(error), float("nan")
    return None, float(visible.float().mean())


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def main_segmentation() -> None:
    print("| model type | class | result | visible share of the logits, right half removed |")
    print("| --- | --- | --- | --- |")
    for model_type, class_name in segmenters():
        try:
            reason, share = check_segmenter(model_type, class_name)
        except Exception as error:  # building or running the tiny model failed
            reason, share = f"not built: {first_line(error, limit=200)}", float("nan")
        outcome = "converts" if reason is None else reason.replace("|", "/")[:300]
        print(f"| {model_type} | {class_name} | {outcome} | {'' if reason else f'{share:.2f}'} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model types to check")
    parser.add_argument("--segmentation", action="store_true", help="the semantic segmentation models instead")
    arguments = parser.parse_args()
    if arguments.segmentation:
        return main_segmentation()
    converted = 0
    pairs = [pair for pair in classifiers() if not arguments.only or pair[0] in arguments.only]
    for model_type, class_name in pairs:
        if model_type in SKIPPED:
            print(f"| {model_type} | {class_name} | left out: {SKIPPED[model_type]} |")
            continue
        start = time.perf_counter()
        try:
            reason = check(model_type, class_name)
        except Exception as error:  # building the tiny model failed
            reason = f"not built: {first_line(error, limit=200)}"
        converted += reason is None
        outcome = "converts" if reason is None else reason.replace("|", "/")
        print(f"| {model_type} | {class_name} | {outcome} | {time.perf_counter() - start:.1f} s |", flush=True)
    print(f"\n{converted} of {len(pairs) - sum(p[0] in SKIPPED for p in pairs)} convert")


if __name__ == "__main__":
    main()
