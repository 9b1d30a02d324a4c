"""Procedural scenes with known object masks: the offline data of the demo model and its evaluation.

Six shape classes, each a filled outline with a random colour and stripe texture, placed at a random position,
size and rotation on a smooth random background. Every image comes with the exact mask of its object(s), so
that explanations can be scored against ground truth. Nothing in the data favours one masking method: colours
(including grey and near-black), sizes and positions are uniform over wide ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

CLASSES = ("disk", "square", "triangle", "star", "cross", "ring")
SIZE = 128
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


@dataclass
class Scenes:
    """A batch of scenes.

    Attributes:
        images: ``(N, 3, H, W)`` in [0, 1].
        labels: ``(N, K)`` class of each of the K objects (the first is the label of single-object scenes).
        object_masks: ``(N, K, H, W)`` bool, the pixels of each object.
    """

    images: Tensor
    labels: Tensor
    object_masks: Tensor


def _shape_masks(u: Tensor, v: Tensor) -> Tensor:
    """Each class's shape in local coordinates (unit scale): ``(len(CLASSES), ...)`` bool."""
    r, theta = torch.sqrt(u**2 + v**2), torch.atan2(v, u)
    return torch.stack(
        [
            r < 0.95,
            torch.maximum(u.abs(), v.abs()) < 0.8,
            (v > -0.55) & (math.sqrt(3) * u.abs() + v < 0.95),
            r < 0.6 + 0.38 * torch.cos(5 * theta),
            ((u.abs() < 0.3) & (v.abs() < 0.95)) | ((v.abs() < 0.3) & (u.abs() < 0.95)),
            (r < 0.95) & (r > 0.55),
        ]
    )


def _smooth_field(n: int, channels: int, generator: torch.Generator, grid: int = 4) -> Tensor:
    coarse = torch.rand(n, channels, grid, grid, generator=generator)
    return F.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=False).clamp(0, 1)


def _objects(
    n: int, generator: torch.Generator, labels: Tensor, centers: Tensor, scales: Tensor
) -> tuple[Tensor, Tensor]:
    """Object masks and textured colours for given classes, centres (pixels) and scales (pixels)."""
    coordinates = torch.arange(SIZE, dtype=torch.float32)
    y, x = torch.meshgrid(coordinates, coordinates, indexing="ij")
    angle = torch.rand(n, 1, 1, generator=generator) * 2 * math.pi
    dx, dy = (
        (x - centers[:, 0, None, None]) / scales[:, None, None],
        (y - centers[:, 1, None, None]) / scales[:, None, None],
    )
    u, v = dx * torch.cos(angle) + dy * torch.sin(angle), -dx * torch.sin(angle) + dy * torch.cos(angle)
    masks = _shape_masks(u, v)[labels, torch.arange(n)]
    colour = torch.rand(n, 3, 1, 1, generator=generator)
    frequency = 0.2 + 0.6 * torch.rand(n, 1, 1, 1, generator=generator)
    stripes = torch.sin(
        frequency * (u * torch.cos(angle) + v * torch.sin(angle))[:, None] * scales[:, None, None, None]
    )
    texture = (colour + 0.15 * torch.rand(n, 1, 1, 1, generator=generator) * stripes).clamp(0, 1)
    return masks, texture


def render(n: int, generator: torch.Generator, objects: int = 1, labels: Optional[Tensor] = None) -> Scenes:
    """Renders ``n`` scenes of ``objects`` non-overlapping objects (distinct classes when there are several).

    Args:
        n: number of scenes.
        generator: the random source (seed it for reproducible data).
        objects: 1 or 2 objects per scene.
        labels: optional ``(n, objects)`` classes; random otherwise.
    """
    if labels is None:
        labels = torch.stack([torch.randperm(len(CLASSES), generator=generator)[:objects] for _ in range(n)])
    images = 0.15 + 0.7 * _smooth_field(n, 3, generator)
    images = images + 0.03 * torch.randn(n, 3, SIZE, SIZE, generator=generator)
    all_masks = []
    for k in range(objects):
        scale = (
            (14 + 14 * torch.rand(n, generator=generator))
            if objects == 1
            else (12 + 8 * torch.rand(n, generator=generator))
        )
        if objects == 1:
            center = scale[:, None] + (SIZE - 2 * scale[:, None]) * torch.rand(n, 2, generator=generator)
        else:  # left and right halves
            x = (SIZE / 2) * k + scale + (SIZE / 2 - 2 * scale) * torch.rand(n, generator=generator)
            y = scale + (SIZE - 2 * scale) * torch.rand(n, generator=generator)
            center = torch.stack([x, y], 1)
        masks, texture = _objects(n, generator, labels[:, k], center, scale)
        images = torch.where(masks[:, None], texture, images)
        all_masks.append(masks)
    return Scenes(images.clamp(0, 1), labels, torch.stack(all_masks, 1))


def normalize(images: Tensor) -> Tensor:
    """The demo model's input normalisation (grey 0.5 maps to 0)."""
    return (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def pixel_labels(scenes: Scenes) -> Tensor:
    """``(N, H, W)`` class of every pixel: 0 for the background, ``label + 1`` on an object."""
    labels = torch.zeros(scenes.object_masks[:, 0].shape, dtype=torch.long)
    for k in range(scenes.object_masks.shape[1]):
        labels = torch.where(scenes.object_masks[:, k], scenes.labels[:, k, None, None] + 1, labels)
    return labels


def segmentation_scenes(n: int, generator: torch.Generator) -> Scenes:
    """Half of the scenes with one object, half with two."""
    one, two = render(n - n // 2, generator), render(n // 2, generator, objects=2)
    masks = torch.cat([F.pad(one.object_masks, (0, 0, 0, 0, 0, 1)), two.object_masks])
    labels = torch.cat([torch.cat([one.labels, one.labels], 1), two.labels])
    return Scenes(torch.cat([one.images, two.images]), labels, masks)


def detection_targets(scenes: Scenes) -> List[Dict[str, Tensor]]:
    """Each scene's objects as torchvision detection targets: ``boxes`` ``(K, 4)`` enclosing each object's pixels
    (``x1, y1, x2, y2``, pixel edges) and ``labels`` ``(K,)``, ``label + 1`` (0 is the background)."""
    targets = []
    for masks, labels in zip(scenes.object_masks, scenes.labels):
        present = masks.flatten(1).any(1)
        boxes = [_enclosing_box(mask) for mask in masks[present]]
        targets.append(
            {
                "boxes": torch.stack(boxes) if boxes else torch.zeros(0, 4),
                "labels": labels[present] + 1,
            }
        )
    return targets


def _enclosing_box(mask: Tensor) -> Tensor:
    rows, columns = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    return torch.tensor([columns[0], rows[0], columns[-1] + 1, rows[-1] + 1], dtype=torch.float32)
