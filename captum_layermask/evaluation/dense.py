"""Missingness bias of segmentation models, per pixel: the counterparts of the paper's section 4 for dense outputs.

- :func:`segmentation_removal_curve`: mean IoU on the pixels that stay visible, as more and more segments are
  removed in random or saliency order (section 4.1's removal curves, with mean IoU for accuracy).
- :func:`region_attribution_mass`: where the explanation of a region's class lies, on the region itself or on
  its context, under each masking (the question of section 4.4's alignment, for a region).

Images are model inputs ``(N, C, H, W)`` normalised as the model expects; ``pixel_labels`` are ``(N, H, W)``
class indices; maskers and segmenters are given as in :mod:`captum_layermask.evaluation.removal`. ``output``
chooses the part of the model's output that holds the ``(N, classes, H, W)`` logits (``"out"`` for torchvision).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..core.model import select_output
from ..integrations.segmentation import RegionScores
from ._batching import model_device, progress_bar
from ._common import ResultRow, check_images, result_row
from .explanations import captum_attribution, captum_baseline
from .maskers import MaskerSpec, get_masker
from .removal import check_fractions, removal_order
from .segmentation import SegmenterSpec, segment_images, segmenter_name

DENSE_FRACTIONS = tuple(i / 10 for i in range(10))
"""Fractions of segments removed in a segmentation removal curve: 0 to 0.9 (with everything removed no pixel is
left to score)."""


@dataclass
class IoUCurve:
    """Mean IoU on the visible pixels as segments are removed.

    Attributes:
        fractions: fractions of each image's segments removed.
        mean_iou: at each fraction, the mean over classes of intersection over union, each counted over the
            pixels of all images that are still visible (classes absent from both truth and prediction skipped).
        masker, order, segmenter: what was measured.
    """

    fractions: List[float]
    mean_iou: List[float]
    masker: str
    order: str
    segmenter: str

    @property
    def auc(self) -> float:
        """Area under the curve (trapezoids over ``fractions``)."""
        x = torch.tensor(self.fractions, dtype=torch.float64)
        return float(torch.trapezoid(torch.tensor(self.mean_iou, dtype=torch.float64), x))

    def rows(self) -> List[ResultRow]:
        """The area under the curve as a flat result row."""
        return [result_row("segmentation removal AUC", self.masker, "mean IoU", self.auc, self.segmenter, self.order)]


def confusion(predicted: Tensor, truth: Tensor, counted: Tensor, classes: int) -> Tensor:
    """``(classes, classes)`` counts of (true class, predicted class) over the pixels where ``counted`` is True;
    labels outside the model's classes (Pascal VOC's 255 on object boundaries) are not scored."""
    counted = counted & (truth >= 0) & (truth < classes)
    pairs = truth[counted] * classes + predicted[counted]
    return torch.bincount(pairs, minlength=classes * classes).view(classes, classes)


def mean_iou(counts: Tensor) -> float:
    """The mean IoU of a confusion matrix, over the classes that occur in the truth or the predictions."""
    intersection = counts.diag().double()
    union = (counts.sum(0) + counts.sum(1)).double() - intersection
    present = union > 0
    return float((intersection[present] / union[present]).mean()) if bool(present.any()) else float("nan")


def segmentation_removal_curve(
    model: nn.Module,
    images: Tensor,
    pixel_labels: Tensor,
    segmenter: SegmenterSpec = "patches",
    order: str = "random",
    masker: MaskerSpec = "layer",
    fractions: Sequence[float] = DENSE_FRACTIONS,
    *,
    saliency: Optional[Tensor] = None,
    output: Optional[Any] = None,
    seed: int = 0,
    batch_size: int = 32,
    show_progress: bool = True,
) -> IoUCurve:
    """Mean IoU on the pixels that stay visible as segments are removed (section 4.1 for segmentation).

    At fraction ``f``, the first ``round(f * S)`` of an image's ``S`` segments (in ``order``) are removed with
    ``masker``; the predicted class of each pixel that is still visible is compared with its label. Scoring the
    visible pixels only asks whether the model still segments what it can see; a fill that makes it predict
    "background" around the hole, or a different class for the object next to it, lowers the curve.

    Args:
        model (nn.Module): the segmentation model (eval mode).
        images (Tensor): model inputs ``(N, C, H, W)``.
        pixel_labels (Tensor): ``(N, H, W)`` class of every pixel.
        segmenter: ``"patches"`` (16x16), ``"slic"``, ``"quickshift"``, a callable, or ids ``(N, H, W)``.
        order (str): ``"random"``, ``"most_salient"`` or ``"least_salient"`` first.
        masker: ``"layer"``, ``"grey"``, ``"black"``, ... or ``fn(model, x, mask)``.
        fractions (sequence of float): fractions of segments removed, increasing within [0, 1]; at a fraction
            that leaves no pixel visible the mean IoU is NaN.
        saliency (Tensor, optional): ``(N, H, W)`` for the salient orders (e.g. the object masks: objects first).
        output: the part of the model's output holding the logits (``"out"`` for torchvision).
        seed (int): seed of the random order.
        batch_size (int): masked images per forward pass.
        show_progress (bool): a progress bar.
    """
    check_images(images)
    check_fractions(fractions)
    if pixel_labels.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(
            f"pixel_labels must be (N, H, W) = {(images.shape[0], *images.shape[-2:])}, got "
            f"{tuple(pixel_labels.shape)}."
        )
    segments = segment_images(images, segmenter).cpu()
    orders = removal_order(segments, order, saliency, seed)
    masker_ = get_masker(masker)
    forward, device = masker_.bind(model), model_device(model)
    counts = None
    with progress_bar(len(images), f"mean IoU ({masker_.name}, {order})", show_progress) as bar:
        for i in range(len(images)):
            found = removal_confusions(
                forward, images[i : i + 1].to(device), pixel_labels[i].cpu(), segments[i], orders[i], fractions,
                output=output, per_eval=batch_size,
            )  # fmt: skip
            counts = found if counts is None else counts + found
            bar.update(1)
    return curve_from_confusions(counts, fractions, masker_.name, order, segmenter_name(segmenter))


@dataclass
class RegionMass:
    """How much of the positive attribution to a region's class lies on the region itself.

    Attributes:
        masker: the masking the explanations used.
        method: the Captum method.
        on_region: per image, the share of positive attribution mass on the region's pixels (the rest lies on
            its context); NaN for an image whose attributions have no positive mass.
    """

    masker: str
    method: str
    on_region: Tensor = field(repr=False)

    @property
    def mean(self) -> float:
        """The mean share over the images that have positive mass."""
        return float(self.on_region[~self.on_region.isnan()].mean())

    def rows(self) -> List[ResultRow]:
        return [result_row("region attribution mass", self.masker, f"on region ({self.method})", self.mean)]


def region_attribution_mass(
    model: nn.Module,
    images: Tensor,
    regions: Tensor,
    targets: Sequence[int],
    masker: str = "layer",
    *,
    method: str = "ablation",
    segmenter: SegmenterSpec = "patches",
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    output: Optional[Any] = None,
    samples: int = 200,
    per_eval: int = 16,
) -> RegionMass:
    """Explains each image's region (its class ``targets[i]``, scored by :class:`~captum_layermask.RegionScores`)
    with a Captum method under ``masker`` (``"layer"``, ``"grey"`` or ``"black"``), and measures the share of
    positive attribution on the region: an explanation of what the model sees *in* the region should lie there,
    up to the context a model rightly uses.

    Args:
        model (nn.Module): the plain segmentation model; ``"layer"`` explains ``layer_masked(model)``.
        images (Tensor): ``(N, C, H, W)`` inputs, normalised with ``mean`` and ``std`` (for the black fill).
        regions (Tensor): ``(N, H, W)`` bool, the region of each image.
        targets: the class explained for each image.
        method (str): ``"ablation"`` (exact, one evaluation per segment), ``"lime"``, ``"kernelshap"``,
            ``"occlusion"``.
    """
    from ..core.convert import layer_masked

    forward = layer_masked(model) if masker == "layer" else model
    baseline = captum_baseline(masker, mean, std)
    segments = segment_images(images, segmenter).cpu()
    shares = []
    for i in range(len(images)):
        torch.manual_seed(i)
        shares.append(
            region_share(
                forward, images[i : i + 1], regions[i], int(targets[i]), segments[i], baseline,
                method=method, output=output, samples=samples, per_eval=per_eval,
            )
        )  # fmt: skip
    return RegionMass(get_masker(masker).name, method, torch.tensor(shares, dtype=torch.float64))


def region_share(
    forward: nn.Module,
    x: Tensor,
    region: Tensor,
    target: int,
    segments: Tensor,
    baseline: Any,
    *,
    method: str = "ablation",
    output: Optional[Any] = None,
    samples: int = 200,
    per_eval: int = 16,
) -> float:
    """The share of positive attribution on ``region`` ``(H, W)`` when one image ``x`` ``(1, C, H, W)`` is
    explained for ``target`` over it (:class:`~captum_layermask.RegionScores` of ``forward``, the plain or the
    layer-masked model, with ``baseline``); NaN without positive attribution."""
    scores = RegionScores(forward, region, output=output)
    attribution = captum_attribution(method, scores, x, segments[None, None], target, baseline, samples, per_eval)
    positive = attribution[0].detach().sum(0).clamp(min=0)
    total = float(positive.sum())
    return float(positive[region].sum()) / total if total > 0 else float("nan")


def removal_confusions(
    forward: Any,
    x: Tensor,
    labels: Tensor,
    segments: Tensor,
    removed: Tensor,
    fractions: Sequence[float],
    *,
    output: Optional[Any] = None,
    per_eval: int = 16,
) -> Tensor:
    """One image's confusion matrices on its visible pixels as its segments are removed: ``(F, C, C)``.

    Args:
        forward: ``forward(x, mask)`` of a masker bound to the model.
        x (Tensor): ``(1, C, H, W)``; labels ``(H, W)``; segments ``(H, W)`` ids; ``removed``: ids in removal
            order; ``fractions``: removed at each point.
    """
    kept = torch.stack([~torch.isin(segments, removed[: round(f * len(removed))]) for f in fractions])
    counts = []
    with torch.no_grad():
        for part in kept.split(per_eval):
            logits = select_output(forward(x.expand(len(part), -1, -1, -1), part[:, None].to(x.device)), output)
            predicted = logits.argmax(1).cpu()
            counts += [confusion(p, labels, k, logits.shape[1]) for p, k in zip(predicted, part)]
    return torch.stack(counts)


def curve_from_confusions(
    counts: Tensor, fractions: Sequence[float], masker: str, order: str, segmenter: str
) -> IoUCurve:
    """An :class:`IoUCurve` from confusion matrices ``(F, C, C)`` summed over a dataset's images."""
    return IoUCurve(list(fractions), [mean_iou(c) for c in counts], masker, order, segmenter)
