"""Removal-based evaluation (paper sections 4.1 and 4.2): removal curves and shape bias.

- :func:`removal_curve`: accuracy, class entropy and unchanged predictions as more and more segments are
  removed, in random or saliency order, with their areas under the curve (section 4.1, Fig. 4, Table 1).
- :func:`shape_bias`: accuracy with the object removed against the same area removed as a broken-up mask
  (section 4.2, Fig. 6).

Images are model inputs ``(N, C, H, W)``, normalised as the model expects; labels are class indices ``(N,)``;
object masks are ``(N, H, W)`` bool, True on the object. Maskers are names (``"layer"``, ``"grey"``,
``"black"``, ...) or callables ``fn(model, x, mask)`` (see :mod:`captum_layermask.evaluation.maskers`);
segmenters are names (``"patches"``, ``"slic"``, ``"quickshift"``), callables, or precomputed ids (see
:mod:`captum_layermask.evaluation.segmentation`). Everything runs in batches on the model's device under
``torch.no_grad()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..core.errors import MaskShapeError
from ._batching import model_device, progress_bar
from ._common import ResultRow, check_inputs, class_entropy, clean_predict, predict, result_row
from .maskers import MaskerSpec, get_masker
from .segmentation import SegmenterSpec, segment_images, segmenter_name

ORDERS = ("random", "most_salient", "least_salient")
DEFAULT_FRACTIONS = tuple(i / 10 for i in range(11))


@dataclass
class RemovalCurve:
    """Metrics as segments are removed (paper Fig. 4).

    Attributes:
        fractions: fractions of each image's segments removed.
        accuracy: accuracy at each fraction.
        entropy: class entropy (nats) of the predictions at each fraction.
        unchanged: fraction of predictions equal to the prediction with nothing removed.
        masker, order, segmenter: what was measured.
        predictions: ``(N, len(fractions))`` predicted classes.
    """

    fractions: List[float]
    accuracy: List[float]
    entropy: List[float]
    unchanged: List[float]
    masker: str
    order: str
    segmenter: str
    predictions: Tensor = field(repr=False)

    @property
    def auc(self) -> Dict[str, float]:
        """Area under each curve (trapezoids over ``fractions``), the figures of the paper's Table 1."""
        x = torch.tensor(self.fractions, dtype=torch.float64)
        return {
            name: float(torch.trapezoid(torch.tensor(getattr(self, name), dtype=torch.float64), x))
            for name in ("accuracy", "entropy", "unchanged")
        }

    def rows(self) -> List[ResultRow]:
        """The areas under the curves as flat result rows."""
        return [
            result_row("removal AUC", self.masker, metric, value, self.segmenter, self.order)
            for metric, value in self.auc.items()
        ]


def check_fractions(fractions: Sequence[float]) -> None:
    """Raises ``ValueError`` unless ``fractions`` increase within [0, 1] (a removal curve's x axis)."""
    if (
        not fractions
        or any(not 0 <= f <= 1 for f in fractions)
        or any(a >= b for a, b in zip(fractions, fractions[1:]))
    ):
        raise ValueError(
            f"fractions must increase within [0, 1] (the curve's x axis, for its AUC), got {list(fractions)}."
        )


def curve_of(
    predictions: Tensor,
    labels: Tensor,
    clean: Tensor,
    num_classes: int,
    fractions: Sequence[float],
    masker: str,
    order: str,
    segmenter: str,
) -> RemovalCurve:
    """A :class:`RemovalCurve` from the predictions ``(N, len(fractions))``, the labels and the predictions with
    nothing removed ``(N,)``."""
    columns = range(len(fractions))
    return RemovalCurve(
        fractions=list(fractions),
        accuracy=[float((predictions[:, j] == labels).double().mean()) for j in columns],
        entropy=[class_entropy(predictions[:, j], num_classes) for j in columns],
        unchanged=[float((predictions[:, j] == clean).double().mean()) for j in columns],
        masker=masker,
        order=order,
        segmenter=segmenter,
        predictions=predictions,
    )


def removal_order(segments: Tensor, order: str, saliency: Optional[Tensor] = None, seed: int = 0) -> List[Tensor]:
    """The order in which each image's segments are removed.

    Args:
        segments (Tensor): ``(N, H, W)`` ids, consecutive from 0 per image.
        order (str): ``"random"`` (a seeded permutation per image), ``"most_salient"`` or ``"least_salient"``
            (segments ranked by the sum of ``saliency`` over their pixels, ties by id).
        saliency (Tensor, optional): ``(N, H, W)`` saliency maps, needed by the salient orders.
        seed (int): seed of the random order; the same seed gives the same order under every masker.

    Returns:
        One LongTensor of segment ids per image, first removed first.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}.")
    if order != "random" and (saliency is None or tuple(saliency.shape) != tuple(segments.shape)):
        raise MaskShapeError(
            f"order {order!r} needs saliency maps of shape {tuple(segments.shape)} (one value per pixel), got {None if saliency is None else tuple(saliency.shape)}."
        )
    generator = torch.Generator().manual_seed(seed)
    orders = []
    for index, ids in enumerate(segments):
        count = int(ids.max()) + 1
        if order == "random":
            orders.append(torch.randperm(count, generator=generator))
        else:
            scores = torch.zeros(count, dtype=torch.float64).index_add_(
                0, ids.flatten().cpu(), saliency[index].flatten().double().cpu()
            )
            orders.append(torch.sort(scores, descending=order == "most_salient", stable=True).indices)
    return orders


def removal_curve(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    segmenter: SegmenterSpec = "patches",
    order: str = "random",
    masker: MaskerSpec = "layer",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    *,
    saliency: Optional[Tensor] = None,
    seed: int = 0,
    batch_size: int = 64,
    show_progress: bool = True,
) -> RemovalCurve:
    """Accuracy, class entropy and unchanged predictions as segments are removed (section 4.1, Table 1).

    At fraction ``f``, the first ``round(f * S)`` of an image's ``S`` segments (in ``order``) are removed with
    ``masker``. Unchanged predictions compare with the prediction under the masker with nothing removed (the
    model's own prediction for every built-in masker).

    Args:
        model (nn.Module): the classifier (in eval mode).
        images (Tensor): model inputs ``(N, C, H, W)``.
        labels (Tensor): ``(N,)`` class indices.
        segmenter: ``"patches"`` (16x16), ``"slic"``, ``"quickshift"``, a callable, or ids ``(N, H, W)``.
        order (str): ``"random"``, ``"most_salient"`` (first) or ``"least_salient"`` (first).
        masker: how segments are removed (``"layer"``, ``"grey"``, ``"black"``, ... or ``fn(model, x, mask)``).
        fractions (sequence of float): fractions of segments removed, increasing within [0, 1].
        saliency (Tensor, optional): ``(N, H, W)`` saliency maps for the salient orders.
        seed (int): seed of the random order.
        batch_size (int): images per forward pass.
        show_progress (bool): a progress bar over the forward passes.

    Returns:
        A :class:`RemovalCurve`; ``.auc`` holds the areas under the curves.
    """
    check_inputs(images, labels)
    check_fractions(fractions)
    labels = torch.as_tensor(labels).cpu()
    segments = segment_images(images, segmenter).cpu()
    orders = removal_order(segments, order, saliency, seed)
    masker_ = get_masker(masker)
    forward, device = masker_.bind(model), model_device(model)

    def masks_at(fraction: float) -> Callable[[slice], Tensor]:
        def masks(part: slice) -> Tensor:
            kept = []
            for index in range(part.start, part.stop):
                removed = orders[index][: round(fraction * len(orders[index]))]
                kept.append(~torch.isin(segments[index], removed))
            return torch.stack(kept)[:, None]

        return masks

    with progress_bar(len(images) * (len(fractions) + 1), f"removal ({masker_.name}, {order})", show_progress) as bar:
        clean, num_classes = clean_predict(forward, device, images, batch_size, bar)
        predictions = torch.stack(
            [predict(forward, device, images, masks_at(f), batch_size, bar)[0] for f in fractions], 1
        )
    return curve_of(predictions, labels, clean, num_classes, fractions, masker_.name, order, segmenter_name(segmenter))


def broken_mask(object_masks: Tensor) -> Tensor:
    """The paper's broken mask (Fig. 5): the mask cut into four quadrants, each sent to the opposite corner.

    Args:
        object_masks (Tensor): ``(..., H, W)``.

    Returns:
        Same shape: a circular shift by half the height and half the width, which preserves the area.
    """
    height, width = object_masks.shape[-2:]
    return torch.roll(object_masks, shifts=(height // 2, width // 2), dims=(-2, -1))


@dataclass
class ShapeBias:
    """Accuracy with the object removed and with the broken mask removed (paper Fig. 6).

    Attributes:
        masker: the masker's name.
        object_accuracy: accuracy with the object's pixels removed.
        broken_accuracy: accuracy with the broken mask's pixels removed (same area, no object shape).
        count: images the accuracies are over (those classified correctly unmasked, by default).
        per_class: ``{label: (object_accuracy, broken_accuracy, count)}``.
    """

    masker: str
    object_accuracy: float
    broken_accuracy: float
    count: int
    per_class: Dict[int, tuple] = field(repr=False)

    @property
    def difference(self) -> float:
        """``broken_accuracy - object_accuracy``: the larger, the less the model reads the mask's shape."""
        return self.broken_accuracy - self.object_accuracy

    def rows(self) -> List[ResultRow]:
        """The accuracies and their difference as flat result rows."""
        metrics = ("object_accuracy", "broken_accuracy", "difference")
        return [result_row("shape bias", self.masker, metric, getattr(self, metric)) for metric in metrics]


def shape_bias(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    object_masks: Tensor,
    masker: MaskerSpec = "layer",
    *,
    only_correct: bool = True,
    batch_size: int = 64,
    show_progress: bool = True,
) -> ShapeBias:
    """Shape bias of a masking method (section 4.2): accuracy with the object removed against accuracy with
    the object mask broken into four quadrants swapped to opposite corners (:func:`broken_mask`).

    Args:
        model, images, labels, masker, batch_size, show_progress: as in :func:`removal_curve`.
        object_masks (Tensor): ``(N, H, W)`` bool, True on the object to remove.
        only_correct (bool): measure over the images the model classifies correctly unmasked, as the paper.

    Returns:
        A :class:`ShapeBias`.
    """
    check_inputs(images, labels, object_masks)
    labels = torch.as_tensor(labels).cpu()
    masker_ = get_masker(masker)
    forward, device = masker_.bind(model), model_device(model)
    visible = {
        "object": ~object_masks.bool().cpu()[:, None],
        "broken": ~broken_mask(object_masks.bool().cpu())[:, None],
    }
    with progress_bar(3 * len(images), f"shape bias ({masker_.name})", show_progress) as bar:
        clean, _ = clean_predict(forward, device, images, batch_size, bar)
        correct = {
            name: predict(forward, device, images, lambda part, m=m: m[part], batch_size, bar)[0] == labels
            for name, m in visible.items()
        }
    return shape_bias_of(masker_.name, labels, clean, correct["object"], correct["broken"], only_correct)


def shape_bias_of(
    masker: str,
    labels: Tensor,
    clean: Tensor,
    object_correct: Tensor,
    broken_correct: Tensor,
    only_correct: bool = True,
) -> ShapeBias:
    """A :class:`ShapeBias` from per-image results: ``labels`` and ``clean`` (unmasked) predictions ``(N,)``, and
    bool ``(N,)`` whether the prediction is right with the object removed and with the broken mask removed."""
    correct = {"object": object_correct, "broken": broken_correct}
    chosen = clean == labels if only_correct else torch.ones_like(labels, dtype=torch.bool)
    per_class = {}
    for label in labels[chosen].unique().tolist():
        in_class = chosen & (labels == label)
        per_class[int(label)] = (
            float(correct["object"][in_class].double().mean()),
            float(correct["broken"][in_class].double().mean()),
            int(in_class.sum()),
        )
    count = int(chosen.sum())
    accuracy = {name: float(c[chosen].double().mean()) if count else math.nan for name, c in correct.items()}
    return ShapeBias(masker, accuracy["object"], accuracy["broken"], count, per_class)
