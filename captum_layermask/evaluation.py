"""Evaluating masking methods on a model and data: removal curves, shape bias and LIME metrics (paper section 4).

- :func:`removal_curve`: accuracy, class entropy and unchanged predictions as more and more segments are
  removed, in random or saliency order, with their areas under the curve (section 4.1, Fig. 4, Table 1).
- :func:`shape_bias`: accuracy with the object removed against the same area removed as a broken-up mask
  (section 4.2, Fig. 6).
- LIME metrics (section 4.4.2, supplementary 6.2): :func:`topk_ablation_accuracy`, :func:`alignment_score`,
  :func:`topk_jaccard`, and :func:`lime_metrics`, which runs LIME under each masker and reports all three.

Images are model inputs ``(N, C, H, W)``, normalised as the model expects; labels are class indices ``(N,)``;
object masks are ``(N, H, W)`` bool, True on the object. Maskers are names (``"layer"``, ``"grey"``,
``"black"``, ...) or callables ``fn(model, x, mask)`` (see :mod:`captum_layermask.maskers`); segmenters are
names (``"patches"``, ``"slic"``, ``"quickshift"``), callables, or precomputed ids (see
:mod:`captum_layermask.segmentation`). Everything runs in batches on the model's device under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._batching import batches, model_device, progress_bar
from .errors import MaskShapeError
from .maskers import MaskerSpec, get_masker
from .segmentation import SegmenterSpec, get_segmenter, segment_images

ORDERS = ("random", "most_salient", "least_salient")
DEFAULT_FRACTIONS = tuple(i / 10 for i in range(11))


# ---------------------------------------------------------------------------------------------------------------
# shared helpers


def _logits(output: Any) -> Tensor:
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, Tensor) or output.ndim != 2:
        raise ValueError(f"the model must return class scores (N, classes), got {getattr(output, 'shape', type(output).__name__)}.")
    return output


def _predict(forward: Callable[[Tensor, Tensor], Any], device: torch.device, images: Tensor, masks: Callable[[slice], Tensor], batch_size: int, bar: Any) -> Tuple[Tensor, int]:
    """Predicted classes ``(N,)`` of ``images`` under ``masks(part)`` (bool ``(len(part), 1, H, W)``), and the
    number of classes the model scores."""
    out = []
    with torch.no_grad():
        for part in batches(len(images), batch_size, bar):
            logits = _logits(forward(images[part].to(device), masks(part).to(device)))
            out.append(logits.argmax(1).cpu())
    return torch.cat(out), logits.shape[1]


def _clean_predict(forward: Callable[[Tensor, Tensor], Any], device: torch.device, images: Tensor, batch_size: int, bar: Any) -> Tuple[Tensor, int]:
    """:func:`_predict` with nothing removed."""
    full = torch.ones(1, 1, *images.shape[-2:], dtype=torch.bool)
    return _predict(forward, device, images, lambda part: full.expand(part.stop - part.start, -1, -1, -1), batch_size, bar)


def _check(images: Tensor, labels: Tensor, object_masks: Optional[Tensor] = None) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise MaskShapeError(f"images must be a tensor (N, C, H, W), got {getattr(images, 'shape', type(images).__name__)}.")
    if tuple(torch.as_tensor(labels).shape) != (len(images),):
        raise MaskShapeError(f"labels must have shape ({len(images)},), one class index per image, got {tuple(torch.as_tensor(labels).shape)}.")
    if object_masks is not None:
        _check_object_masks(object_masks, (len(images), *images.shape[-2:]))


def _check_object_masks(object_masks: Tensor, expected: tuple) -> None:
    if tuple(object_masks.shape) != expected:
        raise MaskShapeError(f"object masks must have shape {expected} (True on the object), got {tuple(object_masks.shape)}.")


def class_entropy(predictions: Tensor, num_classes: int) -> float:
    """Entropy (nats) of the distribution of predicted classes over a dataset, ``p(y) = E_x 1[f(x) = y]``."""
    p = torch.bincount(predictions, minlength=num_classes).double() / len(predictions)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


# ---------------------------------------------------------------------------------------------------------------
# removal curves (section 4.1)


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
        return {name: float(torch.trapezoid(torch.tensor(getattr(self, name), dtype=torch.float64), x)) for name in ("accuracy", "entropy", "unchanged")}


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
        raise MaskShapeError(f"order {order!r} needs saliency maps of shape {tuple(segments.shape)} (one value per pixel), got {None if saliency is None else tuple(saliency.shape)}.")
    generator = torch.Generator().manual_seed(seed)
    orders = []
    for index, ids in enumerate(segments):
        count = int(ids.max()) + 1
        if order == "random":
            orders.append(torch.randperm(count, generator=generator))
        else:
            scores = torch.zeros(count, dtype=torch.float64).index_add_(0, ids.flatten().cpu(), saliency[index].flatten().double().cpu())
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
        fractions (sequence of float): fractions of segments removed, in [0, 1].
        saliency (Tensor, optional): ``(N, H, W)`` saliency maps for the salient orders.
        seed (int): seed of the random order.
        batch_size (int): images per forward pass.
        show_progress (bool): a progress bar over the forward passes.

    Returns:
        A :class:`RemovalCurve`; ``.auc`` holds the areas under the curves.
    """
    _check(images, labels)
    if any(not 0 <= f <= 1 for f in fractions):
        raise ValueError(f"fractions must lie in [0, 1], got {list(fractions)}.")
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
        clean, num_classes = _clean_predict(forward, device, images, batch_size, bar)
        predictions = torch.stack([_predict(forward, device, images, masks_at(f), batch_size, bar)[0] for f in fractions], 1)
    return RemovalCurve(
        fractions=list(fractions),
        accuracy=[float((predictions[:, j] == labels).double().mean()) for j in range(len(fractions))],
        entropy=[class_entropy(predictions[:, j], num_classes) for j in range(len(fractions))],
        unchanged=[float((predictions[:, j] == clean).double().mean()) for j in range(len(fractions))],
        masker=masker_.name,
        order=order,
        segmenter=_segmenter_name(segmenter),
        predictions=predictions,
    )


def _segmenter_name(segmenter: Any) -> str:
    if isinstance(segmenter, Tensor):
        return "given"
    return getattr(get_segmenter(segmenter), "name", getattr(segmenter, "__name__", "custom"))


# ---------------------------------------------------------------------------------------------------------------
# shape bias (section 4.2)


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
    _check(images, labels, object_masks)
    labels = torch.as_tensor(labels).cpu()
    masker_ = get_masker(masker)
    forward, device = masker_.bind(model), model_device(model)
    visible = {"object": ~object_masks.bool().cpu()[:, None], "broken": ~broken_mask(object_masks.bool().cpu())[:, None]}
    with progress_bar(3 * len(images), f"shape bias ({masker_.name})", show_progress) as bar:
        clean, _ = _clean_predict(forward, device, images, batch_size, bar)
        correct = {name: _predict(forward, device, images, lambda part, m=m: m[part], batch_size, bar)[0] == labels for name, m in visible.items()}
    chosen = clean == labels if only_correct else torch.ones_like(labels, dtype=torch.bool)
    per_class = {}
    for label in labels[chosen].unique().tolist():
        in_class = chosen & (labels == label)
        per_class[int(label)] = (float(correct["object"][in_class].double().mean()), float(correct["broken"][in_class].double().mean()), int(in_class.sum()))
    count = int(chosen.sum())
    accuracy = {name: float(c[chosen].double().mean()) if count else math.nan for name, c in correct.items()}
    return ShapeBias(masker_.name, accuracy["object"], accuracy["broken"], count, per_class)


# ---------------------------------------------------------------------------------------------------------------
# LIME metrics (section 4.4.2, supplementary 6.2)


def segment_scores(attributions: Tensor, segments: Tensor) -> List[Tensor]:
    """Each segment's score: the mean of its pixels' attributions (averaged over channels).

    Args:
        attributions (Tensor): ``(N, H, W)`` or ``(N, C, H, W)`` (Captum's output shape).
        segments (Tensor): ``(N, H, W)`` ids, consecutive from 0 per image.

    Returns:
        One float64 tensor ``(S_i,)`` per image.
    """
    if attributions.ndim == 4:
        attributions = attributions.mean(1)
    if attributions.shape != segments.shape:
        raise MaskShapeError(f"attributions {tuple(attributions.shape)} and segments {tuple(segments.shape)} must cover the same (N, H, W) pixels.")
    scores = []
    for values, ids in zip(attributions.detach().cpu().double(), segments.cpu()):
        ids = ids.flatten()
        total = torch.zeros(int(ids.max()) + 1, dtype=torch.float64).index_add_(0, ids, values.flatten())
        scores.append(total / torch.bincount(ids).clamp(min=1))
    return scores


def top_segments_mask(attributions: Tensor, segments: Tensor, k: int) -> Tensor:
    """``(N, H, W)`` bool: the pixels of each image's ``k`` highest-scoring segments (ties by segment id)."""
    segments = segments.cpu()
    masks = []
    for scores, ids in zip(segment_scores(attributions, segments), segments):
        top = torch.sort(scores, descending=True, stable=True).indices[:k]
        masks.append(torch.isin(ids, top))
    return torch.stack(masks)


def topk_ablation_accuracy(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    attributions: Tensor,
    segments: Tensor,
    k: int = 20,
    masker: MaskerSpec = "grey",
    *,
    batch_size: int = 64,
    show_progress: bool = True,
) -> float:
    """Top-k ablation accuracy (supplementary 6.2): accuracy once each image's ``k`` most important segments are
    removed with ``masker`` (the paper's grey). Lower means the explanation found what the model needs.

    Args:
        model, images, labels, batch_size, show_progress: as in :func:`removal_curve`.
        attributions (Tensor): ``(N, H, W)`` or ``(N, C, H, W)``.
        segments (Tensor): ``(N, H, W)`` ids, consecutive from 0 per image.
        k (int): segments removed.
        masker: how they are removed.
    """
    _check(images, labels)
    removed = top_segments_mask(attributions, segments, k)
    masker_ = get_masker(masker)
    with progress_bar(len(images), f"top-{k} ablation ({masker_.name})", show_progress) as bar:
        predictions, _ = _predict(masker_.bind(model), model_device(model), images, lambda part: ~removed[part][:, None], batch_size, bar)
    return float((predictions == torch.as_tensor(labels).cpu()).double().mean())


def alignment_score(attributions: Tensor, segments: Tensor, object_masks: Tensor) -> Tensor:
    """Alignment score (supplementary 6.2): cosine similarity of the segment scores ``s`` with the ground truth
    ``g_i = Σ_{(u,v) in segment i} (m[u, v] - mean(m))`` of the object mask ``m``; 1 when aligned, -1 when
    opposed, 0 on average for random scores.

    Args:
        attributions (Tensor): ``(N, H, W)`` or ``(N, C, H, W)``.
        segments (Tensor): ``(N, H, W)`` ids, consecutive from 0 per image.
        object_masks (Tensor): ``(N, H, W)``, 1 on the object.

    Returns:
        ``(N,)`` scores.
    """
    _check_object_masks(object_masks, tuple(segments.shape))
    out = []
    for scores, ids, mask in zip(segment_scores(attributions, segments), segments.cpu(), object_masks.cpu().double()):
        truth = torch.zeros_like(scores).index_add_(0, ids.flatten(), (mask - mask.mean()).flatten())
        out.append(F.cosine_similarity(scores, truth, dim=0, eps=1e-12))
    return torch.stack(out)


def topk_jaccard(attributions: Tensor, segments: Tensor, object_masks: Tensor, k: int = 20) -> Tensor:
    """Top-k Jaccard similarity (supplementary 6.2) of the object mask and the union of the ``k`` highest-scoring
    segments; 1 when they coincide.

    Args:
        attributions, segments, object_masks: as in :func:`alignment_score`.
        k (int): segments taken.

    Returns:
        ``(N,)`` similarities.
    """
    _check_object_masks(object_masks, tuple(segments.shape))
    top = top_segments_mask(attributions, segments, k)
    truth = object_masks.cpu().bool()
    union = (top | truth).flatten(1).sum(1).clamp(min=1)
    return (top & truth).flatten(1).sum(1).double() / union


def binary_cosine_kernel(kernel_width: float = 0.25) -> Callable[..., Tensor]:
    """LIME's sample weight of the ``lime`` package (the paper's LIME): ``sqrt(exp(-d² / width²))`` with ``d``
    the cosine distance between the binary sample and the all-kept vector. A Captum ``similarity_func``."""

    def similarity(original: Any, perturbed: Any, sample: Tensor, **kwargs: Any) -> Tensor:
        sample = sample.double().flatten()
        distance = 1 - sample.sum().sqrt() / math.sqrt(sample.numel()) if sample.any() else torch.tensor(1.0, dtype=torch.float64)
        return torch.exp(-(distance**2) / kernel_width**2).sqrt()

    return similarity


def lime_attributions(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    segments: Tensor,
    masker: MaskerSpec = "layer",
    *,
    n_samples: int = 500,
    perturbations_per_eval: int = 16,
    interpretable_model: Optional[Any] = None,
    kernel_width: float = 0.25,
    seed: int = 0,
    show_progress: bool = True,
) -> Tensor:
    """LIME under any masker, with Captum's ``LimeBase``: each binary sample of segments is evaluated as
    ``masker(model, x, mask)`` on the class probabilities (softmax), weighted by :func:`binary_cosine_kernel`
    and fitted by ridge regression (``alpha=1``), the ``lime`` package's defaults.

    The samples depend only on ``seed`` and the image's index, so every masker sees the same ones.

    Args:
        model (nn.Module), images (Tensor), masker: as in :func:`removal_curve`.
        targets (Tensor): ``(N,)`` classes to explain.
        segments (Tensor): ``(N, H, W)`` ids, consecutive from 0 per image.
        n_samples (int): samples per image (the paper: 500).
        perturbations_per_eval (int): samples per forward pass.
        interpretable_model: a Captum linear model (default ``SkLearnRidge(alpha=1.0)``).
        kernel_width (float): of the sample weights.
        seed (int): of the samples.
        show_progress (bool): a progress bar over the images.

    Returns:
        ``(N, H, W)`` float: each pixel holds its segment's LIME coefficient.
    """
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import LimeBase

    masker_ = get_masker(masker)
    forward, device = masker_.bind(model), model_device(model)
    segments = segments.to(device)
    maps = []
    bar = progress_bar(len(images), f"lime ({masker_.name})", show_progress)
    for index in range(len(images)):
        ids = segments[index]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        count = int(ids.max()) + 1

        def sample(original: Any, **kwargs: Any) -> Tensor:
            return torch.bernoulli(torch.full((1, count), 0.5), generator=generator).long().to(device)

        def to_input(keep: Tensor, original: Tensor, **kwargs: Any) -> tuple:
            return original, keep[0].bool()[ids][None, None]

        def probabilities(x: Tensor, mask: Tensor) -> Tensor:
            return F.softmax(_logits(forward(x, mask)).float(), dim=1)

        lime = LimeBase(probabilities, interpretable_model or SkLearnRidge(alpha=1.0), binary_cosine_kernel(kernel_width), sample, True, to_input, None)
        with torch.no_grad():
            coefficients = lime.attribute(images[index : index + 1].to(device), target=int(targets[index]), n_samples=n_samples, perturbations_per_eval=perturbations_per_eval)
        maps.append(coefficients.flatten().to(device)[ids].cpu())
        bar.update()
    bar.close()
    return torch.stack(maps)


@dataclass
class LimeMetrics:
    """The three LIME metrics of Table 2 for one masker (means over images).

    Attributes:
        masker: the masker LIME ran with.
        k: segments taken by the top-k metrics.
        topk_ablation_accuracy: lower is better.
        alignment_score: higher is better.
        topk_jaccard: higher is better.
        attributions: ``(N, H, W)`` the LIME maps.
    """

    masker: str
    k: int
    topk_ablation_accuracy: float
    alignment_score: float
    topk_jaccard: float
    attributions: Tensor = field(repr=False)


def lime_metrics(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    object_masks: Tensor,
    segmenter: SegmenterSpec = "patches",
    maskers: Sequence[MaskerSpec] = ("black", "grey", "layer"),
    *,
    k: int = 20,
    n_samples: int = 500,
    ablation_masker: MaskerSpec = "grey",
    perturbations_per_eval: int = 16,
    seed: int = 0,
    batch_size: int = 64,
    show_progress: bool = True,
) -> Dict[str, LimeMetrics]:
    """Runs LIME (:func:`lime_attributions`) with each masker on each image's true class and reports the
    paper's three metrics (Table 2): top-k ablation accuracy (removal with ``ablation_masker``, grey in the
    paper), alignment score and top-k Jaccard similarity with the object masks.

    Args:
        model, images, labels, segmenter, batch_size, show_progress: as in :func:`removal_curve`.
        object_masks (Tensor): ``(N, H, W)`` bool, True on the object.
        maskers: the maskers LIME runs with.
        k (int): segments taken by the top-k metrics (the paper: 20 of about 196).
        n_samples, perturbations_per_eval, seed: LIME's (see :func:`lime_attributions`).
        ablation_masker: how the top-k ablation removes segments.

    Returns:
        ``{masker name: LimeMetrics}``.
    """
    _check(images, labels, object_masks)
    segments = segment_images(images, segmenter)
    results = {}
    for masker in maskers:
        masker_ = get_masker(masker)
        maps = lime_attributions(model, images, labels, segments, masker_, n_samples=n_samples, perturbations_per_eval=perturbations_per_eval, seed=seed, show_progress=show_progress)
        results[masker_.name] = LimeMetrics(
            masker=masker_.name,
            k=k,
            topk_ablation_accuracy=topk_ablation_accuracy(model, images, labels, maps, segments, k, ablation_masker, batch_size=batch_size, show_progress=show_progress),
            alignment_score=float(alignment_score(maps, segments, object_masks).mean()),
            topk_jaccard=float(topk_jaccard(maps, segments, object_masks, k).mean()),
            attributions=maps,
        )
    return results
