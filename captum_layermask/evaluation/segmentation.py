"""Segmenters: the features that perturbation methods remove, as in the paper's appendix.

A segmenter maps one model input ``(C, H, W)`` to integer segment ids ``(H, W)``. The built-in ones are square
patches (16x16), SLIC (``n_segments=196``) and quickshift (``kernel_size=2, max_dist=200, ratio=0.2``), the
settings of the paper for 224x224 images. SLIC and quickshift work on RGB values in [0, 1], so they undo the
model's normalisation first (ImageNet's by default; pass ``mean``/``std`` for another).
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..core.errors import MaskShapeError
from ..core.patches import patch_segments
from .normalization import IMAGENET_MEAN, IMAGENET_STD

SEGMENTER_NAMES = ("patches", "slic", "quickshift")


class Patches:
    """Square patches of ``size`` pixels (the paper's 16x16), in row-major order."""

    name = "patches"

    def __init__(self, size: int = 16) -> None:
        self.size = size

    def __call__(self, image: Tensor) -> Tensor:
        return patch_segments(image.shape[-2], image.shape[-1], self.size)[0, 0]


class _SkimageSegmenter:
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float64).view(-1, 1, 1)

    def rgb(self, image: Tensor) -> np.ndarray:
        """``(H, W, 3)`` float64 in [0, 1] from a normalised ``(3, H, W)`` input."""
        if image.shape[0] != 3:
            raise MaskShapeError(
                f"{self.name} segments RGB images, got {image.shape[0]} channels; use patches or your own segmenter."
            )
        pixels = image.detach().cpu().double() * self.std + self.mean
        return pixels.clamp(0, 1).permute(1, 2, 0).numpy()


class SLIC(_SkimageSegmenter):
    """SLIC superpixels (scikit-image), by default the paper's ``n_segments=196``."""

    name = "slic"

    def __init__(
        self, n_segments: int = 196, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        super().__init__(mean, std)
        self.n_segments = n_segments

    def __call__(self, image: Tensor) -> Tensor:
        from skimage.segmentation import slic

        return torch.from_numpy(slic(self.rgb(image), n_segments=self.n_segments, start_label=0)).long()


class Quickshift(_SkimageSegmenter):
    """Quickshift segments (scikit-image), by default the paper's ``kernel_size=2, max_dist=200, ratio=0.2``."""

    name = "quickshift"

    def __init__(
        self,
        kernel_size: float = 2,
        max_dist: float = 200,
        ratio: float = 0.2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(mean, std)
        self.kernel_size, self.max_dist, self.ratio = kernel_size, max_dist, ratio

    def __call__(self, image: Tensor) -> Tensor:
        from skimage.segmentation import quickshift

        labels = quickshift(self.rgb(image), kernel_size=self.kernel_size, max_dist=self.max_dist, ratio=self.ratio)
        return torch.from_numpy(labels).long()


Segmenter = Callable[[Tensor], Tensor]
SegmenterSpec = Union[str, Segmenter, Tensor]


def get_segmenter(
    segmenter: Union[str, Segmenter], mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Segmenter:
    """A segmenter from a name (``"patches"``, ``"slic"``, ``"quickshift"``) or a callable ``fn(image) -> ids``.

    ``mean`` and ``std`` are the normalisation of the images that SLIC and quickshift undo (ImageNet's by
    default; ``(0, 0, 0)`` and ``(1, 1, 1)`` for images in [0, 1]).
    """
    if isinstance(segmenter, str):
        if segmenter not in SEGMENTER_NAMES:
            raise ValueError(
                f"unknown segmenter {segmenter!r}; use one of {', '.join(SEGMENTER_NAMES)} or a callable fn(image) -> (H, W) ids."
            )
        return (
            Patches()
            if segmenter == "patches"
            else {"slic": SLIC, "quickshift": Quickshift}[segmenter](mean=mean, std=std)
        )
    if not callable(segmenter):
        raise TypeError(f"segmenter must be a name, a callable or a tensor of ids, got {type(segmenter).__name__}.")
    return segmenter


def check_segment_ids(segments: Tensor, shape: Sequence[int]) -> None:
    """Raises :class:`MaskShapeError` unless ``segments`` is an integer tensor of ``shape``, i.e. ``(N, H, W)``."""
    if not isinstance(segments, Tensor) or tuple(segments.shape) != tuple(shape):
        raise MaskShapeError(
            f"segments must have shape {tuple(shape)} (one id per pixel of each image), got {tuple(getattr(segments, 'shape', ())) or type(segments).__name__}."
        )
    if segments.is_floating_point() or segments.is_complex() or segments.dtype == torch.bool:
        raise MaskShapeError(
            f"segment ids must be integers, got {segments.dtype}; convert them with .long() (after rounding)."
        )


def consecutive_ids(segments: Tensor) -> Tensor:
    """The same segmentation with ids 0, 1, ... in the order of the original ids."""
    return torch.unique(segments, return_inverse=True)[1]


def segment_images(images: Tensor, segmenter: SegmenterSpec) -> Tensor:
    """Segment ids of a batch of model inputs, each image's ids consecutive from 0.

    Args:
        images (Tensor): ``(N, C, H, W)`` model inputs.
        segmenter: a name, a callable ``fn(image (C, H, W)) -> (H, W)``, or precomputed ids ``(N, H, W)``
            (or ``(N, 1, H, W)``).

    Returns:
        LongTensor ``(N, H, W)``; any integer ids (negative, with gaps) become 0, 1, ... in their order.

    Raises:
        MaskShapeError: if the ids do not have the images' batch size and spatial size, or are not integers.
    """
    if isinstance(segmenter, Tensor):
        segments = segmenter[:, 0] if segmenter.ndim == 4 and segmenter.shape[1] == 1 else segmenter
    else:
        function = get_segmenter(segmenter)
        segments = torch.stack([torch.as_tensor(function(image)).to(images.device) for image in images])
    check_segment_ids(segments, (images.shape[0], *images.shape[-2:]))
    return torch.stack([consecutive_ids(ids.long()) for ids in segments])


def segmenter_name(segmenter: SegmenterSpec) -> str:
    """How results name a segmenter: its ``name``, a function's ``__name__``, or ``"given"`` for ids."""
    if isinstance(segmenter, Tensor):
        return "given"
    return getattr(get_segmenter(segmenter), "name", getattr(segmenter, "__name__", "custom"))
