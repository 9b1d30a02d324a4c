"""Shared pieces of the evaluation functions: input checks, predictions in batches, class entropy."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..core.errors import MaskShapeError
from ._batching import batches


def check_images(images: Any) -> None:
    """Raises :class:`MaskShapeError` unless ``images`` is a non-empty batch of model inputs ``(N, C, H, W)``."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise MaskShapeError(
            f"images must be a tensor (N, C, H, W), got {getattr(images, 'shape', type(images).__name__)}."
        )
    if len(images) == 0 or images.shape[-1] == 0 or images.shape[-2] == 0:
        raise MaskShapeError(
            f"images must hold at least one image of at least one pixel, got shape {tuple(images.shape)}."
        )


def check_object_masks(object_masks: Any, expected: tuple) -> None:
    """Raises :class:`MaskShapeError` unless ``object_masks`` has shape ``expected``, i.e. ``(N, H, W)``."""
    shape = tuple(getattr(object_masks, "shape", ()))
    if not isinstance(object_masks, Tensor) or shape != expected:
        raise MaskShapeError(
            f"object masks must have shape {expected} (True on the object), got {shape or type(object_masks).__name__}."
        )


def check_inputs(images: Tensor, labels: Tensor, object_masks: Optional[Tensor] = None) -> None:
    """:func:`check_images`, then labels ``(N,)`` and object masks ``(N, H, W)`` that fit the images."""
    check_images(images)
    if tuple(torch.as_tensor(labels).shape) != (len(images),):
        raise MaskShapeError(
            f"labels must have shape ({len(images)},), one class index per image, got {tuple(torch.as_tensor(labels).shape)}."
        )
    if object_masks is not None:
        check_object_masks(object_masks, (len(images), *images.shape[-2:]))


def check_positive(value: Any, name: str) -> None:
    """Raises ``ValueError`` unless ``value`` is an int of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int of at least 1, got {value!r}.")


def logits_of(output: Any) -> Tensor:
    """The class scores ``(N, classes)`` of a model's output (the first element of a tuple output)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, Tensor) or output.ndim != 2:
        raise ValueError(
            f"the model must return class scores (N, classes), got {getattr(output, 'shape', type(output).__name__)}."
        )
    return output


def predict(
    forward: Callable[[Tensor, Tensor], Any],
    device: torch.device,
    images: Tensor,
    masks: Callable[[slice], Tensor],
    batch_size: int,
    bar: Any,
) -> Tuple[Tensor, int]:
    """Predicted classes ``(N,)`` of ``images`` under ``masks(part)`` (bool ``(len(part), 1, H, W)``), and the
    number of classes the model scores."""
    out = []
    with torch.no_grad():
        for part in batches(len(images), batch_size, bar):
            logits = logits_of(forward(images[part].to(device), masks(part).to(device)))
            out.append(logits.argmax(1).cpu())
    return torch.cat(out), logits.shape[1]


def clean_predict(
    forward: Callable[[Tensor, Tensor], Any], device: torch.device, images: Tensor, batch_size: int, bar: Any
) -> Tuple[Tensor, int]:
    """:func:`predict` with nothing removed."""
    full = torch.ones(1, 1, *images.shape[-2:], dtype=torch.bool)
    return predict(
        forward, device, images, lambda part: full.expand(part.stop - part.start, -1, -1, -1), batch_size, bar
    )


def class_entropy(predictions: Tensor, num_classes: int) -> float:
    """Entropy (nats) of the distribution of predicted classes over a dataset, ``p(y) = E_x 1[f(x) = y]``."""
    p = torch.bincount(predictions, minlength=num_classes).double() / len(predictions)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


ResultRow = Dict[str, object]
"""One flat result of an evaluation: ``section, segmenter, order, masker, metric, value`` (a CSV row)."""


def result_row(section: str, masker: str, metric: str, value: float, segmenter: str = "", order: str = "") -> ResultRow:
    """A :data:`ResultRow`, its fields in the CSV's column order."""
    return dict(section=section, segmenter=segmenter, order=order, masker=masker, metric=metric, value=value)
