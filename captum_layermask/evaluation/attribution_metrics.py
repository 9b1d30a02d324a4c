"""LIME under any masker and the metrics of its explanations (paper section 4.4.2, supplementary 6.2).

:func:`topk_ablation_accuracy`, :func:`alignment_score`, :func:`topk_jaccard`, and :func:`lime_metrics`, which
runs LIME under each masker and reports all three. Shapes and conventions are those of
:mod:`captum_layermask.evaluation.removal`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import MaskShapeError
from ._batching import model_device, progress_bar
from ._common import (
    ResultRow,
    check_images,
    check_inputs,
    check_object_masks,
    check_positive,
    logits_of,
    predict,
    result_row,
)
from .maskers import MaskerSpec, get_masker
from .seeding import image_seed
from .segmentation import SegmenterSpec, check_segment_ids, consecutive_ids, segment_images


def _check_attributions(attributions: Tensor, segments: Tensor) -> Tensor:
    """``(N, H, W)`` attributions (channels averaged) and ``(N, H, W)`` integer segments of the same pixels."""
    if not isinstance(attributions, Tensor) or attributions.ndim not in (3, 4):
        shape = tuple(getattr(attributions, "shape", ()))
        raise MaskShapeError(
            f"attributions must be (N, H, W) or (N, C, H, W), got {shape}; add the batch dimension to a single map."
        )
    if attributions.shape[0] == 0:
        raise ValueError("the attributions hold no image (an empty batch); give at least one.")
    if attributions.ndim == 4:
        attributions = attributions.mean(1)
    check_segment_ids(segments, attributions.shape)
    return attributions


def segment_scores(attributions: Tensor, segments: Tensor) -> List[Tensor]:
    """Each segment's score: the mean of its pixels' attributions (averaged over channels).

    Args:
        attributions (Tensor): ``(N, H, W)`` or ``(N, C, H, W)`` (Captum's output shape).
        segments (Tensor): ``(N, H, W)`` integer ids; score ``j`` is that of the ``j``-th smallest id of the
            image (ids need not be consecutive).

    Returns:
        One float64 tensor ``(S_i,)`` per image.
    """
    attributions = _check_attributions(attributions, segments)
    scores = []
    for values, ids in zip(attributions.detach().cpu().double(), segments.cpu()):
        ids = consecutive_ids(ids).flatten()
        total = torch.zeros(int(ids.max()) + 1, dtype=torch.float64).index_add_(0, ids, values.flatten())
        scores.append(total / torch.bincount(ids).clamp(min=1))
    return scores


def top_segments_mask(attributions: Tensor, segments: Tensor, k: int) -> Tensor:
    """``(N, H, W)`` bool: the pixels of each image's ``k`` highest-scoring segments (ties by segment id)."""
    check_positive(k, "k (segments taken)")
    segments = segments.cpu()
    masks = []
    for scores, ids in zip(segment_scores(attributions, segments), segments):
        top = torch.sort(scores, descending=True, stable=True).indices[:k]
        masks.append(torch.isin(consecutive_ids(ids), top))
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
    check_inputs(images, labels)
    check_positive(k, "k (segments taken)")
    removed = top_segments_mask(attributions, segments, k)
    masker_ = get_masker(masker)
    with progress_bar(len(images), f"top-{k} ablation ({masker_.name})", show_progress) as bar:
        predictions, _ = predict(
            masker_.bind(model), model_device(model), images, lambda part: ~removed[part][:, None], batch_size, bar
        )
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
    attributions = _check_attributions(attributions, segments)
    check_object_masks(object_masks, tuple(segments.shape))
    out = []
    for scores, ids, mask in zip(segment_scores(attributions, segments), segments.cpu(), object_masks.cpu().double()):
        truth = torch.zeros_like(scores).index_add_(0, consecutive_ids(ids).flatten(), (mask - mask.mean()).flatten())
        out.append(F.cosine_similarity(scores, truth, dim=0, eps=1e-12))
    return torch.stack(out)


def top_k_for(segments: float) -> int:
    """The segments the top-k metrics take by default for an image of ``segments`` segments: a tenth of them (the
    paper's top-20 of 196 patches), at least 1."""
    return max(1, round(0.1 * segments))


def topk_jaccard(attributions: Tensor, segments: Tensor, object_masks: Tensor, k: int = 20) -> Tensor:
    """Top-k Jaccard similarity (supplementary 6.2) of the object mask and the union of the ``k`` highest-scoring
    segments; 1 when they coincide.

    Args:
        attributions, segments, object_masks: as in :func:`alignment_score`.
        k (int): segments taken.

    Returns:
        ``(N,)`` similarities.
    """
    _check_attributions(attributions, segments)
    check_object_masks(object_masks, tuple(segments.shape))
    top = top_segments_mask(attributions, segments, k)
    truth = object_masks.cpu().bool()
    union = (top | truth).flatten(1).sum(1).clamp(min=1)
    return (top & truth).flatten(1).sum(1).double() / union


def binary_cosine_kernel(kernel_width: float = 0.25) -> Callable[..., Tensor]:
    """LIME's sample weight of the ``lime`` package (the paper's LIME): ``sqrt(exp(-d² / width²))`` with ``d``
    the cosine distance between the binary sample and the all-kept vector. A Captum ``similarity_func``."""

    def similarity(original: Any, perturbed: Any, sample: Tensor, **kwargs: Any) -> Tensor:
        sample = sample.double().flatten()
        distance = (
            1 - sample.sum().sqrt() / math.sqrt(sample.numel())
            if sample.any()
            else torch.tensor(1.0, dtype=torch.float64)
        )
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
    check_images(images)
    check_segment_ids(segments, (len(images), *images.shape[-2:]))
    masker_ = get_masker(masker)
    forward, device = masker_.bind(model), model_device(model)
    segments = torch.stack([consecutive_ids(ids) for ids in segments]).to(device)
    maps = []
    with progress_bar(len(images), f"lime ({masker_.name})", show_progress) as bar:
        for index in range(len(images)):
            coefficients = lime_coefficients(
                forward,
                images[index : index + 1].to(device),
                int(targets[index]),
                segments[index],
                n_samples=n_samples,
                perturbations_per_eval=perturbations_per_eval,
                interpretable_model=interpretable_model,
                kernel_width=kernel_width,
                seed=image_seed(seed, index),
            )
            maps.append(coefficients.to(device)[segments[index]].cpu())
            bar.update()
    return torch.stack(maps)


def lime_coefficients(
    forward: Callable[[Tensor, Tensor], Any],
    image: Tensor,
    target: int,
    segments: Tensor,
    *,
    n_samples: int = 500,
    perturbations_per_eval: int = 16,
    interpretable_model: Optional[Any] = None,
    kernel_width: float = 0.25,
    seed: int = 0,
) -> Tensor:
    """One image's LIME coefficients, one per segment (what :func:`lime_attributions` computes per image).

    Args:
        forward: a bound masker, ``forward(x, mask)`` (see :meth:`Masker.bind`).
        image (Tensor): ``(1, C, H, W)`` model input.
        target (int): the class explained.
        segments (Tensor): ``(H, W)`` ids, consecutive from 0, on the image's device.
        n_samples, perturbations_per_eval, interpretable_model, kernel_width: as in :func:`lime_attributions`.
        seed (int): of this image's samples.

    Returns:
        ``(S,)`` float coefficients.
    """
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import LimeBase

    def probabilities(x: Tensor, mask: Tensor) -> Tensor:
        return F.softmax(logits_of(forward(x, mask)).float(), dim=1)

    sample, to_input = _lime_sampling(segments, torch.Generator().manual_seed(seed))
    surrogate = interpretable_model or SkLearnRidge(alpha=1.0)
    lime = LimeBase(probabilities, surrogate, binary_cosine_kernel(kernel_width), sample, True, to_input, None)
    with torch.no_grad():
        coefficients = lime.attribute(
            image, target=target, n_samples=n_samples, perturbations_per_eval=perturbations_per_eval
        )
    return coefficients.flatten()


def _lime_sampling(ids: Tensor, generator: torch.Generator) -> tuple:
    """LimeBase's sampler (each of the image's segments kept with probability 1/2, from ``generator``) and its
    transform of a binary sample into ``(image, mask)``."""
    count = int(ids.max()) + 1

    def sample(original: Any, **kwargs: Any) -> Tensor:
        return torch.bernoulli(torch.full((1, count), 0.5), generator=generator).long().to(ids.device)

    def to_input(keep: Tensor, original: Tensor, **kwargs: Any) -> tuple:
        return original, keep[0].bool()[ids][None, None]

    return sample, to_input


@dataclass
class LimeMetrics:
    """The three LIME metrics of Table 2 for one masker (means over images).

    Attributes:
        masker: the masker LIME ran with.
        k: segments taken by the top-k metrics.
        topk_ablation_accuracy: lower is better.
        alignment_score: higher is better.
        topk_jaccard: higher is better.
        attributions: ``(N, H, W)`` the LIME maps (None from a dataset run whose images differ in size).
    """

    masker: str
    k: int
    topk_ablation_accuracy: float
    alignment_score: float
    topk_jaccard: float
    attributions: Optional[Tensor] = field(repr=False)

    def rows(self, segmenter: str) -> List[ResultRow]:
        """The three metrics as flat result rows (LIME on ``segmenter``'s segments)."""
        metrics = ("topk_ablation_accuracy", "alignment_score", "topk_jaccard")
        return [result_row(f"LIME (k={self.k})", self.masker, m, getattr(self, m), segmenter) for m in metrics]


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
    check_inputs(images, labels, object_masks)
    check_positive(k, "k (segments taken)")
    segments = segment_images(images, segmenter)
    results = {}
    for masker in maskers:
        masker_ = get_masker(masker)
        maps = lime_attributions(
            model,
            images,
            labels,
            segments,
            masker_,
            n_samples=n_samples,
            perturbations_per_eval=perturbations_per_eval,
            seed=seed,
            show_progress=show_progress,
        )
        results[masker_.name] = LimeMetrics(
            masker=masker_.name,
            k=k,
            topk_ablation_accuracy=topk_ablation_accuracy(
                model,
                images,
                labels,
                maps,
                segments,
                k,
                ablation_masker,
                batch_size=batch_size,
                show_progress=show_progress,
            ),
            alignment_score=float(alignment_score(maps, segments, object_masks).mean()),
            topk_jaccard=float(topk_jaccard(maps, segments, object_masks, k).mean()),
            attributions=maps,
        )
    return results
