r"""Convolutions: :math:`g_k(\mathrm{Pad}_k(\mathbf{x}, \mathbf{m}))` with the mask max-pooled by the same kernel
(section 3.2, Algorithm 1), with neighbor padding, zero padding or partial convolution's rescaling; and
transposed convolutions, the same rule read backwards."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedLayerError
from ..masked import Masked, masks_of
from ..primitives import _pair, neighbor_pad, pad_for_convolution, propagate_mask
from ..registry import builtin_rule
from .common import (
    bind_arguments,
    require_feature_dims,
    require_masked,
    safe_divide,
)

_CONV_ARGS = ("weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _conv_geometry(op: Any, x: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    x = require_masked(x, "a convolution")
    if masks_of((args, kwargs)):
        raise UnsupportedLayerError("a convolution whose weights depend on the image.")
    require_feature_dims(x, [1], "a convolution")
    if isinstance(op, nn.Module):
        return dict(
            kernel_size=op.kernel_size,
            stride=op.stride,
            padding=op.padding,
            dilation=op.dilation,
            padding_mode=op.padding_mode,
        )
    bound = bind_arguments(args, kwargs, _CONV_ARGS, _CONV_DEFAULTS)
    return dict(
        kernel_size=tuple(bound["weight"].shape[-2:]),
        stride=bound["stride"],
        padding=bound["padding"],
        dilation=bound["dilation"],
        padding_mode="zeros",
    )


def conv2d(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Neighbor-pad the input, convolve, max-pool the mask (the paper's layer masking).

    The padding width is the kernel's reach ``(k - 1) * dilation`` rather than the paper's ``k``: cells farther
    away are read only by outputs whose mask is 0, so the visible outputs are the paper's exactly. A 1x1
    convolution therefore runs on the activations as they are, like any per-cell operation.
    """
    return _neighbor_padded_conv(op, x, args, kwargs, rings=None)


def _neighbor_padded_conv(op: Any, x: Any, args: Sequence[Any], kwargs: Dict[str, Any], rings: Optional[int]) -> Masked:
    geometry = _conv_geometry(op, x, args, kwargs)
    # without autograd the rings may be written into the activation itself: rules read visible cells only
    overwrite = not torch.is_grad_enabled()
    padded, mask = pad_for_convolution(x.value, x.mask, **geometry, rings=rings, overwrite=overwrite)
    return Masked(op(padded, *args, **kwargs), mask)


def conv2d_with_rings(rings: int) -> Any:
    """The ``conv2d`` rule padding only ``rings`` rings, for a convolution whose outer kept cells are never read.

    :func:`~captum_layermask.core.demand.padding_rings` finds such convolutions when a model is converted; the
    values of every cell that a later layer reads are those of ``conv2d``.
    """

    def conv2d_with_fewer_rings(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
        return _neighbor_padded_conv(op, x, args, kwargs, rings=rings)

    return conv2d_with_fewer_rings


def conv2d_zero_padding(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Ablation (supplementary section 3): removed cells read as 0 instead of being neighbor-padded."""
    geometry = _conv_geometry(op, x, args, kwargs)
    return Masked(op(neighbor_pad(x.value, x.mask, 0), *args, **kwargs), propagate_mask(x.mask, **geometry))


def conv2d_partial(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Partial convolution (Liu et al. 2018; supplementary section 2): edge outputs scaled up by the hidden share.

    The bias-free response to the zero-filled input is multiplied by (cells of the window inside the image) /
    (visible cells of the window), so that a full mask gives the model's own output, image borders included.
    """
    geometry = _conv_geometry(op, x, args, kwargs)
    if geometry["padding_mode"] != "zeros":
        raise UnsupportedLayerError("partial convolution supports only padding_mode='zeros'.")
    if isinstance(op, nn.Module):
        weight, bias = op.weight, op.bias
        response = op._conv_forward(neighbor_pad(x.value, x.mask, 0), weight, None)
    else:
        bound = bind_arguments(args, kwargs, _CONV_ARGS, _CONV_DEFAULTS)
        weight, bias = bound["weight"], bound["bias"]
        response = F.conv2d(
            neighbor_pad(x.value, x.mask, 0),
            weight,
            None,
            bound["stride"],
            bound["padding"],
            bound["dilation"],
            bound["groups"],
        )
    ones = torch.ones((1, 1, *weight.shape[-2:]), dtype=x.mask.dtype, device=x.mask.device)

    def window_count(mask: Tensor) -> Tensor:
        return F.conv2d(mask, ones, None, geometry["stride"], geometry["padding"], geometry["dilation"])

    scale = safe_divide(window_count(torch.ones_like(x.mask[:1])), window_count(x.mask))
    value = response * scale
    if bias is not None:
        value = value + bias.reshape(1, -1, 1, 1)
    return Masked(value, propagate_mask(x.mask, **geometry))


_CONV_TRANSPOSE_ARGS = ("weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONV_TRANSPOSE_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}


@builtin_rule(nn.ConvTranspose2d, F.conv_transpose2d)
def conv_transpose2d(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """A transposed convolution (the learned upsampling of U-Nets, FCN-style decoders, BEiT's and DPT's feature
    pyramids): each output cell sums the input cells whose kernel taps land on it.

    The rule of :func:`conv2d` read backwards: an output cell is visible when one of the input cells it sums is
    (the mask transposed-convolved with a kernel of ones, > 0), and the input is neighbor-padded by
    ``floor((k - 1) * dilation / stride)`` rings, the largest distance between two input cells that one output
    sums, so that a visible output reads the fill of the visible cells and nothing of the removed pixels. A
    kernel no larger than its stride (the common 2x2 stride-2 upsampling) sums one input cell per output: no
    padding, and the visible outputs are the layer's own.
    """
    x = require_masked(x, "a transposed convolution")
    if masks_of((args, kwargs)):
        raise UnsupportedLayerError("a transposed convolution whose weights depend on the image.")
    require_feature_dims(x, [1], "a transposed convolution")
    if isinstance(op, nn.Module):
        geometry = dict(
            kernel=op.kernel_size, stride=op.stride, padding=op.padding,
            output_padding=op.output_padding, dilation=op.dilation,
        )  # fmt: skip
    else:
        bound = bind_arguments(args, kwargs, _CONV_TRANSPOSE_ARGS, _CONV_TRANSPOSE_DEFAULTS)
        geometry = dict(
            kernel=tuple(bound["weight"].shape[-2:]), stride=bound["stride"], padding=bound["padding"],
            output_padding=bound["output_padding"], dilation=bound["dilation"],
        )  # fmt: skip
    kernel, stride, dilation = (_pair(geometry[name]) for name in ("kernel", "stride", "dilation"))
    rings = max(((k - 1) * d) // s for k, d, s in zip(kernel, dilation, stride))
    ones = torch.ones((1, 1, *kernel), dtype=x.value.dtype, device=x.value.device)
    reached = F.conv_transpose2d(
        (x.mask > 0).to(x.value.dtype),
        ones,
        None,
        stride,
        geometry["padding"],
        geometry["output_padding"],
        1,
        dilation,
    )
    return Masked(op(neighbor_pad(x.value, x.mask, rings), *args, **kwargs), (reached > 0).to(x.mask.dtype))
