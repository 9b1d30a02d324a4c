"""Missingness-bias diagnostics: how a masking method distorts a model's features (supplementary section 7).

- :func:`linearity`: is the model linear in masking, ``f(x) ≈ Σ_i f_m(x, m_i)`` over a partition into
  patches (supplementary 7.1, Table 13)?
- :func:`output_collapse`: do features of different images collapse together when only a small region is
  visible (supplementary 7.2, Fig. 17)?
- :func:`magnitude_curve`: how does the feature norm grow with the visible area (supplementary Fig. 18)?

Features are the input of the model's final classifier layer, found automatically (the last ``nn.Linear`` that
runs) or named with ``feature_layer=``. Inputs are model inputs ``(N, C, H, W)``, normalised as the model
expects; every function runs in batches on the model's device under ``torch.no_grad()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.patches import patch_segments
from ._batching import FeatureLayer, FeatureReader, batches, box_masks, model_device, progress_bar
from ._common import ResultRow, check_images, result_row
from .maskers import MaskerSpec, get_masker


@dataclass
class SizeCurve:
    """A diagnostic measured at several sizes of the visible region.

    Attributes:
        sizes: side lengths in pixels.
        values: the diagnostic at each size.
        metric: what ``values`` are.
        masker: the masker's name.
        per_image: for each size, the per-image (or per-pair) values the mean is taken over.
    """

    sizes: List[int]
    values: List[float]
    metric: str
    masker: str
    per_image: List[Tensor] = field(default_factory=list, repr=False)

    def rows(self, section: str) -> List[ResultRow]:
        """The value at each size as flat result rows of ``section``."""
        return [
            result_row(section, self.masker, self.metric, value, f"{size}px visible")
            for size, value in zip(self.sizes, self.values)
        ]


class _FeatureRun:
    """A model bound to a masker, with its feature reader: ``run(images, masks)`` gives features in batches."""

    def __init__(
        self,
        model: nn.Module,
        masker: MaskerSpec,
        feature_layer: FeatureLayer,
        images: Tensor,
        batch_size: int,
        show_progress: bool,
    ) -> None:
        self.device = model_device(model)
        self.masker = get_masker(masker)
        self.forward = self.masker.bind(model)
        self.reader = FeatureReader(model, feature_layer, images[:1].to(self.device))
        self.batch_size, self.show_progress = batch_size, show_progress

    def run(
        self,
        images: Tensor,
        masks: Tensor,
        description: str,
        image_index: Optional[Tensor] = None,
        mask_index: Optional[Tensor] = None,
    ) -> Tensor:
        """Features ``(M, F)`` of ``images[image_index[k]]`` under ``masks[mask_index[k]]`` (bool ``(., 1, H, W)``).

        Without indices, image ``k`` is paired with mask ``k`` (or with the single mask given).
        """
        if image_index is None:
            image_index = torch.arange(len(images))
        if mask_index is None:
            mask_index = torch.zeros_like(image_index) if len(masks) == 1 else torch.arange(len(masks))
        out = []
        with torch.no_grad(), self.reader, progress_bar(len(image_index), description, self.show_progress) as bar:
            for part in batches(len(image_index), self.batch_size, bar):
                x, mask = images[image_index[part]].to(self.device), masks[mask_index[part]].to(self.device)
                out.append(self.reader.read(self.forward, x, mask).cpu())
        return torch.cat(out)


def linearity(
    model: nn.Module,
    images: Tensor,
    patch_size: int,
    masker: MaskerSpec = "layer",
    *,
    feature_layer: FeatureLayer = None,
    batch_size: int = 64,
    show_progress: bool = True,
) -> float:
    """Linearity in masking (supplementary section 7.1): mean cosine similarity of ``f(x)`` and
    ``Σ_i f_m(x, m_i)``, where the masks ``m_i`` each keep one of the square patches that tile the image.

    The paper reports, for an ImageNet ResNet-50 at 224x224, 0.95/0.83/0.71/0.65 with layer masking for patch
    sizes 112/56/32/16, against 0.83/0.58/0.49/0.44 with grey fill (Table 13). ``f(x)`` is the features of the
    image under a full mask (the model itself for every built-in masker).

    Args:
        model (nn.Module): the classifier (in eval mode).
        images (Tensor): model inputs ``(N, C, H, W)``.
        patch_size (int): side of the square patches (border patches are smaller when it does not divide the
            image).
        masker: ``"layer"``, ``"grey"``, ``"black"``, ... or ``fn(model, x, mask)`` (see
            :mod:`captum_layermask.evaluation.maskers`).
        feature_layer: None (the classifier's input, detected), a submodule name or module, or ``"output"``.
        batch_size (int): masked images per forward pass.
        show_progress (bool): a progress bar over the forward passes.

    Returns:
        The mean cosine similarity over the images, in [-1, 1].
    """
    check_images(images)
    count, _, height, width = images.shape
    patches = patch_segments(height, width, patch_size)[0]
    masks = patches == torch.arange(int(patches.max()) + 1).view(-1, 1, 1, 1)
    run = _FeatureRun(model, masker, feature_layer, images, batch_size, show_progress)
    whole = run.run(images, torch.ones(1, 1, height, width, dtype=torch.bool), "linearity (whole)")
    image_index = torch.arange(count).repeat_interleave(len(masks))
    mask_index = torch.arange(len(masks)).repeat(count)
    parts = run.run(images, masks, f"linearity ({patch_size}px patches)", image_index, mask_index)
    summed = parts.view(count, len(masks), -1).sum(1)
    return float(F.cosine_similarity(whole, summed, dim=1).mean())


def _centred(height: int, width: int, size: int) -> tuple:
    if not 0 < size <= min(height, width):
        raise ValueError(f"sizes must be between 1 and the image side {min(height, width)}, got {size}.")
    return ((height - size) // 2, (width - size) // 2, size, size)


def _pair_cosines(features: Tensor) -> Tensor:
    """Cosine similarity of every pair ``i < j`` of feature vectors."""
    normalised = F.normalize(features, dim=1)
    similarity = normalised @ normalised.T
    rows, columns = torch.triu_indices(len(features), len(features), offset=1)
    return similarity[rows, columns]


def output_collapse(
    model: nn.Module,
    images: Tensor,
    sizes: Sequence[int],
    masker: MaskerSpec = "layer",
    *,
    feature_layer: FeatureLayer = None,
    batch_size: int = 64,
    show_progress: bool = True,
) -> SizeCurve:
    """Output collapse (supplementary section 7.2, Fig. 17): ``E[c_n - c]`` over all pairs of images.

    ``c`` is the cosine similarity of two images' features; ``c_n`` that of the same images resized to
    ``n x n`` (bilinear, antialiased), placed at the centre of an empty canvas of the original size and masked
    outside it. A masking method that avoids collapse keeps ``c_n - c`` near 0 as ``n`` shrinks.

    Args:
        model, images, masker, feature_layer, batch_size, show_progress: as in :func:`linearity`
            (at least 2 images).
        sizes (sequence of int): the side lengths ``n`` of the visible square.

    Returns:
        A :class:`SizeCurve` of ``c_n - c``; ``per_image`` holds the per-pair differences.
    """
    check_images(images)
    if len(images) < 2:
        raise ValueError("output_collapse compares pairs of images: pass at least 2.")
    count, channels, height, width = images.shape
    run = _FeatureRun(model, masker, feature_layer, images, batch_size, show_progress)
    clean = _pair_cosines(run.run(images, torch.ones(1, 1, height, width, dtype=torch.bool), "collapse (whole)"))
    values, per_pair = [], []
    for size in sizes:
        top, left, _, _ = box = _centred(height, width, size)
        canvas = images.new_zeros(count, channels, height, width)
        canvas[..., top : top + size, left : left + size] = F.interpolate(
            images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        difference = _pair_cosines(run.run(canvas, box_masks(height, width, [box]), f"collapse ({size}px)")) - clean
        values.append(float(difference.mean()))
        per_pair.append(difference)
    return SizeCurve(list(sizes), values, "cosine similarity change c_n - c", run.masker.name, per_pair)


def magnitude_curve(
    model: nn.Module,
    images: Tensor,
    sizes: Sequence[int],
    masker: MaskerSpec = "layer",
    *,
    feature_layer: FeatureLayer = None,
    batch_size: int = 64,
    show_progress: bool = True,
) -> SizeCurve:
    """Mean feature norm ``E_x ||f_m(x, m_n)||`` with only the centred ``n x n`` square of each image visible
    (supplementary section 7.1, Fig. 18). The paper reports layer masking tracking ``n²``; with a global
    average pool that renormalises by the visible area (section 3.2), as here, it need not grow at all.

    Args:
        model, images, masker, feature_layer, batch_size, show_progress: as in :func:`linearity`.
        sizes (sequence of int): side lengths ``n`` of the visible square.

    Returns:
        A :class:`SizeCurve` of mean L2 norms; ``per_image`` holds each image's norm.
    """
    check_images(images)
    height, width = images.shape[-2:]
    run = _FeatureRun(model, masker, feature_layer, images, batch_size, show_progress)
    values, norms = [], []
    for size in sizes:
        mask = box_masks(height, width, [_centred(height, width, size)])
        norm = run.run(images, mask, f"magnitude ({size}px)").norm(dim=1)
        values.append(float(norm.mean()))
        norms.append(norm)
    return SizeCurve(list(sizes), values, "mean feature norm", run.masker.name, norms)
