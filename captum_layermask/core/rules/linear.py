"""Layers that mix channel dimensions only: ``nn.Linear`` and a 1-D convolution across channels (ECA)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn

from ..masked import Masked
from ..registry import builtin_rule
from .common import (
    require_feature_dims,
    require_masked,
)
from .pointwise import pointwise


@builtin_rule(nn.Linear, F.linear)
def linear(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """A linear layer mixes its last dimension, which must be a channel dimension."""
    x = require_masked(x, "a linear layer")
    require_feature_dims(x, [-1], "a linear layer")
    return pointwise(op, x, *args, **kwargs)


@builtin_rule(nn.Conv1d, F.conv1d)
def channel_conv1d(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """A 1-D convolution once the spatial part has ended: over a pooled descriptor, along channels (ECA's
    attention). Every dimension it reads has mask size 1, so it sees only features of visible cells."""
    x = require_masked(x, "a 1-D convolution")
    require_feature_dims(x, range(1, x.value.ndim), "a 1-D convolution")
    return pointwise(op, x, *args, **kwargs)
