"""Normalizations: batch norm (running statistics, per cell), layer norm over channels, group and instance norm
over the visible cells of each group, ``F.normalize``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedLayerError
from ..masked import Masked
from ..registry import builtin_rule
from .common import (
    bind_arguments,
    layer_parameters,
    require_feature_dims,
    require_masked,
    safe_divide,
)
from .pointwise import pointwise


@builtin_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, F.batch_norm, per_cell="intersection")
def batch_norm(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Batch normalization with running statistics: a per-channel affine map, so pointwise."""
    x = require_masked(x, "batch normalization")
    if isinstance(op, nn.Module):
        batch_statistics = op.training or op.running_mean is None
    else:
        batch_statistics = bind_arguments(
            args, kwargs, ("running_mean", "running_var", "weight", "bias", "training"), {"training": False}
        )["training"]
    if batch_statistics:
        raise UnsupportedLayerError(
            "batch normalization in training mode averages over removed pixels; call .eval() on the model."
        )
    require_feature_dims(x, [1], "batch normalization")
    return pointwise(op, x, *args, **kwargs)


@builtin_rule(nn.LayerNorm, F.layer_norm, nn.RMSNorm, F.rms_norm)
def layer_norm(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Layer and RMS normalization over channel dimensions only (ConvNeXt's channels-last blocks, a transformer's
    tokens): each cell is normalized by its own channels, so it is pointwise over positions."""
    x = require_masked(x, "layer normalization")
    shape = layer_parameters(op, args, kwargs, ("normalized_shape",), {})["normalized_shape"]
    count = 1 if isinstance(shape, int) else len(shape)
    require_feature_dims(x, range(-count, 0), "layer normalization")
    return pointwise(op, x, *args, **kwargs)


def _masked_group_norm(x: Masked, groups: int, weight: Any, bias: Any, eps: float) -> Masked:
    """Group normalization with the mean and variance of each group taken over its visible cells only."""
    value, mask = x.value, x.mask
    batch, channels = value.shape[:2]
    grouped = value.reshape(batch, groups, -1)
    visible = mask.expand(batch, channels // groups, *value.shape[2:]).reshape(batch, 1, -1).expand_as(grouped)
    count = visible.sum(-1, keepdim=True)
    mean = safe_divide((grouped * visible).sum(-1, keepdim=True), count)
    variance = safe_divide((((grouped - mean) * visible) ** 2).sum(-1, keepdim=True), count)
    normalized = ((grouped - mean) / torch.sqrt(variance + eps)).reshape(value.shape)
    shape = (1, channels) + (1,) * (value.ndim - 2)
    if weight is not None:
        normalized = normalized * weight.reshape(shape)
    if bias is not None:
        normalized = normalized + bias.reshape(shape)
    return Masked(normalized, mask)


@builtin_rule(nn.GroupNorm, F.group_norm, nn.InstanceNorm2d, F.instance_norm)
def group_norm(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Group and instance normalization: statistics over the visible cells of each sample only.

    Running statistics (an instance norm with ``track_running_stats`` in eval mode) make it per-cell instead.
    """
    x = require_masked(x, "group normalization")
    require_feature_dims(x, [1], "group normalization")
    if isinstance(op, nn.GroupNorm):
        return _masked_group_norm(x, op.num_groups, op.weight, op.bias, op.eps)
    if isinstance(op, nn.InstanceNorm2d):
        if op.track_running_stats and not op.training:
            return pointwise(op, x)
        return _masked_group_norm(x, x.value.shape[1], op.weight, op.bias, op.eps)
    if op is F.group_norm:
        bound = bind_arguments(
            args, kwargs, ("num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5}
        )
        return _masked_group_norm(x, bound["num_groups"], bound["weight"], bound["bias"], bound["eps"])
    bound = bind_arguments(
        args,
        kwargs,
        ("running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps"),
        {"running_mean": None, "running_var": None, "weight": None, "bias": None, "use_input_stats": True, "eps": 1e-5},
    )
    if not bound["use_input_stats"]:
        return pointwise(op, x, *args, **kwargs)
    return _masked_group_norm(x, x.value.shape[1], bound["weight"], bound["bias"], bound["eps"])


@builtin_rule(F.normalize)
def normalize(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """``x / max(||x||_p, eps)`` along ``dim``: per cell over channels (cosine attention's q and k); over a
    token dimension (XCiT's cross-covariance attention), the norm of the visible tokens only."""
    x = require_masked(x, "normalize")
    bound = bind_arguments(args, kwargs, ("p", "dim", "eps"), {"p": 2.0, "dim": 1, "eps": 1e-12})
    dim = bound["dim"] % x.value.ndim
    if x.mask.shape[dim] == 1:
        return pointwise(op, x, *args, **kwargs)
    visible = x.value * x.mask
    norm = torch.linalg.vector_norm(visible, ord=bound["p"], dim=dim, keepdim=True)
    return Masked(visible / norm.clamp_min(bound["eps"]), x.mask)
