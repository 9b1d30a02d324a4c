"""One image explained with Captum under a masker: what ``layermask explain`` computes for one image and the dataset
runs compute for each image (one place, so that both give the same attributions)."""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..integrations.captum import LayerMask
from .normalization import normalizer

METHODS = ("lime", "kernelshap", "ablation", "occlusion")
"""Captum's perturbation methods an explanation uses: Lime, KernelShap, FeatureAblation, Occlusion."""

EXPLANATION_MASKERS = ("black", "grey", "layer")
"""The maskers an explanation can use (:data:`~captum_layermask.evaluation.maskers.MASKER_NAMES` that Captum's
baselines express): a black or grey fill of the plain model, or layer masking (``LayerMask()``)."""


def captum_baseline(masker: str, mean: Sequence[float], std: Sequence[float]) -> Any:
    """The Captum ``baselines`` of a masker, for inputs normalised with ``mean`` and ``std``: black pixels
    ``(1, C, 1, 1)``, grey (0, the mean colour) or ``LayerMask()``.

    Raises:
        ValueError: for a masker Captum's baselines cannot express.
    """
    if masker == "black":
        return normalizer(mean, std)(torch.zeros(1, len(mean), 1, 1))
    if masker == "grey":
        return 0.0
    if masker == "layer":
        return LayerMask()
    raise ValueError(f"unknown masker {masker!r} for an explanation; use one of {', '.join(EXPLANATION_MASKERS)}.")


def captum_attribution(
    method: str,
    forward: nn.Module,
    x: Tensor,
    segments: Tensor,
    target: int,
    baseline: Any,
    samples: int,
    per_eval: int,
    show_progress: bool = False,
) -> Tensor:
    """One Captum attribution of ``x`` ``(1, C, H, W)``: Lime or KernelShap (``samples`` samples) or
    FeatureAblation over ``segments`` ``(1, 1, H, W)``, or Occlusion with 16x16 windows at stride 8."""
    from captum.attr import FeatureAblation, KernelShap, Lime, Occlusion

    common = dict(target=target, baselines=baseline, perturbations_per_eval=per_eval, show_progress=show_progress)
    if method == "lime":
        return Lime(forward).attribute(x, feature_mask=segments, n_samples=samples, **common)
    if method == "kernelshap":
        return KernelShap(forward).attribute(x, feature_mask=segments, n_samples=samples, **common)
    if method == "ablation":
        return FeatureAblation(forward).attribute(x, feature_mask=segments, **common)
    channels = x.shape[1]
    return Occlusion(forward).attribute(x, sliding_window_shapes=(channels, 16, 16), strides=(channels, 8, 8), **common)


def attributions_per_masker(
    model: nn.Module,
    masked: nn.Module,
    x: Tensor,
    segments: Tensor,
    target: Optional[int],
    *,
    maskers: Sequence[str],
    baselines: Mapping[str, Any],
    method: str,
    samples: int,
    per_eval: int,
    seed: int,
    scores: Optional[Callable[[nn.Module], nn.Module]] = None,
    show_progress: bool = False,
) -> Dict[str, Tensor]:
    """Attributions of ``target`` under each masker, with the same random samples (the seed is set before each):
    ``masked`` (the layer-masked model) for ``"layer"``, the plain ``model`` for the fills, each with its
    ``baselines[masker]``.

    Args:
        scores: turns the model (plain or layer-masked) into the scores explained, e.g. a segmentation model into
            :class:`~captum_layermask.RegionScores`; the model's output if None.
        show_progress: Captum's progress bars, each headed by the method and the masker (on stderr).
    """
    from .maskers import masker_title

    results = {}
    for masker in maskers:
        forward = masked if masker == "layer" else model
        forward = scores(forward) if scores is not None else forward
        torch.manual_seed(seed)
        if show_progress:
            print(f"{method}, {masker_title(masker)}:", file=sys.stderr)
        attribution = captum_attribution(
            method, forward, x, segments, target, baselines[masker], samples, per_eval, show_progress=show_progress
        )
        results[masker] = attribution.detach()
    return results
