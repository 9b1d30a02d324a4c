"""Padding (every mode of ``F.pad`` and ``nn.*Pad2d``) and interpolation (nearest, bilinear, bicubic): the mask
is resampled as the values are, and smooth kernels read visible taps only."""

from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedLayerError
from ..masked import Masked, align_rank
from ..primitives import neighbor_pad
from ..registry import builtin_rule
from .common import (
    bind_arguments,
    require_masked,
    spatial_mask,
)

_PAD_MODULES = {
    nn.ZeroPad2d: "constant",
    nn.ConstantPad2d: "constant",
    nn.ReflectionPad2d: "reflect",
    nn.ReplicationPad2d: "replicate",
    nn.CircularPad2d: "circular",
}


def _spatial_image_mask(x: Masked, what: str) -> Tensor:
    """The mask of an image-like activation ``(N, C, H, W)``, expanded to its spatial size."""
    if x.value.ndim != 4 or x.mask.shape[1] != 1:
        raise UnsupportedLayerError(
            f"{what} of a tensor of shape {tuple(x.value.shape)}; only image batches (N, C, H, W)."
        )
    return spatial_mask(x).expand(x.mask.shape[0], 1, *x.value.shape[-2:])


def _padded_index(size: int, before: int, after: int, mode: str, device: torch.device) -> Tensor:
    """For each cell of a dimension padded by ``(before, after)`` (negative: cropped), the input cell whose mask
    it takes: the nearest edge cell for ``constant`` and ``replicate``, the reflected or wrapped one otherwise."""
    index = torch.arange(-before, size + after, device=device)
    if mode == "reflect":
        index = index.abs()
        index = torch.where(index >= size, 2 * (size - 1) - index, index)
    elif mode == "circular":
        index = index % size
    return index.clamp(0, size - 1)


@builtin_rule(F.pad, *_PAD_MODULES)
def pad(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Padding in any mode, of spatial dimensions (image height and width, or the token grid of a channels-last
    ``(B, H, W, C)`` tensor) or of channels: the border takes the values the layer gives it, and the mask of the
    cells it extends.

    For ``reflect``, ``replicate`` and ``circular`` a border cell copies a cell, and takes that cell's mask.
    For ``constant`` (and ``nn.ZeroPad2d``) it holds the constant, and is visible where the edge cell next to it
    is (the mask is replicated): a border next to removed pixels is removed, like them, and a full mask
    reproduces the layer exactly. Negative widths crop the mask alike. Padding channels leaves the mask as it is.
    """
    x = require_masked(x, "padding")
    if isinstance(op, nn.Module):
        widths, mode = tuple(op.padding), _PAD_MODULES[type(op)]
    else:
        bound = bind_arguments(args, kwargs, ("pad", "mode", "value"), {"mode": "constant", "value": None})
        widths, mode = tuple(bound["pad"]), bound["mode"]
    if len(widths) % 2 or len(widths) > 2 * x.value.ndim:
        raise UnsupportedLayerError(f"padding {widths} of a tensor of shape {tuple(x.value.shape)}.")
    mask = align_rank(x.mask, x.value.ndim)
    for pair in range(len(widths) // 2):
        dim, before, after = x.value.ndim - 1 - pair, widths[2 * pair], widths[2 * pair + 1]
        # a mask dimension of size 1 broadcasts, unless the value's is 1 too (a 1x1 map): then it is padded
        if (mask.shape[dim] > 1 or x.value.shape[dim] == 1) and (before or after):
            index = _padded_index(mask.shape[dim], before, after, mode, mask.device)
            mask = mask.index_select(dim, index)
    return Masked(op(x.value, *args, **kwargs), mask)


_SMOOTH_REACH = {"bilinear": 1, "bicubic": 3}
"""Neighbor-padding width of each smooth interpolation: the farthest distance between two of its taps (2 or 4
per dimension), as a convolution's `(k - 1)`."""


def _interpolation_params(op: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    if isinstance(op, nn.Module):
        return dict(
            size=op.size,
            scale_factor=op.scale_factor,
            mode=op.mode,
            align_corners=op.align_corners,
            recompute_scale_factor=getattr(op, "recompute_scale_factor", None),
            antialias=False,
        )
    names = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
    defaults = {
        "size": None,
        "scale_factor": None,
        "mode": "nearest",
        "align_corners": None,
        "recompute_scale_factor": None,
        "antialias": False,
    }
    return bind_arguments(args, kwargs, names, defaults)


@builtin_rule(F.interpolate, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
def interpolate(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Resampling that reads visible cells only (``F.interpolate``, ``nn.Upsample``).

    ``nearest`` and ``nearest-exact`` copy one input cell per output, and the mask is resampled alike (exact).
    ``bilinear`` and ``bicubic`` mix the 2x2 or 4x4 taps around each output, as a convolution mixes its window,
    and follow the convolution rule: the input is neighbor-padded (Algorithm 1) by the taps' span (1 or 3 cells),
    and an output is visible when a tap with a non-zero weight is (for bicubic, any tap of its 4x4
    footprint). A full mask reproduces the layer exactly. Antialiased downsampling, ``area`` and the 1-D/3-D
    modes are refused.
    """
    x = require_masked(x, "interpolation")
    params = _interpolation_params(op, args, kwargs)
    mask = _spatial_image_mask(x, "interpolation")
    resample = dict(
        size=params["size"],
        scale_factor=params["scale_factor"],
        recompute_scale_factor=params["recompute_scale_factor"],
    )
    mode = params["mode"]
    if mode in ("nearest", "nearest-exact"):
        return Masked(op(x.value, *args, **kwargs), F.interpolate(mask, mode=mode, **resample))
    if mode not in _SMOOTH_REACH or params["antialias"]:
        raise UnsupportedLayerError(
            f"interpolation mode {mode!r}{' with antialias' if params['antialias'] else ''}; nearest, bilinear and bicubic are supported."
        )
    padded = neighbor_pad(x.value, mask, _SMOOTH_REACH[mode])
    taps = mask if mode == "bilinear" else F.max_pool2d(mask, 3, 1, 1)  # bicubic: one cell beyond bilinear's taps
    visible = F.interpolate(taps, mode="bilinear", align_corners=params["align_corners"], **resample) > 0
    return Masked(op(padded, *args, **kwargs), visible.to(mask.dtype))
