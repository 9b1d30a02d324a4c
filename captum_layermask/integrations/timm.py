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

import importlib
import types
from typing import Any, Tuple

import torch
import torch.nn.functional as F
from timm.layers import (
    Attention,
    BatchNormAct2d,
    CondConv2d,
    Conv2dSame,
    DropPath,
    FrozenBatchNormAct2d,
    GluMlp,
    LayerScale,
    Mlp,
    SwiGLU,
    SyncBatchNormAct,
)
from timm.layers._fx import get_notrace_functions, get_notrace_modules
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from timm.layers.padding import pad_same_arg
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
from timm.layers.std_conv import ScaledStdConv2dSame, StdConv2dSame
from timm.models.nfnet import NormFreeBlock
from timm.models.vgg import ConvMlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..core.errors import UnsupportedLayerError
from ..core.gathering import register_token_block
from ..core.masked import Masked, is_masked, unwrap
from ..core.primitives import pad_for_convolution
from ..core.registry import RuleRegistry, builtin_rule, register_leaf
from ..core.rules import avg_pool2d, bind_arguments, max_pool2d, pointwise, require_feature_dims, require_masked

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
    require_feature_dims(x, [1], "a convolution")
    padding = _same_padding(op, tuple(x.value.shape[-2:])) if _is_dynamic(op) else op.padding
    geometry = (op.kernel_size, op.stride, padding, op.dilation, getattr(op, "padding_mode", "zeros"))
    # without autograd the rings may be written into the activation itself, as in the core convolution rule
    return pad_for_convolution(x.value, x.mask, *geometry, overwrite=not torch.is_grad_enabled())


@builtin_rule(Conv2dSame, StdConv2dSame, ScaledStdConv2dSame)
def same_padded_conv2d(op: nn.Module, x: Any) -> Masked:
    """A convolution with TensorFlow's "same" padding, computed from the input size at run time (the ``tf_*``
    ports): the convolution rule with that asymmetric zero padding. The visible region is neighbor-padded
    (Algorithm 1) and the layer pads the image border with zeros, as ``nn.Conv2d`` does."""
    padded, mask = _convolution_mask(op, require_masked(x, "a convolution"))
    return Masked(op(padded), mask)


@builtin_rule(CondConv2d)
def conditional_conv2d(op: CondConv2d, x: Any, routing_weights: Any) -> Masked:
    """CondConv: a convolution whose kernel mixes experts by per-sample routing weights (computed from a pooled,
    hence visible-only, summary of the image). The input is neighbor-padded as for any convolution; an output
    is visible where its window sees a visible cell and the sample's routing weights are visible."""
    x = require_masked(x, "a conditional convolution")
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
    x = require_masked(x, "VGG's ConvMlp")
    height, width = x.value.shape[-2:]
    if height < op.input_kernel_size or width < op.input_kernel_size:
        size = (max(op.input_kernel_size, height), max(op.input_kernel_size, width))
        x = rules.apply(F.adaptive_avg_pool2d, x, size)
    for part in (op.fc1, op.act1, op.drop, op.fc2, op.act2):
        x = rules.apply(part, x)
    return x


REARRANGEMENTS = (
    "timm.models.swin_transformer.window_reverse",
    "timm.models.swin_transformer_v2.window_reverse",
    "timm.models.swin_transformer_v2_cr.window_reverse",
    "timm.models.gcvit.window_reverse",
    "timm.models.davit.window_reverse",
    "timm.models.maxxvit.window_reverse",
    "timm.models.maxxvit.window_reverse_nchw",
    "timm.models.maxxvit.grid_reverse",
    "timm.models.maxxvit.grid_reverse_nchw",
    "timm.models.nest.deblockify",
)
"""timm's leaf functions that only move values (windows back into a feature map), whatever their channels."""


def _resolve(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def rearrangement(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """A function that only moves cells (Swin's ``window_reverse``): applied to the mask as to the value.

    The mask's batch is expanded first (windows are the batch of window attention); its channel dimension
    stays size 1, since these functions read the channel count from their input.
    """
    x = require_masked(x, "a rearrangement")
    if is_masked((args, kwargs)):
        raise UnsupportedLayerError(f"{getattr(op, '__name__', op)} with image-dependent arguments besides its input.")
    value = op(x.value, *args, **kwargs)
    mask = op(x.mask.expand(x.value.shape[0], *x.mask.shape[1:]), *args, **kwargs)
    if mask.ndim != value.ndim or any(m not in (1, v) for m, v in zip(mask.shape, value.shape)):
        raise UnsupportedLayerError(f"{getattr(op, '__name__', op)} does not move the mask as it moves values.")
    return Masked(value, mask)


builtin_rule(*[_resolve(path) for path in REARRANGEMENTS])(rearrangement)


builtin_rule(maybe_add_mask, per_cell="intersection")(pointwise)  # scores + an optional additive attention mask


@builtin_rule(resolve_self_attn_mask)
def self_attention_bias(op: Any, seq_len: int, scores: Any, *args: Any, **kwargs: Any) -> Any:
    """The additive attention mask timm builds from the model's own mask: it reads only the scores' dtype and
    device, never the image. Causal attention is refused, as for ``F.scaled_dot_product_attention``."""
    if bind_arguments(args, kwargs, ("attn_mask", "is_causal"), {"attn_mask": None, "is_causal": False})["is_causal"]:
        raise UnsupportedLayerError("causal attention (is_causal=True), which vision classifiers do not use.")
    if is_masked((args, kwargs)):
        raise UnsupportedLayerError("attention whose attn_mask depends on the image.")
    return op(seq_len, unwrap(scores), *args, **kwargs)


def _is_plain_vit_block(block: nn.Module) -> bool:
    """timm's ViT ``Block`` with its default parts: ``Attention`` (no rotary or relative position terms), a
    token-wise MLP, norms, layer scale and drop path; other attention layers may read positions."""
    token_wise = (Mlp, GluMlp, SwiGLU, nn.LayerNorm, nn.Identity, LayerScale, DropPath)
    parts = [block.norm1, block.ls1, block.drop_path1, block.norm2, block.mlp, block.ls2, block.drop_path2]
    return type(block.attn) is Attention and all(isinstance(part, token_wise) for part in parts)


register_token_block(Block, when=_is_plain_vit_block)


def _register_leaves() -> None:
    modules = [module for module in get_notrace_modules() if module not in TRACED_INTO]
    functions = [function for function in get_notrace_functions() if isinstance(function, types.FunctionType)]
    for leaf in (*modules, *functions):
        register_leaf(leaf)


_register_leaves()

__all__ = [
    "TRACED_INTO",
    "conditional_conv2d",
    "rearrangement",
    "same_padded_conv2d",
    "self_attention_bias",
    "vgg_conv_mlp",
]
