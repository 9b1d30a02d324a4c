"""Square patches: the paper's 16x16 features, as segment ids and as random masks of kept patches."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _check_patch(patch: int) -> None:
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch size must be an int of at least 1, got {patch!r}.")


def patch_segments(height: int, width: int, patch: int = 16) -> Tensor:
    """Ids of square patches in row-major order, shape ``(1, 1, height, width)`` (border patches may be smaller).

    Examples::

        >>> patch_segments(32, 32, 16)[0, 0, ::16, ::16]
        tensor([[0, 1],
                [2, 3]])
    """
    _check_patch(patch)
    rows, columns = torch.arange(height) // patch, torch.arange(width) // patch
    return (rows[:, None] * (-(-width // patch)) + columns[None, :])[None, None]


def random_patch_masks(
    batch: int,
    height: int,
    width: int,
    patch: int = 16,
    keep: float = 0.5,
    *,
    seed: int = 0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Masks that keep each square patch with probability ``keep``, independently per sample.

    Args:
        batch, height, width (int): the mask's size.
        patch (int): the side of the patches (border patches may be smaller).
        keep (float): probability that a patch is visible.
        seed (int): seed of the draw (ignored when ``generator`` is given).
        generator (torch.Generator, optional): draws from this generator instead.

    Returns:
        Bool tensor ``(batch, 1, height, width)``, True where visible.
    """
    _check_patch(patch)
    generator = generator or torch.Generator().manual_seed(seed)
    grid = torch.rand(batch, 1, -(-height // patch), -(-width // patch), generator=generator) < keep
    return grid.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., :height, :width]
