"""What ``layermask explain`` does for one image under each masking: segment it, attribute with Captum, and draw
the side-by-side figure (for classifiers and for a region of a segmentation model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..core.convert import layer_masked
from ..evaluation.attribution_metrics import segment_scores
from ..evaluation.explanations import attributions_per_masker, captum_baseline
from ..evaluation.maskers import masker_title
from ..evaluation.segmentation import get_segmenter, segment_images
from .io import CommandError, read_segments


def check_target(target: int, classes: int) -> None:
    """Refuses a class index the model does not have."""
    if not 0 <= target < classes:
        raise CommandError(f"target {target} is out of range: the model has {classes} classes (0 to {classes - 1}).")


def class_name(classes: Optional[Sequence[str]], index: int) -> str:
    """A class's name, or its index where the model's classes are not named."""
    return classes[index] if classes is not None and index < len(classes) else str(index)


def segment(image: Tensor, how: str, file: Optional[Path]) -> Tensor:
    """Segment ids ``(1, 1, H, W)`` of an image in [0, 1]: 16x16 patches, SLIC or quickshift, or from a file."""
    if file is None:
        return segment_images(image, get_segmenter(how, mean=(0, 0, 0), std=(1, 1, 1)))[:, None]
    return segment_images(image, read_segments(file, *image.shape[-2:])[None])[:, None]


@dataclass
class ExplainSettings:
    """What ``layermask explain`` was asked for one image (the command's options)."""

    size: Optional[int]
    target: Optional[int]
    method: str
    segments: str
    segments_file: Optional[Path]
    maskers: Sequence[str]
    samples: int
    per_eval: int
    top: int
    seed: int
    residual: str = "intersection"


def attribute(
    model: nn.Module,
    x: Tensor,
    segments: Tensor,
    target: Optional[int],
    settings: ExplainSettings,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    scores: Optional[Callable[[nn.Module], nn.Module]] = None,
    fills: Optional[Dict[str, float]] = None,
) -> Dict[str, Tensor]:
    """Attributions of the target under each of ``settings.maskers``, with the same random samples.

    Args:
        model: the plain model; the ``layer`` masker explains ``layer_masked(model)`` with ``LayerMask()``.
        x: the image ``(1, C, H, W)``, normalised with ``mean`` and ``std``.
        segments: ``(1, 1, H, W)`` feature ids.
        target: the class explained (None for a model with one score per image).
        scores: turns the model (plain or layer-masked) into the scores explained, e.g. a segmentation model into
            :class:`~captum_layermask.RegionScores`; the model's output if None.
        fills: baselines that replace a masker's default (a detector's ``[0, 1]`` input has grey at 0.5).
    """
    baselines = {masker: (fills or {}).get(masker, captum_baseline(masker, mean, std)) for masker in settings.maskers}
    return attributions_per_masker(
        model,
        layer_masked(model, residual=settings.residual),
        x,
        segments,
        target,
        maskers=settings.maskers,
        baselines=baselines,
        method=settings.method,
        samples=settings.samples,
        per_eval=settings.per_eval,
        seed=settings.seed,
        scores=scores,
        show_progress=True,
    )


def plot_explanation(
    image: Tensor,
    segments: Tensor,
    results: Dict[str, Tensor],
    title: str,
    top: int,
    path: Path,
    region: Optional[Tensor] = None,
    region_kind: str = "region",
) -> None:
    """Paper Figure 8 style: per masking, the top segments for the class in green and against it in red (and the
    outline of the explained region of a segmentation, in yellow)."""
    import matplotlib.pyplot as plt

    pixels = image[0].permute(1, 2, 0).numpy()
    fig, axes = plt.subplots(1, len(results) + 1, figsize=(3.2 * (len(results) + 1), 3.6))
    axes[0].imshow(pixels)
    axes[0].set_title(f"input; class '{title}'" if region is None else f"{region_kind} of '{title}'")
    ids = segments[:, 0]
    for axis, (masking, attribution) in zip(axes[1:], results.items()):
        scores = segment_scores(attribution, ids)[0]
        order = torch.argsort(scores, descending=True)
        positive = [int(s) for s in order[:top] if scores[s] > 0]
        negative = [int(s) for s in order.flip(0)[:top] if scores[s] < 0]
        shown = 0.35 * pixels + 0.25
        seg = ids[0].numpy()
        for chosen, colour in ((positive, (0.1, 0.8, 0.2)), (negative, (0.9, 0.15, 0.1))):
            highlighted = np.isin(seg, chosen)
            shown[highlighted] = 0.55 * pixels[highlighted] + 0.45 * np.array(colour)
        axis.imshow(shown)
        axis.set_title(masker_title(masking))
    for axis in axes:
        axis.axis("off")
        if region is not None:
            axis.contour(region.float().numpy(), levels=[0.5], colors="yellow", linewidths=1.2)
    fig.suptitle(f"top {top} segments for (green) and against (red) '{title}'")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def save_explanation(
    folder: Path,
    image: Tensor,
    segments: Tensor,
    results: Dict[str, Tensor],
    target: int,
    name: str,
    top: int,
    region: Optional[Tensor] = None,
    region_kind: str = "region",
) -> None:
    """Writes ``explanation.png``, ``attributions.pt`` (everything), ``attributions_<masker>.npy``,
    ``segments.npy`` and, for a region of a segmentation, ``region.npy`` into ``folder``."""
    plot_explanation(image, segments, results, name, top, folder / "explanation.png", region, region_kind)
    saved = {"attributions": results, "segments": segments, "target": target, "image": image}
    torch.save(saved if region is None else {**saved, "region": region}, folder / "attributions.pt")
    for masker, attribution in results.items():
        np.save(folder / f"attributions_{masker}.npy", attribution[0].numpy())
    np.save(folder / "segments.npy", segments[0, 0].numpy())
    if region is not None:
        np.save(folder / "region.npy", region.numpy())
