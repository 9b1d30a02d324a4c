"""The normalisation of model inputs: ImageNet's statistics, and the maps to and from [0, 1] pixels."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalizer(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Callable[[Tensor], Tensor]:
    """``(pixels - mean) / std`` per channel, for pixels ``(N, C, H, W)`` in [0, 1]."""
    if len(mean) != len(std):
        raise ValueError(f"mean and std must have one value per channel, got {len(mean)} and {len(std)}.")
    mean_tensor, std_tensor = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return lambda pixels: (pixels - mean_tensor.to(pixels)) / std_tensor.to(pixels)
