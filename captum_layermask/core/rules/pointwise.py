r"""Operations that act on each cell separately: :math:`g(\mathbf{x})` on every cell, the mask unchanged (section
3.2 with :math:`k = 1`), and dropout (the identity in eval mode)."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedLayerError
from ..masked import Masked, align_rank, intersect, is_masked, masks_of, unwrap
from ..registry import builtin_rule
from .common import (
    bind_arguments,
)

# ---------------------------------------------------------------------------------------------------------------
# operations that act on each cell separately: g(x) on the visible cells, masks unchanged (section 3.2, k = 1)

_POINTWISE_MODULES = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.Threshold,
    nn.Hardshrink,
    nn.Softshrink,
)
_POINTWISE_FUNCTIONS = (
    F.relu,
    F.relu_,
    F.relu6,
    F.leaky_relu,
    F.prelu,
    F.rrelu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.softplus,
    F.softsign,
    F.logsigmoid,
    F.tanhshrink,
    F.threshold,
    F.hardshrink,
    F.softshrink,
    F.sigmoid,
    F.tanh,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.exp,
    torch.log,
    torch.sqrt,
    torch.rsqrt,
    torch.abs,
    torch.neg,
    torch.clamp,
    torch.clip,
    torch.pow,
    torch.sub,
    torch.mul,
    torch.addcmul,
    torch.addcdiv,
    torch.div,
    torch.maximum,
    torch.minimum,
    torch.where,
    torch.erf,
    torch.square,
    torch.reciprocal,
    torch.sign,
    torch.sin,
    torch.cos,
    torch.log1p,
    torch.expm1,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.pos,
    operator.pow,
)
# In-place binary methods (add_, mul_, ...) are left out on purpose: they would change a value that other nodes
# still see with its old mask.
_POINTWISE_METHODS = (
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "abs",
    "neg",
    "clamp",
    "clamp_",
    "clip",
    "clip_",
    "pow",
    "sub",
    "mul",
    "div",
    "addcmul",
    "addcdiv",
    "add_",
    "sub_",
    "mul_",
    "div_",
    "maximum",
    "minimum",
    "erf",
    "square",
    "reciprocal",
    "sign",
    "sin",
    "cos",
    "log1p",
    "expm1",
    "square_",
    "sqrt_",
    "exp_",
    "contiguous",
    "clone",
    "detach",
    "to",
    "float",
    "double",
    "half",
    "bfloat16",
    "type",
    "type_as",
)


# Additions (operator.add, torch.add, Tensor.add) are residual sums: the composite gives them the rule that
# layer_masked(residual=...) selects (captum_layermask.core.composite).
@builtin_rule(*_POINTWISE_MODULES, *_POINTWISE_FUNCTIONS, *_POINTWISE_METHODS, per_cell="intersection")
def pointwise(op: Any, *args: Any, **kwargs: Any) -> Masked:
    """An operation applied to each cell separately: its result is visible where all its inputs are.

    This is :math:`g_m(\\mathbf{x}, \\mathbf{m}) = (g(\\mathbf{x}), \\mathbf{m})` of section 3.2 (removed cells keep
    unspecified values instead of being multiplied by 0), and for two inputs the residual rule: the mask of
    ``x1 + x2`` is ``m1 * m2``.
    """
    if args and type(args[0]) is Masked and not is_masked((args[1:], kwargs)):  # one masked input: most calls
        value = op(args[0].value, *args[1:], **kwargs)
        return Masked(value, align_rank(args[0].mask, value.ndim))
    value = op(*unwrap(args), **unwrap(kwargs))
    return Masked(value, intersect(masks_of((args, kwargs)), value.ndim))


_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)


@builtin_rule(*_DROPOUT_MODULES, *_DROPOUT_FUNCTIONS, per_cell="intersection")
def dropout(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Dropout: the identity in eval mode. In training mode it would make every explanation random, so it is
    refused, as batch normalization is."""
    active = (
        op.training
        if isinstance(op, nn.Module)
        else bind_arguments(args, kwargs, ("p", "training"), {"training": True})["training"]
    )
    if active:
        raise UnsupportedLayerError("dropout in training mode makes the output random; call .eval() on the model.")
    return pointwise(op, x, *args, **kwargs)
