"""Pooling over the visible cells: max pooling never picks a removed cell, average pooling renormalises by the
visible count (section 3.2)."""

from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedLayerError
from ..masked import Masked, align_rank
from ..primitives import all_visible
from ..registry import builtin_rule
from .common import (
    as_mask,
    fill_removed,
    in_batch_slices,
    layer_parameters,
    lowest_value,
    require_masked,
    safe_divide,
    spatial_mask,
    visible_spatial_sum,
)

_MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_MAX_POOL_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}


def _no_indices(params: Dict[str, Any]) -> None:
    if params.get("return_indices"):
        raise UnsupportedLayerError("max pooling with return_indices=True.")


@builtin_rule(nn.MaxPool2d, F.max_pool2d)
def max_pool2d(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """The maximum over the visible cells of each window: a removed cell never wins.

    Removed cells are filled with the lowest finite value in a copy of the input. For a batch of images that copy
    is written channels-last, the layout in which PyTorch's CPU max pooling is vectorised (several times faster
    than on NCHW), and the result comes back in the input's layout; the values are the same either way.
    """
    x = require_masked(x, "max pooling")
    _no_indices(layer_parameters(op, args, kwargs, _MAX_POOL_ARGS, _MAX_POOL_DEFAULTS))
    mask = spatial_mask(x)
    visible = op(mask, *args, **kwargs)  # the layer's own padding (-inf, or timm's "same") never wins
    lowest = lowest_value(x.value)
    pooled = in_batch_slices(
        lambda value, part: op(_filled_for_pooling(value, part, lowest), *args, **kwargs), x.value, mask
    )
    if x.value.is_contiguous():
        pooled = pooled.contiguous()
    return Masked(pooled * visible, visible)


def _filled_for_pooling(value: Tensor, mask: Tensor, fill: float) -> Tensor:
    """``fill_removed``, written channels-last for a batch of images (not under autograd or export, which take
    no ``out=``)."""
    if value.ndim != 4 or torch.compiler.is_compiling() or (torch.is_grad_enabled() and value.requires_grad):
        return fill_removed(value, mask, fill)
    filled = torch.empty_like(value, memory_format=torch.channels_last)
    return torch.where(mask > 0, value, value.new_full((), fill), out=filled)


@builtin_rule(nn.AvgPool2d, F.avg_pool2d)
def avg_pool2d(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """The mean over the visible cells of each window, rescaled like the layer's own border handling.

    ``pool(x * m) * pool(1) / pool(m)``: with a full mask this is the layer itself (``count_include_pad``
    included); removed cells count as the mean of the visible ones, never as zeros (section 3.2, ``h_m``).
    """
    x = require_masked(x, "average pooling")
    mask = spatial_mask(x)
    total = op(x.value * mask, *args, **kwargs)
    visible = op(mask, *args, **kwargs)  # the layer's own border handling (padding, timm's "same") alike
    inside = op(torch.ones_like(mask[:1]), *args, **kwargs)
    return Masked(total * safe_divide(inside, visible), as_mask(visible > 0, mask))


@builtin_rule(nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d)
def adaptive_avg_pool2d(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """:math:`h(\\mathbf{x} \\odot \\mathbf{m}) / h(\\mathbf{m})` (section 3.2); 0 where a window sees nothing."""
    x = require_masked(x, "adaptive average pooling")
    output_size = layer_parameters(op, args, kwargs, ("output_size",), {})["output_size"]
    mask = spatial_mask(x)
    visible = F.adaptive_avg_pool2d(mask, output_size)
    if all_visible(mask):  # the layer itself, to the bit
        return Masked(op(x.value, *args, **kwargs), visible)
    total = visible_spatial_sum(x.value, mask) if visible.shape[-2:] == (1, 1) else None
    if total is None:
        total = op(x.value * mask, *args, **kwargs)
    else:  # global pooling: the sum over the visible cells, and their number
        visible = mask.sum((-2, -1), keepdim=True)
    return Masked(safe_divide(total, visible), as_mask(visible > 0, mask))


@builtin_rule(nn.AdaptiveAvgPool1d, F.adaptive_avg_pool1d)
def adaptive_avg_pool1d(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Over the last dimension (tokens ``(N, C, L)``, as Swin's and FocalNet's poolers take them):
    :math:`h(\\mathbf{x} \\odot \\mathbf{m}) / h(\\mathbf{m})`, the mean of the visible tokens of each window;
    0 where a window sees nothing."""
    x = require_masked(x, "adaptive average pooling")
    output_size = layer_parameters(op, args, kwargs, ("output_size",), {})["output_size"]
    mask = align_rank(x.mask, x.value.ndim).to(x.value.dtype)
    mask = mask.expand(*mask.shape[:-1], x.value.shape[-1])
    total = op(x.value * mask, *args, **kwargs)
    visible = F.adaptive_avg_pool1d(mask.reshape(-1, 1, mask.shape[-1]), output_size).reshape(*mask.shape[:-1], -1)
    return Masked(safe_divide(total, visible), as_mask(visible > 0, mask))


@builtin_rule(nn.AdaptiveMaxPool2d, F.adaptive_max_pool2d)
def adaptive_max_pool2d(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """The maximum over the visible cells of each window; 0 where a window sees nothing."""
    x = require_masked(x, "adaptive max pooling")
    params = layer_parameters(op, args, kwargs, ("output_size", "return_indices"), {"return_indices": False})
    _no_indices(params)
    mask = spatial_mask(x)
    lowest = lowest_value(x.value)
    pooled = in_batch_slices(lambda value, part: op(fill_removed(value, part, lowest), *args, **kwargs), x.value, mask)
    visible = F.adaptive_max_pool2d(mask, params["output_size"])
    return Masked(pooled * visible, visible)
