"""The kit for writing masking rules, public (``from captum_layermask.core.rules import require_masked, ...``):
binding an operation's arguments (:func:`bind_arguments`, :func:`layer_parameters`), checking what a rule
supports (:func:`require_masked`, :func:`require_feature_dims`), and filling removed cells without reading them
(:func:`fill_removed`, :func:`lowest_value`, :func:`safe_divide`, :func:`in_batch_slices`). Every built-in rule is
written with these; a rule for your own layer can be too (docs/custom-layers.md).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import UnsupportedLayerError
from ..masked import Masked


def bind_arguments(
    args: Sequence[Any], kwargs: Dict[str, Any], names: Sequence[str], defaults: Dict[str, Any]
) -> Dict[str, Any]:
    """The arguments that follow an operation's input, by parameter name."""
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def layer_parameters(
    op: Any, args: Sequence[Any], kwargs: Dict[str, Any], names: Sequence[str], defaults: Dict[str, Any]
) -> Dict[str, Any]:
    """Hyper-parameters of a layer, read from the module or from the functional call's arguments."""
    if isinstance(op, nn.Module):
        return {name: getattr(op, name) for name in names}
    return bind_arguments(args, kwargs, names, defaults)


def require_masked(x: Any, what: str) -> Masked:
    """``x`` if it is masked (the operation's main input depends on the image); raises otherwise, naming ``what``."""
    if not isinstance(x, Masked):
        raise UnsupportedLayerError(f"{what} whose main input does not depend on the image but whose other inputs do.")
    return x


def normalized_dims(dim: Any, ndim: int) -> List[int]:
    """The dimensions a ``dim`` argument names, non-negative and sorted; all of them for None."""
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, (list, tuple)):
        return sorted(d % ndim for d in dim)
    return [dim % ndim]


def require_feature_dims(x: Masked, dims: Iterable[int], what: str) -> None:
    """Raises :class:`~captum_layermask.UnsupportedLayerError` if an operation (``what``) mixes values along a
    dimension of ``x`` over which the mask varies (a spatial or token dimension): it may mix channels only."""
    for dim in dims:
        if x.mask.shape[dim] != 1:
            raise UnsupportedLayerError(
                f"{what} mixes values along dimension {dim % x.value.ndim} of a tensor of shape "
                f"{tuple(x.value.shape)}, which is spatial; layer masking supports it only over channel dimensions."
            )


def spatial_mask(x: Masked) -> Tensor:
    """The mask with its last two dimensions at the value's size (it may broadcast over them)."""
    mask = x.mask
    if tuple(mask.shape[-2:]) != tuple(x.value.shape[-2:]):
        mask = mask.expand(*mask.shape[:-2], *x.value.shape[-2:])
    return mask


def visible_spatial_sum(value: Tensor, mask: Tensor) -> Optional[Tensor]:
    """``(value * mask).sum((2, 3), keepdim=True)`` for ``value (N, C, H, W)`` and ``mask (N or 1, 1, H, W)`` on
    the CPU, as a batched matrix-vector product that reads ``value`` once and writes no product (the means of
    squeeze-excitation blocks run on the widest activations); ``None`` for other shapes, devices and dtypes, and
    while compiling or exporting."""
    if value.dim() != 4 or mask.dim() != 4 or not value.is_floating_point() or mask.shape[1] != 1:
        return None
    if tuple(mask.shape[2:]) != tuple(value.shape[2:]) or mask.shape[0] not in (1, value.shape[0]):
        return None
    if value.device.type != "cpu" or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return None  # exported and compiled graphs keep one path
    batch, channels = value.shape[:2]
    weights = mask.reshape(mask.shape[0], -1, 1).to(value.dtype)
    return torch.matmul(value.reshape(batch, channels, -1), weights).reshape(batch, channels, 1, 1)


def fill_removed(value: Tensor, mask: Tensor, fill: float) -> Tensor:
    """``value`` in visible cells, ``fill`` (finite) in removed ones, in one pass over ``value``."""
    return torch.addcmul((1 - mask) * fill, value, mask)


_SLICE_BYTES = 16 * 2**20


def in_batch_slices(function: Any, value: Tensor, mask: Tensor) -> Tensor:
    """``function(value, mask)`` applied to slices of the batch and concatenated.

    For operations that make a temporary copy of ``value`` (a fill before pooling): the copy then takes one
    slice's memory (about 16 MiB) instead of the whole batch's, and a fresh multi-megabyte allocation per call is
    what makes such a copy slow on CPU. ``function`` must treat samples independently.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # the batch size stays symbolic
        return function(value, mask)
    per_sample = value[:1].numel() * value.element_size()
    step = max(1, _SLICE_BYTES // max(per_sample, 1))
    if step >= value.shape[0]:
        return function(value, mask)
    masks = mask.split(step) if mask.shape[0] == value.shape[0] else [mask] * math.ceil(value.shape[0] / step)
    return torch.cat([function(part, part_mask) for part, part_mask in zip(value.split(step), masks)])


def lowest_value(value: Tensor) -> float:
    """A finite stand-in for -inf: no finite value is below it, and it stays finite through later layers."""
    return torch.finfo(value.dtype).min


def safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` where the denominator is positive, 0 elsewhere (and no inf in gradients)."""
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, 1), 0)


def as_mask(condition: Tensor, like: Tensor) -> Tensor:
    """A boolean condition as a 0/1 mask in the dtype of ``like``."""
    return condition.to(like.dtype)
