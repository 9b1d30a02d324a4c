"""timm's layers under layer masking: its ``torch.fx`` leaves, and rules for those that compute on the image.

Imported the first time a model with a timm submodule is converted (``captum_layermask`` registers it with
:func:`~captum_layermask.register_rule_set`); never for other models. timm marks the helpers that ``torch.fx``
cannot trace (run-time "same" padding, size checks) in ``timm.layers._fx``; its own feature extraction traces
with them as leaves, and so does :func:`~captum_layermask.layer_masked`. The rules below give those leaves the
meaning layer masking needs (docs/layer-rules.md, "timm").

Some of timm's leaves are plain in eval mode, and are traced into so that each part gets its own rule:
``BatchNormAct2d`` and its frozen and synchronised variants (a batch norm, a dropout and an activation, with
Python branches on the training flag only) and nfnet's ``NormFreeBlock`` (branches on which submodules exist).
"""

from __future__ import annotations

import types
from typing import Any, Tuple

import torch.nn.functional as F
from timm.layers import BatchNormAct2d, CondConv2d, Conv2dSame, FrozenBatchNormAct2d, SyncBatchNormAct
from timm.layers._fx import get_notrace_functions, get_notrace_modules
from timm.layers.padding import pad_same_arg
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
from timm.layers.std_conv import ScaledStdConv2dSame, StdConv2dSame
from timm.models.nfnet import NormFreeBlock
from timm.models.vgg import ConvMlp
from torch import Tensor, nn

from ..core.masked import Masked
from ..core.masking import pad_for_convolution
from ..core.registry import RuleRegistry, builtin_rule, register_leaf
from ..core.rules import _require_feature_dims, _require_masked, avg_pool2d, max_pool2d

TRACED_INTO = (BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct, NormFreeBlock)
"""timm leaves whose forward is traceable in eval mode: traced into instead of kept whole."""


def _same_padding(op: nn.Module, size: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """The ``(left, right, top, bottom)`` padding that timm's ``pad_same`` gives an input of spatial ``size``."""
    dilation = getattr(op, "dilation", (1, 1))
    return tuple(pad_same_arg(list(size), list(op.kernel_size), list(op.stride), list(dilation)))  # type: ignore


def _is_dynamic(op: nn.Module) -> bool:
    return isinstance(op, Conv2dSame) or bool(getattr(op, "same_pad", False) or getattr(op, "dynamic_padding", False))


def _convolution_mask(op: nn.Module, x: Masked) -> Tuple[Tensor, Tensor]:
    """The neighbor-padded input of a (possibly "same"-padded) convolution module and its output mask."""
    _require_feature_dims(x, [1], "a convolution")
    padding = _same_padding(op, tuple(x.value.shape[-2:])) if _is_dynamic(op) else op.padding
    return pad_for_convolution(
        x.value, x.mask, op.kernel_size, op.stride, padding, op.dilation, getattr(op, "padding_mode", "zeros")
    )


@builtin_rule(Conv2dSame, StdConv2dSame, ScaledStdConv2dSame)
def same_padded_conv2d(op: nn.Module, x: Any) -> Masked:
    """A convolution with TensorFlow's "same" padding, computed from the input size at run time (the ``tf_*``
    ports): the convolution rule with that asymmetric zero padding. The visible region is neighbor-padded
    (Algorithm 1) and the layer pads the image border with zeros, as ``nn.Conv2d`` does."""
    padded, mask = _convolution_mask(op, _require_masked(x, "a convolution"))
    return Masked(op(padded), mask)


@builtin_rule(CondConv2d)
def conditional_conv2d(op: CondConv2d, x: Any, routing_weights: Any) -> Masked:
    """CondConv: a convolution whose kernel mixes experts by per-sample routing weights (computed from a pooled,
    hence visible-only, summary of the image). The input is neighbor-padded as for any convolution; an output
    is visible where its window sees a visible cell and the sample's routing weights are visible."""
    x = _require_masked(x, "a conditional convolution")
    padded, mask = _convolution_mask(op, x)
    if not isinstance(routing_weights, Masked):
        return Masked(op(padded, routing_weights), mask)
    routing_mask = routing_weights.mask.amax(tuple(range(1, routing_weights.mask.ndim)))
    return Masked(op(padded, routing_weights.value), mask * routing_mask.reshape(-1, 1, 1, 1))


# "Same"-padded pooling: the core rules apply the layer itself to the mask too, its run-time padding included.
builtin_rule(MaxPool2dSame)(max_pool2d)
builtin_rule(AvgPool2dSame)(avg_pool2d)


@builtin_rule(ConvMlp)
def vgg_conv_mlp(op: ConvMlp, x: Any, *, rules: RuleRegistry) -> Masked:
    """timm's VGG head: two convolutions (the classifier's fully connected layers) with activations, after
    enlarging an input smaller than the first kernel by adaptive average pooling. Each part takes its own rule."""
    x = _require_masked(x, "VGG's ConvMlp")
    height, width = x.value.shape[-2:]
    if height < op.input_kernel_size or width < op.input_kernel_size:
        size = (max(op.input_kernel_size, height), max(op.input_kernel_size, width))
        x = rules.apply(F.adaptive_avg_pool2d, x, size)
    for part in (op.fc1, op.act1, op.drop, op.fc2, op.act2):
        x = rules.apply(part, x)
    return x


def _register_leaves() -> None:
    modules = [module for module in get_notrace_modules() if module not in TRACED_INTO]
    functions = [function for function in get_notrace_functions() if isinstance(function, types.FunctionType)]
    register_leaf(*modules, *functions)


_register_leaves()

__all__ = [
    "TRACED_INTO",
    "conditional_conv2d",
    "same_padded_conv2d",
    "vgg_conv_mlp",
]
