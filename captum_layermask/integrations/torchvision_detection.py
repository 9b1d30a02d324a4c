"""torchvision's object detectors under layer masking, converted by parts (:mod:`captum_layermask.core.parts`).

Faster R-CNN, Mask R-CNN, Keypoint R-CNN (``GeneralizedRCNN``), RetinaNet, FCOS and SSD/SSDlite: the
image-dependent parts (backbone and FPN, RPN and box heads, RoI pooling, mask and keypoint heads) run
layer-masked; anchors, box decoding, top-k and NMS run as torchvision wrote them. Imported with the torchvision
rule set, the first time a model with a torchvision submodule is converted.

Two rules give a detection its meaning under a mask (docs/detection.md):

- *no candidate without evidence*: an anchor or RoI whose score no visible pixel reaches proposes nothing (its
  objectness and class logits are ``-inf``; for softmax heads the background takes all the probability), so it
  never takes a place in top-k from a visible one;
- *a box must be mostly visible*: a detection whose box has less than ``min_visible`` (default 0.5) of its pixels
  visible is dropped. Its visible part would not match the box at IoU 0.5, the match criterion of detection
  benchmarks: what it claims lies mostly where the model saw nothing.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, RoIAlign, roi_align

from ..core.errors import LayerMaskError, UnsupportedLayerError
from ..core.masked import Masked, align_rank
from ..core.parts import (
    Convert,
    Fill,
    ImageMasks,
    LayerMaskedParts,
    carry,
    convert_parts,
    lowest_fill,
    register_part_model,
)
from ..core.registry import RuleRegistry, builtin_rule
from ..core.rules.resampling import interpolate


@builtin_rule(GeneralizedRCNNTransform)
def detection_transform(op: GeneralizedRCNNTransform, images: Any, targets: Any = None) -> Tuple[ImageList, Any]:
    """torchvision's detection transform on masked images: normalisation, resizing and batching.

    Each image is normalised, then resized by the bilinear interpolation rule (neighbor-padded by one cell, so a
    resized pixel reads visible pixels only; visible where a visible pixel is among its taps), then batched: the
    zeros the transform pads the batch with are visible, as the plain model sees them. A full mask reproduces the
    transform exactly.
    """
    if targets is not None:
        raise UnsupportedLayerError("the detection transform with training targets; call the model in eval mode.")
    if isinstance(images, Masked):
        images = [Masked(value, mask) for value, mask in zip(images.value, images.mask)]
    values, masks = [], []
    for image in images:
        if not isinstance(image, Masked):
            raise LayerMaskError("every image of a masked detector call needs a mask.")
        normalized = op.normalize(image.value)
        size = op.resize(normalized[:1], None)[0].shape[-2:]  # the transform's own size rule, on one channel
        resized = interpolate(
            F.interpolate,
            Masked(normalized[None], image.mask[None]),
            size=tuple(size),
            mode="bilinear",
            align_corners=False,
        )
        values.append(resized.value[0])
        masks.append(resized.mask[0])
    batch = op.batch_images(values, size_divisible=op.size_divisible)
    batch_mask = batch.new_ones(batch.shape[0], 1, *batch.shape[-2:])
    for index, mask in enumerate(masks):
        batch_mask[index, :, : mask.shape[-2], : mask.shape[-1]] = mask
    sizes = [(int(value.shape[-2]), int(value.shape[-1])) for value in values]
    return ImageList(carry(Masked(batch, batch_mask)), sizes), targets


def _visible_mean(sums: Tensor, visible: Tensor, removed: Tensor) -> Masked:
    """RoI Align of ``x*m``, ``m`` and ``1-m``, combined: taps on removed cells take the mean of the bin's visible
    taps, ``sums * (visible + removed) / visible``; a bin none of whose taps on the map is visible is 0 and removed
    (one with no tap on the map stays visible: its zeros are the layer's own)."""
    scale = torch.where(visible > 0, (visible + removed) / torch.where(visible > 0, visible, 1), 0)
    return Masked(sums * scale, ((visible > 0) | (removed == 0)).to(sums.dtype))


@builtin_rule(roi_align, RoIAlign)
def roi_align_rule(op: Any, x: Any, boxes: Any, *args: Any, **kwargs: Any) -> Any:
    """RoI Align (``torchvision.ops.roi_align``, ``RoIAlign``) that reads visible cells only.

    Each output bin averages bilinear samples of the feature map; under the mask, the taps on removed cells take
    the mean of the bin's visible taps (the average-pooling rule): ``align(x*m) * (align(m) + align(1-m)) /
    align(m)``. Samples outside the feature map read zeros as in the layer. A bin is removed when its taps on the
    map are all removed (its value is then 0); a full mask reproduces the layer exactly.

    Shapes: ``x`` ``(N, C, H, W)``, mask ``(N or 1, 1, H, W)``; output ``(R, C, S, S)``, mask ``(R, 1, S, S)``.
    """
    if not isinstance(x, Masked):
        return op(x, boxes, *args, **kwargs)
    mask = align_rank(x.mask, 4).expand(x.value.shape[0], 1, *x.value.shape[-2:])
    sums = op(x.value * mask, boxes, *args, **kwargs)
    shares = op(torch.cat([mask, 1 - mask], 1), boxes, *args, **kwargs)  # visible and removed, one call
    return _visible_mean(sums, shares[:, :1], shares[:, 1:])


@builtin_rule(MultiScaleRoIAlign)
def multiscale_roi_align(op: MultiScaleRoIAlign, x: Mapping[str, Any], boxes: List[Tensor], image_shapes: Any) -> Any:
    """RoI Align over FPN levels that reads visible cells only: the RoI Align rule (:func:`roi_align_rule`) on
    the level each box is assigned to. Shapes: ``x[name]`` ``(N, C, H_l, W_l)`` with masks ``(N, 1, H_l, W_l)``;
    output ``(R, C, S, S)``, mask ``(R, 1, S, S)``."""
    levels = {name: level for name, level in x.items() if isinstance(level, Masked)}
    if not levels:
        return op(x, boxes, image_shapes)
    batch = next(iter(levels.values())).value.shape[0]
    masks = {
        name: align_rank(level.mask, 4).expand(batch, 1, *level.value.shape[-2:]) for name, level in levels.items()
    }
    sums = op({name: level.value * masks[name] for name, level in levels.items()}, boxes, image_shapes)
    shares = op({name: torch.cat([mask, 1 - mask], 1) for name, mask in masks.items()}, boxes, image_shapes)
    return _visible_mean(sums, shares[:, :1], shares[:, 1:])


def background_fill(num_classes: int) -> Fill:
    """Removed cells score the background (class 0) with certainty: logit 0 for it, ``-inf`` for the others.

    For softmax classifiers of anchors or RoIs whose channels hold ``anchors x num_classes`` logits (SSD's head,
    Faster R-CNN's box predictor): channel ``c`` is class ``c % num_classes``.
    """

    def fill(value: Tensor, mask: Tensor) -> Tensor:
        classes = torch.arange(value.shape[1], device=value.device) % num_classes
        logits = torch.where(classes == 0, 0.0, float("-inf")).to(value.dtype)
        logits = logits.reshape(1, -1, *(1,) * (value.ndim - 2))
        return torch.where(align_rank(mask, value.ndim) > 0, value, logits)

    return fill


def _rcnn_fills(model: GeneralizedRCNN) -> Dict[str, Fill]:
    fills: Dict[str, Fill] = {"rpn.head.cls_logits": lowest_fill}
    predictor = model.roi_heads.box_predictor
    fills["roi_heads.box_predictor.cls_score"] = background_fill(predictor.cls_score.out_features)
    for head in ("mask_predictor", "keypoint_predictor"):
        if getattr(model.roi_heads, head, None) is not None:
            fills[f"roi_heads.{head}"] = lowest_fill
    return fills


def _fills(model: nn.Module) -> Dict[str, Fill]:
    """The score outputs of each detector family, and what they hold where no visible pixel reaches them."""
    if isinstance(model, GeneralizedRCNN):
        return _rcnn_fills(model)
    if isinstance(model, RetinaNet):
        return {"head.classification_head.cls_logits": lowest_fill}
    if isinstance(model, FCOS):
        return {"head.classification_head.cls_logits": lowest_fill, "head.regression_head.bbox_ctrness": lowest_fill}
    head = model.head.classification_head
    fill = background_fill(head.num_columns)
    return {f"head.classification_head.module_list.{index}": fill for index in range(len(head.module_list))}


class LayerMaskedDetector(LayerMaskedParts):
    """A torchvision detector that runs on the visible pixels of its images only.

    Called as the detector is, with the masks beside the images: ``masked(images, masks)``, a list of
    ``(3, H, W)`` images and a list of ``(H, W)`` or ``(1, H, W)`` masks (or a batch of each); returns the
    detector's list of dicts (``boxes``, ``labels``, ``scores``, and ``masks``/``keypoints`` where the detector
    has them), in the images' coordinates. Removed pixels have no influence on any of it.

    Attributes:
        min_visible (float): the share of a box's pixels that must be visible for its detection to be kept
            (default 0.5; 0 keeps every detection with evidence).
    """

    kept_attributes = ("min_visible",)

    def __init__(self, *args: Any, min_visible: float = 0.5) -> None:
        super().__init__(*args)
        self.min_visible = min_visible

    def finish(self, output: Any, images: Any, masks: ImageMasks) -> List[Dict[str, Tensor]]:
        return [visible_detections(found, mask[0], self.min_visible) for found, mask in zip(output, masks)]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, min_visible={self.min_visible}"


def box_pixels(boxes: Tensor, height: int, width: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pixels each box touches, as index ranges: columns ``x1 .. x2 - 1`` and rows ``y1 .. y2 - 1``
    (``floor`` of the first corner, ``ceil`` of the second, clipped to the image, at least one pixel).

    Args:
        boxes (Tensor): ``(K, 4)`` as ``(x1, y1, x2, y2)`` in pixels.

    Returns:
        Four ``(K,)`` integer tensors.
    """
    x1 = boxes[:, 0].floor().long().clamp(0, width - 1)
    y1 = boxes[:, 1].floor().long().clamp(0, height - 1)
    x2 = torch.maximum(boxes[:, 2].ceil().long().clamp(0, width), x1 + 1)
    y2 = torch.maximum(boxes[:, 3].ceil().long().clamp(0, height), y1 + 1)
    return x1, y1, x2, y2


def visible_share(boxes: Tensor, mask: Tensor) -> Tensor:
    """The share of visible pixels among those each box covers.

    Args:
        boxes (Tensor): ``(K, 4)`` as ``(x1, y1, x2, y2)`` in pixels.
        mask (Tensor): ``(H, W)``, 1 for visible pixels.

    Returns:
        Tensor of shape ``(K,)``: for each box, the mean of ``mask`` over the pixels it touches
        (:func:`box_pixels`).
    """
    table = F.pad(mask.to(torch.float64).cumsum(0).cumsum(1), (1, 0, 1, 0))
    x1, y1, x2, y2 = box_pixels(boxes, *mask.shape)
    visible = table[y2, x2] - table[y1, x2] - table[y2, x1] + table[y1, x1]
    return (visible / ((y2 - y1) * (x2 - x1))).to(boxes.dtype)


def visible_detections(found: Dict[str, Tensor], mask: Tensor, min_visible: float) -> Dict[str, Tensor]:
    """The detections of one image whose boxes have at least ``min_visible`` of their pixels visible.

    Args:
        found: a detector's dict for one image; every tensor in it has one row per detection.
        mask (Tensor): the image's mask ``(H, W)``.
        min_visible (float): in ``[0, 1]``.
    """
    keep = visible_share(found["boxes"], mask) >= min_visible
    return {key: value[keep] for key, value in found.items()}


def build_detector(model: nn.Module, options: Mapping[str, Any], convert: Convert, registry: RuleRegistry) -> nn.Module:
    """The part-model builder of torchvision's detector families (:func:`register_part_model`)."""
    copied, parts = convert_parts(model, convert, registry, _fills(model))
    return LayerMaskedDetector(copied, model, options, parts)


for _family in (GeneralizedRCNN, RetinaNet, FCOS, SSD):
    register_part_model(_family, build_detector)


def layer_masked_detector(model: nn.Module, *, min_visible: float = 0.5, **options: Any) -> LayerMaskedDetector:
    """``layer_masked(detector)`` with the detection rule's threshold.

    Args:
        model: a torchvision detector (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSD, SSDlite), in eval mode.
        min_visible (float): a detection is kept when at least this share of its box's pixels is visible.
        **options: the options of :func:`~captum_layermask.layer_masked` (``padding``, ``residual``, ...).
    """
    from ..core.convert import layer_masked

    if not 0 <= min_visible <= 1:
        raise ValueError(f"min_visible is a share of a box's pixels, in [0, 1]; got {min_visible}.")
    masked = layer_masked(model, **options)
    if not isinstance(masked, LayerMaskedDetector):
        raise LayerMaskError(f"{type(model).__name__} is not a torchvision detector; use layer_masked.")
    masked.min_visible = min_visible
    return masked
