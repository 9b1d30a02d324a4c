"""Detection accuracy: average precision at an IoU threshold (Pascal VOC's all-point interpolation), for the demo
detector's held-out score and for detections under masking."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou


def average_precision(
    detections: Sequence[Dict[str, Tensor]], targets: Sequence[Dict[str, Tensor]], label: int, iou: float = 0.5
) -> float:
    """Average precision of one class: the area under its precision-recall curve, precision made monotone
    (Pascal VOC 2010 onwards).

    Detections of the class, over all images, are taken by decreasing score; each is a true positive when it
    overlaps a not yet matched object of the class in its image at ``iou`` or more (the best such object).

    Args:
        detections: per image, a dict with ``boxes`` ``(K, 4)``, ``labels`` ``(K,)``, ``scores`` ``(K,)``.
        targets: per image, a dict with ``boxes`` ``(M, 4)`` and ``labels`` ``(M,)``.
        label: the class.
        iou: the overlap a match needs.

    Returns:
        AP in ``[0, 1]``; NaN if no image has an object of the class.
    """
    objects = [target["boxes"][target["labels"] == label] for target in targets]
    total = sum(len(boxes) for boxes in objects)
    if total == 0:
        return float("nan")
    found = []
    for image, item in enumerate(detections):
        keep = item["labels"] == label
        found += [(float(score), image, box) for score, box in zip(item["scores"][keep], item["boxes"][keep])]
    found.sort(key=lambda entry: -entry[0])
    matched = [torch.zeros(len(boxes), dtype=torch.bool) for boxes in objects]
    hits = []
    for _, image, box in found:
        hit = False
        if len(objects[image]):
            overlap = box_iou(box[None], objects[image])[0]
            overlap[matched[image]] = -1
            best = int(overlap.argmax())
            if float(overlap[best]) >= iou:
                matched[image][best], hit = True, True
        hits.append(hit)
    return _area(torch.tensor(hits, dtype=torch.float64), total)


def _area(hits: Tensor, total: int) -> float:
    if len(hits) == 0:
        return 0.0
    true = hits.cumsum(0)
    recall = torch.cat([torch.zeros(1, dtype=torch.float64), true / total])
    precision = true / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    precision = torch.cat([precision, torch.zeros(1, dtype=torch.float64)]).flip(0).cummax(0).values.flip(0)
    return float(((recall[1:] - recall[:-1]) * precision[:-1]).sum())


def mean_average_precision(
    detections: Sequence[Dict[str, Tensor]],
    targets: Sequence[Dict[str, Tensor]],
    labels: Sequence[int],
    iou: float = 0.5,
) -> float:
    """The mean of :func:`average_precision` over ``labels`` that occur in ``targets`` (mAP@``iou``)."""
    values: List[float] = [average_precision(detections, targets, label, iou) for label in labels]
    present = [value for value in values if value == value]
    return sum(present) / len(present) if present else float("nan")


FILLS = {"black": 0.0, "grey": 0.5}
"""The colour fills of a detector's ``[0, 1]`` input (it normalises inside): black and mid-grey."""


def filled(images: Tensor, masks: Tensor, masking: str) -> Tensor:
    """Images with their removed pixels filled: ``"black"`` or ``"grey"`` (:data:`FILLS`), or ``"blur"`` (a blurred
    copy of the image, :class:`~captum_layermask.evaluation.maskers.BlurFill`)."""
    from .maskers import BlurFill

    fill = BlurFill().fill_values(images, masks) if masking == "blur" else FILLS[masking]
    return torch.where(masks > 0, images, fill)


def detect(
    detector: nn.Module,
    images: Tensor,
    masks: Tensor,
    masking: str,
    min_visible: float = 0.5,
    masked: Optional[nn.Module] = None,
) -> List[Dict[str, Tensor]]:
    """Detections on images with removed pixels, under one masking, with the detection rule of layer masking
    (:func:`~captum_layermask.integrations.torchvision_detection.visible_detections`) applied to every masking,
    so that the fills are compared on the same footing.

    Args:
        detector: the plain detector.
        images (Tensor): ``(N, 3, H, W)`` in ``[0, 1]``.
        masks (Tensor): ``(N, 1, H, W)``, 1 = visible.
        masking: ``"layer"``, ``"black"``, ``"grey"`` or ``"blur"``.
        masked: ``layer_masked(detector)``, for ``"layer"`` (converted here if not given).
    """
    from ..core.convert import layer_masked
    from ..integrations.torchvision_detection import visible_detections

    with torch.no_grad():
        if masking == "layer":
            found = (masked or layer_masked(detector))(list(images), list(masks))
        else:
            found = detector(list(filled(images, masks, masking)))
    return [visible_detections(item, mask[0], min_visible) for item, mask in zip(found, masks)]


def visible_targets(
    targets: Sequence[Dict[str, Tensor]], object_masks: Tensor, masks: Tensor, share: float = 0.5
) -> Tuple[List[Dict[str, Tensor]], List[Dict[str, Tensor]]]:
    """Splits each image's objects into those with at least ``share`` of their pixels visible (to be found) and
    the others (ignored: a detection of one is neither right nor wrong, as Pascal VOC's "difficult" objects).

    Args:
        targets: per image, ``boxes`` and ``labels`` of its objects, in the order of ``object_masks``' present
            objects (:func:`~captum_layermask.demo.shapes.detection_targets`).
        object_masks (Tensor): ``(N, K, H, W)`` bool.
        masks (Tensor): ``(N, 1, H, W)``.
    """
    kept, ignored = [], []
    for target, objects, mask in zip(targets, object_masks, masks):
        objects = objects[objects.flatten(1).any(1)]
        visible = (objects & (mask > 0)).flatten(1).sum(1) / objects.flatten(1).sum(1)
        found = visible >= share
        kept.append({key: value[found] for key, value in target.items()})
        ignored.append({key: value[~found] for key, value in target.items()})
    return kept, ignored


def without_ignored(found: Dict[str, Tensor], ignored: Dict[str, Tensor], iou: float = 0.5) -> Dict[str, Tensor]:
    """The detections that do not match an ignored object of their class at ``iou``."""
    if len(ignored["boxes"]) == 0 or len(found["boxes"]) == 0:
        return found
    overlap = box_iou(found["boxes"], ignored["boxes"]) >= iou
    same = found["labels"][:, None] == ignored["labels"][None]
    keep = ~(overlap & same).any(1)
    return {key: value[keep] for key, value in found.items()}


def removal_map(
    detector: nn.Module,
    images: Tensor,
    object_masks: Tensor,
    targets: Sequence[Dict[str, Tensor]],
    labels: Sequence[int],
    fractions: Sequence[float],
    maskings: Sequence[str] = ("black", "grey", "layer"),
    patch: int = 16,
    seed: int = 0,
) -> Dict[str, List[float]]:
    """mAP@0.5 under random removal of a fraction of the ``patch`` x ``patch`` patches, per masking: the objects
    with at least half their pixels visible are to be found, detections of the others are ignored, and every
    masking keeps only detections whose boxes are at least half visible. The same removed patches for every
    masking."""
    from ..core.convert import layer_masked
    from ..core.patches import random_patch_masks

    masked = layer_masked(detector)
    curves: Dict[str, List[float]] = {masking: [] for masking in maskings}
    for fraction in fractions:
        height, width = images.shape[-2:]
        masks = random_patch_masks(len(images), height, width, patch, keep=1 - fraction, seed=seed)
        kept, ignored = visible_targets(targets, object_masks, masks)
        for masking in maskings:
            found = detect(detector, images, masks.float(), masking, masked=masked)
            found = [without_ignored(item, skip) for item, skip in zip(found, ignored)]
            curves[masking].append(mean_average_precision(found, kept, labels))
    return curves


def lime_object_share(
    detector: nn.Module,
    images: Tensor,
    object_masks: Tensor,
    targets: Sequence[Dict[str, Tensor]],
    maskings: Sequence[str] = ("black", "grey", "layer"),
    samples: int = 200,
    top: int = 5,
    patch: int = 16,
    seed: int = 0,
) -> Tuple[Dict[str, float], int]:
    """How often Lime's top patches for a detection lie on the detected object, per masking.

    For each image, the detection explained is the detector's best match (IoU >= 0.5, same class) with the image's
    first object; images where the detector misses it are skipped. Lime (``samples`` samples, ``patch`` x
    ``patch`` patches, the same samples for every masking) explains :class:`~captum_layermask.DetectionScores`;
    a patch is on the object when a fifth of its pixels are.

    Returns:
        The mean share of the ``top`` patches on the object, per masking, and the number of images explained.
    """
    from captum.attr import Lime

    from ..core.convert import layer_masked
    from ..core.patches import patch_segments
    from ..integrations.captum import LayerMask
    from ..integrations.detection import DetectionScores

    masked = layer_masked(detector)
    segments = patch_segments(*images.shape[-2:], patch)
    ids = segments[0, 0]
    count = int(ids.max()) + 1
    shares: Dict[str, List[float]] = {masking: [] for masking in maskings}
    for image, objects, target in zip(images, object_masks, targets):
        with torch.no_grad():
            found = detector([image])[0]
        same = found["labels"] == target["labels"][0]
        overlap = box_iou(found["boxes"][same], target["boxes"][:1])[:, 0] if bool(same.any()) else torch.zeros(0)
        if len(overlap) == 0 or float(overlap.max()) < 0.5:
            continue
        box, label = found["boxes"][same][overlap.argmax()], int(target["labels"][0])
        on_object = torch.stack([objects[0][ids == s].float().mean() for s in range(count)]) >= 0.2
        for masking in maskings:
            forward = DetectionScores(masked if masking == "layer" else detector, box, label)
            baseline = LayerMask() if masking == "layer" else FILLS[masking]
            torch.manual_seed(seed)
            attribution = Lime(forward).attribute(
                image[None], feature_mask=segments, baselines=baseline, n_samples=samples, perturbations_per_eval=16
            )[0, 0]
            scores = torch.stack([attribution[ids == s].mean() for s in range(count)])
            shares[masking].append(float(on_object[scores.argsort(descending=True)[:top]].float().mean()))
    explained = len(next(iter(shares.values())))
    return {masking: sum(values) / max(len(values), 1) for masking, values in shares.items()}, explained


def box_masks(targets: Sequence[Dict[str, Tensor]], height: int, width: int) -> Tensor:
    """Each image's boxes as object masks ``(N, K, H, W)`` (bool; K the most boxes of an image, the others empty),
    for data annotated with boxes only: a box covers the pixels it touches (the pixels whose visible share the
    detection rule counts, :func:`~captum_layermask.integrations.torchvision_detection.box_pixels`)."""
    from ..integrations.torchvision_detection import box_pixels

    count = max([len(target["boxes"]) for target in targets], default=0)
    masks = torch.zeros(len(targets), count, height, width, dtype=torch.bool)
    for index, target in enumerate(targets):
        ranges = zip(*(bound.tolist() for bound in box_pixels(target["boxes"], height, width)))
        for k, (left, top, right, bottom) in enumerate(ranges):
            masks[index, k, top:bottom, left:right] = True
    return masks


def read_coco(
    annotations: Path, images: Path, size: int, limit: Optional[int] = None
) -> Tuple[Tensor, List[Dict[str, Tensor]], Dict[int, str]]:
    """Images and their boxes from a COCO-style annotation file (``images``, ``annotations`` with ``bbox`` as
    ``[x, y, width, height]`` and ``category_id``, ``categories``); crowd annotations are left out.

    Returns:
        The images resized to ``(size, size)`` in ``[0, 1]`` ``(N, 3, size, size)``, their targets (``boxes`` scaled
        alike, ``labels`` the category ids) and the category names by id.

    Raises:
        ValueError: for a file that is not such an annotation file, or an image outside ``images``.
    """
    from .images import read_image

    try:
        data = json.loads(Path(annotations).read_text())
        entries = {entry["id"]: entry for entry in data["images"]}
        names = {int(category["id"]): str(category["name"]) for category in data.get("categories", [])}
        boxes: Dict[Any, List[Tuple[List[float], int]]] = {key: [] for key in entries}
        for item in data["annotations"]:
            if not item.get("iscrowd", 0):
                boxes[item["image_id"]].append(([float(v) for v in item["bbox"]], int(item["category_id"])))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{annotations} is not a COCO-style annotation file ({type(error).__name__}: {error})."
        ) from None
    root = Path(images).resolve()
    pictures, targets = [], []
    for key, entry in list(entries.items())[:limit]:
        path = (root / entry["file_name"]).resolve()
        if root not in path.parents:
            raise ValueError(f"{entry['file_name']} lies outside {images}; give file names relative to it.")
        scale_x, scale_y = size / float(entry["width"]), size / float(entry["height"])
        pictures.append(read_image(path, size)[0])
        rows = [[x * scale_x, y * scale_y, (x + w) * scale_x, (y + h) * scale_y] for (x, y, w, h), _ in boxes[key]]
        targets.append(
            {
                "boxes": torch.tensor(rows, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor([label for _, label in boxes[key]], dtype=torch.long),
            }
        )
    if not pictures:
        raise ValueError(f"{annotations} lists no image.")
    return torch.stack(pictures), targets, names
