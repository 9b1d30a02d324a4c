"""The value that flows through a layer-masked graph: an activation paired with its mask."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, List

import torch
from torch import Tensor

from .errors import MaskShapeError


@dataclass(frozen=True)
class Masked:
    """An activation and the mask of its visible cells (paper section 3.2: layers act on input-mask pairs).

    ``mask`` has the rank of ``value``; each of its dimensions is either the size of ``value``'s (a spatial
    dimension) or 1 (a channel/feature dimension, or one the mask broadcasts over, such as the batch). It holds
    1 for visible cells and 0 for removed ones. Values of removed cells are unspecified but finite: every rule
    that mixes cells reads only visible ones, through ``value * mask``.
    """

    value: Tensor
    mask: Tensor


def _leaves(tree: Any, found: List[Masked]) -> List[Masked]:
    """Appends every :class:`Masked` in a nested list/tuple/dict argument to ``found``, in order (a loop rather
    than a generator: every rule call runs it on its arguments)."""
    if isinstance(tree, Masked):
        found.append(tree)
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            _leaves(item, found)
    elif isinstance(tree, dict):
        for item in tree.values():
            _leaves(item, found)
    return found


def map_leaves(tree: Any, function: Callable[[Any], Any]) -> Any:
    """Replaces every leaf of a nested list/tuple/dict (a :class:`Masked` is a leaf) by ``function(it)``,
    keeping the structure."""
    if isinstance(tree, (list, tuple)):
        items = [map_leaves(item, function) for item in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    if isinstance(tree, dict):
        items = {key: map_leaves(item, function) for key, item in tree.items()}
        if type(tree) is dict or not all(isinstance(key, str) for key in items):
            return items
        return type(tree)(**items)  # OrderedDict, a Hugging Face ModelOutput: the model's own output type
    return function(tree)


def map_masked(tree: Any, function: Callable[[Masked], Any]) -> Any:
    """Replaces every :class:`Masked` in a nested list/tuple/dict by ``function(it)``, keeping the structure."""
    return map_leaves(tree, lambda leaf: function(leaf) if isinstance(leaf, Masked) else leaf)


def is_masked(tree: Any) -> bool:
    """Whether a (possibly nested) argument holds a :class:`Masked` value."""
    if isinstance(tree, Masked):
        return True
    if isinstance(tree, (list, tuple)):
        return any(map(is_masked, tree))
    if isinstance(tree, dict):
        return any(map(is_masked, tree.values()))
    return False


def unwrap(tree: Any) -> Any:
    """Replaces every :class:`Masked` in a nested argument by its value."""
    return map_masked(tree, lambda masked: masked.value)


def masks_of(tree: Any) -> List[Tensor]:
    """The masks of every :class:`Masked` in a nested argument, in order."""
    return [masked.mask for masked in _leaves(tree, [])]


def align_rank(mask: Tensor, ndim: int) -> Tensor:
    """Prepends size-1 dimensions so that ``mask`` has ``ndim`` dimensions (broadcasting aligns on the right)."""
    if mask.ndim >= ndim:
        return mask
    return mask.reshape((1,) * (ndim - mask.ndim) + tuple(mask.shape))


def intersect(masks: List[Tensor], ndim: int) -> Tensor:
    """Cells visible in every mask: their product (the residual rule of paper section 3.2)."""
    return functools.reduce(torch.mul, [align_rank(mask, ndim) for mask in masks])


def _is_exporting() -> bool:
    """Under ``torch.export`` values are symbolic, so the binary check cannot run (``torch.compile`` runs it)."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def format_mask(mask: Tensor, image: Tensor) -> Tensor:
    """Checks a user's mask against an image and returns it as ``(N or 1, 1, H, W)`` in the image's dtype.

    Args:
        mask (Tensor): shape ``(H, W)``, ``(N, H, W)``, ``(N, 1, H, W)`` or ``(1, 1, H, W)``; bool, or numbers in
            {0, 1}; 1 (True) marks visible pixels.
        image (Tensor): shape ``(N, C, H, W)``.

    Returns:
        Tensor of shape ``(N, 1, H, W)`` or ``(1, 1, H, W)``.

    Raises:
        MaskShapeError: if the shapes do not match or the mask is not binary.
    """
    if not isinstance(mask, Tensor):
        raise MaskShapeError(f"mask must be a torch.Tensor, got {type(mask).__name__}.")
    if image.ndim != 4:
        raise MaskShapeError(
            f"layer masking needs an image batch of shape (N, C, H, W), got shape {tuple(image.shape)}."
        )
    batch, _, height, width = image.shape
    given = tuple(mask.shape)
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if (
        mask.ndim != 4
        or mask.shape[1] != 1
        or tuple(mask.shape[2:]) != (height, width)
        or mask.shape[0] not in (1, batch)
    ):
        raise MaskShapeError(
            f"mask of shape {given} does not fit images of shape {tuple(image.shape)}: use (H, W), "
            f"(N, H, W) or (N, 1, H, W) with H, W = {height}, {width} and N = {batch} or 1 (layer masking "
            "removes whole pixels, so a mask cannot differ across channels)."
        )
    if not mask.dtype.is_floating_point and mask.dtype != torch.bool:
        mask = mask.to(image.dtype)
    if mask.dtype != torch.bool and not _is_exporting():
        if bool(((mask != 0) & (mask != 1)).any()):
            raise MaskShapeError(
                "mask must be binary (1 = visible, 0 = removed); threshold a soft mask first, e.g. mask > 0.5."
            )
    return mask.to(device=image.device, dtype=image.dtype)
