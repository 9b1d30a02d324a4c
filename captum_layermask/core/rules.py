r"""Built-in masking rules (paper section 3.2), one per operation family.

Every rule keeps one invariant: values in removed cells are finite but unspecified, and an operation that
combines values of different cells reads only visible ones (through ``x * m``, the paper's
:math:`\mathbf{x} \odot \mathbf{m}`, which is exact for finite values; removed input pixels are cleared once, by
selection, when the image enters the graph). Operations that act on each cell separately therefore run
unchanged on the whole tensor, which is what makes layer masking cheap: only convolutions with kernels larger
than 1, pooling and reshapes that merge spatial dimensions do extra work.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UnsupportedLayerError
from .masked import Masked, align_rank, intersect, is_masked, masks_of, unwrap
from .masking import neighbor_pad, pad_for_convolution, propagate_mask
from .registry import builtin_rule

# ---------------------------------------------------------------------------------------------------------------
# helpers


def _bind(
    args: Sequence[Any], kwargs: Dict[str, Any], names: Sequence[str], defaults: Dict[str, Any]
) -> Dict[str, Any]:
    """The arguments that follow an operation's input, by parameter name."""
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _params(
    op: Any, args: Sequence[Any], kwargs: Dict[str, Any], names: Sequence[str], defaults: Dict[str, Any]
) -> Dict[str, Any]:
    """Hyper-parameters of a layer, read from the module or from the functional call's arguments."""
    if isinstance(op, nn.Module):
        return {name: getattr(op, name) for name in names}
    return _bind(args, kwargs, names, defaults)


def _require_masked(x: Any, what: str) -> Masked:
    if not isinstance(x, Masked):
        raise UnsupportedLayerError(f"{what} whose main input does not depend on the image but whose other inputs do.")
    return x


def _dims(dim: Any, ndim: int) -> List[int]:
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, (list, tuple)):
        return sorted(d % ndim for d in dim)
    return [dim % ndim]


def _require_feature_dims(x: Masked, dims: Iterable[int], what: str) -> None:
    for dim in dims:
        if x.mask.shape[dim] != 1:
            raise UnsupportedLayerError(
                f"{what} mixes values along dimension {dim % x.value.ndim} of a tensor of shape "
                f"{tuple(x.value.shape)}, which is spatial; layer masking supports it only over channel dimensions."
            )


def _spatial_mask(x: Masked) -> Tensor:
    """The mask with its last two dimensions at the value's size (it may broadcast over them)."""
    mask = x.mask
    if tuple(mask.shape[-2:]) != tuple(x.value.shape[-2:]):
        mask = mask.expand(*mask.shape[:-2], *x.value.shape[-2:])
    return mask


def _fill_removed(value: Tensor, mask: Tensor, fill: float) -> Tensor:
    """``value`` in visible cells, ``fill`` (finite) in removed ones, in one pass over ``value``."""
    return torch.addcmul((1 - mask) * fill, value, mask)


_SLICE_BYTES = 16 * 2**20


def _in_batch_slices(function: Any, value: Tensor, mask: Tensor) -> Tensor:
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


def _lowest(value: Tensor) -> float:
    """A finite stand-in for -inf: no finite value is below it, and it stays finite through later layers."""
    return torch.finfo(value.dtype).min


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` where the denominator is positive, 0 elsewhere (and no inf in gradients)."""
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, 1), 0)


def _as_mask(condition: Tensor, like: Tensor) -> Tensor:
    return condition.to(like.dtype)


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
    torch.add,
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
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.pos,
    operator.pow,
)
try:  # torchvision is optional for the engine: its stochastic depth (identity in eval mode) is a per-cell op
    from torchvision.ops.stochastic_depth import stochastic_depth

    _POINTWISE_FUNCTIONS += (stochastic_depth,)
except ImportError:  # pragma: no cover
    pass
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
    "add",
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


@builtin_rule(*_POINTWISE_MODULES, *_POINTWISE_FUNCTIONS, *_POINTWISE_METHODS, per_cell="intersection")
def pointwise(op: Any, *args: Any, **kwargs: Any) -> Masked:
    """An operation applied to each cell separately: its result is visible where all its inputs are.

    This is :math:`g_m(\\mathbf{x}, \\mathbf{m}) = (g(\\mathbf{x}), \\mathbf{m})` of section 3.2 (removed cells keep
    unspecified values instead of being multiplied by 0), and for two inputs the residual rule: the mask of
    ``x1 + x2`` is ``m1 * m2``.
    """
    value = op(*unwrap(args), **unwrap(kwargs))
    return Masked(value, intersect(masks_of((args, kwargs)), value.ndim))


SUM_TARGETS = (operator.add, torch.add, "add")
"""The operations of residual connections, whose mask rule ``layer_masked(residual=...)`` chooses."""


def _is_image_mask(x: Any) -> bool:
    return (
        isinstance(x, Masked)
        and x.value.ndim == 4
        and x.mask.shape[1] == 1
        and tuple(x.mask.shape[-2:]) == tuple(x.value.shape[-2:])
    )


def _filled_to_cover(x: Masked, cover: Tensor) -> Tensor:
    """``x`` neighbor-padded (Algorithm 1) far enough to fill every cell of ``cover``.

    The width is the number of rings the mask must grow to reach all of ``cover`` (at most ``H + W``); cells
    that no ring reaches (a sample without any visible cell of ``x``) stay 0.
    """
    known = (x.mask > 0).expand_as(cover)
    missing = cover & ~known
    if torch.compiler.is_exporting():
        return neighbor_pad(x.value, x.mask, sum(x.value.shape[-2:]))
    if not bool(missing.any()):
        return x.value
    missing &= known.flatten(1).any(1).view(-1, 1, 1, 1)  # a sample without visible cells can fill nothing
    width = 0
    while bool(missing.any()):
        grown = F.max_pool2d(known.to(x.value.dtype), 3, 1, 1) > 0
        if torch.equal(grown, known):
            break
        known, width = grown, width + 1
        missing &= ~known
    return neighbor_pad(x.value, x.mask, width)


def sum_union(op: Any, *args: Any, **kwargs: Any) -> Masked:
    """A residual sum that keeps every visible cell of both summands (``layer_masked(residual="union")``).

    The paper's rule (:func:`pointwise`) keeps the intersection ``m1 * m2``: a cell visible in one summand only
    is removed, and a region that a strided 1x1 shortcut does not sample vanishes from the output although the
    other branch sees it. Here the output mask is the union ``max(m1, m2)``; where a summand is removed, it
    takes the value that neighbor padding (Algorithm 1, the rule convolutions use) gives it from its own visible
    cells, so no removed pixel enters. A summand with no visible cell at all in a sample contributes 0 there.
    With equal masks this is the paper's rule exactly.
    """
    if (
        len(args) < 2
        or not all(_is_image_mask(a) for a in args[:2])
        or any(is_masked(a) for a in (*args[2:], *kwargs.values()))
    ):
        return pointwise(op, *args, **kwargs)
    first, second = args[0], args[1]
    if first.mask is second.mask or torch.equal(first.mask, second.mask):
        return pointwise(op, *args, **kwargs)
    union = torch.maximum(first.mask, second.mask)
    cover = union > 0
    value = op(_filled_to_cover(first, cover), _filled_to_cover(second, cover), *args[2:], **kwargs)
    return Masked(value, union)


_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)


@builtin_rule(*_DROPOUT_MODULES, *_DROPOUT_FUNCTIONS, per_cell="intersection")
def dropout(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Dropout: the identity in eval mode. In training mode it would make every explanation random, so it is
    refused, as batch normalization is."""
    active = (
        op.training
        if isinstance(op, nn.Module)
        else _bind(args, kwargs, ("p", "training"), {"training": True})["training"]
    )
    if active:
        raise UnsupportedLayerError("dropout in training mode makes the output random; call .eval() on the model.")
    return pointwise(op, x, *args, **kwargs)


@builtin_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, F.batch_norm, per_cell="intersection")
def batch_norm(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Batch normalization with running statistics: a per-channel affine map, so pointwise."""
    x = _require_masked(x, "batch normalization")
    if isinstance(op, nn.Module):
        batch_statistics = op.training or op.running_mean is None
    else:
        batch_statistics = _bind(
            args, kwargs, ("running_mean", "running_var", "weight", "bias", "training"), {"training": False}
        )["training"]
    if batch_statistics:
        raise UnsupportedLayerError(
            "batch normalization in training mode averages over removed pixels; call .eval() on the model."
        )
    _require_feature_dims(x, [1], "batch normalization")
    return pointwise(op, x, *args, **kwargs)


@builtin_rule(nn.Linear, F.linear)
def linear(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """A linear layer mixes its last dimension, which must be a channel dimension."""
    x = _require_masked(x, "a linear layer")
    _require_feature_dims(x, [-1], "a linear layer")
    return pointwise(op, x, *args, **kwargs)


@builtin_rule(nn.Conv1d, F.conv1d)
def channel_conv1d(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """A 1-D convolution once the spatial part has ended: over a pooled descriptor, along channels (ECA's
    attention). Every dimension it reads has mask size 1, so it sees only features of visible cells."""
    x = _require_masked(x, "a 1-D convolution")
    _require_feature_dims(x, range(1, x.value.ndim), "a 1-D convolution")
    return pointwise(op, x, *args, **kwargs)


def _token_mask(x: Any, batch_first: bool, like: Tensor) -> Tensor:
    """The visibility of each token of a ``(N, T, E)`` (or ``(T, N, E)``) sequence as ``(N, T)`` booleans."""
    if not isinstance(x, Masked):
        return torch.ones(like.shape[:2] if batch_first else like.shape[1::-1], dtype=torch.bool, device=like.device)
    _require_feature_dims(x, [-1], "attention")
    mask = align_rank(x.mask, 3)[..., 0] > 0
    mask = mask if batch_first else mask.transpose(0, 1)
    n, t = (like.shape[0], like.shape[1]) if batch_first else (like.shape[1], like.shape[0])
    return mask.expand(n, t)


def _without_keys(given: Optional[Tensor], removed: Tensor, true_ignores: bool) -> Tensor:
    """The model's own attention mask with the ``removed`` keys excluded too: a boolean mask (True ignores a key
    for ``nn.MultiheadAttention``'s ``key_padding_mask``, True attends for ``scaled_dot_product_attention``), or
    a float mask, which is added to the scores, with -inf added for removed keys."""
    if given is None:
        return removed if true_ignores else ~removed
    if given.dtype != torch.bool:
        return given.masked_fill(removed, -math.inf)
    return given | removed if true_ignores else given & ~removed


@builtin_rule(nn.MultiheadAttention)
def multihead_attention(op: nn.MultiheadAttention, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any):
    """Attention over visible tokens only: removed tokens are excluded as keys (token dropping, Jain et al. 2022).

    The keys' visibility is added to any ``key_padding_mask`` the model passes. A token's output is visible when
    the token is and at least one of its keys is; a sample with no visible key gets 0 and an all-removed mask.
    Visible tokens' outputs are those of the layer run on the visible tokens alone.
    """
    bound = _bind(
        args,
        kwargs,
        ("key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal"),
        {
            "key_padding_mask": None,
            "need_weights": True,
            "attn_mask": None,
            "average_attn_weights": True,
            "is_causal": False,
        },
    )
    if is_masked((bound["key_padding_mask"], bound["attn_mask"])):
        raise UnsupportedLayerError("attention whose masks depend on the image.")
    q, k, v = unwrap(query), unwrap(key), unwrap(value)
    queries = _token_mask(query, op.batch_first, q)
    keys = _token_mask(key, op.batch_first, k) & _token_mask(value, op.batch_first, v)
    any_key = keys.any(1)
    removed = ~keys & any_key[:, None]  # a sample without visible keys attends to all, and is zeroed below
    out, weights = op(
        q,
        k,
        v,
        key_padding_mask=_without_keys(bound["key_padding_mask"], removed, true_ignores=True),
        need_weights=bound["need_weights"],
        attn_mask=bound["attn_mask"],
        average_attn_weights=bound["average_attn_weights"],
        is_causal=bound["is_causal"],
    )
    visible = queries & any_key[:, None]  # (N, T)
    token_mask = (visible if op.batch_first else visible.transpose(0, 1)).unsqueeze(-1).to(out.dtype)
    out = Masked(torch.where(token_mask > 0, out, 0), token_mask)
    if weights is None:
        return out, None
    pair = (visible[:, :, None] & keys[:, None, :]).to(weights.dtype)  # (N, Tq, Tk)
    pair = pair if weights.ndim == 3 else pair[:, None]
    return out, Masked(weights * pair, pair)


@builtin_rule(nn.LayerNorm, F.layer_norm)
def layer_norm(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Layer normalization over channel dimensions only (as in ConvNeXt's channels-last blocks)."""
    x = _require_masked(x, "layer normalization")
    shape = _params(op, args, kwargs, ("normalized_shape",), {})["normalized_shape"]
    count = 1 if isinstance(shape, int) else len(shape)
    _require_feature_dims(x, range(-count, 0), "layer normalization")
    return pointwise(op, x, *args, **kwargs)


def _is_log_softmax(op: Any) -> bool:
    return isinstance(op, nn.LogSoftmax) or getattr(op, "__name__", "") == "log_softmax"


@builtin_rule(
    nn.Softmax, nn.LogSoftmax, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax"
)
def softmax(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Softmax over a channel dimension; or over keys (attention weights, the last dimension of ``q @ k.T``):
    removed keys get weight exactly 0 and the visible ones share 1, as when run on the visible tokens alone.
    A row without any visible key is 0 and removed."""
    x = _require_masked(x, "softmax")
    dim = _params(op, args, kwargs, ("dim",), {"dim": None})["dim"]
    if dim is None:
        raise UnsupportedLayerError("softmax without an explicit dim; pass dim= to it.")
    if x.mask.shape[dim] == 1:
        return pointwise(op, x, *args, **kwargs)
    if _is_log_softmax(op):
        raise UnsupportedLayerError("log-softmax over tokens or pixels (removed ones would get log 0).")
    value = op(_fill_removed(x.value, x.mask, _lowest(x.value)), *args, **kwargs)
    return Masked(value * x.mask, x.mask)


def _key_visibility(key: Any, value: Any) -> Optional[Tensor]:
    """Which keys of ``(..., S, E)`` key and value tensors are visible, as ``(..., 1, S)`` booleans."""
    masks = [align_rank(x.mask, x.value.ndim) for x in (key, value) if isinstance(x, Masked)]
    if not masks:
        return None
    visible = functools.reduce(torch.logical_and, [mask > 0 for mask in masks])
    return visible.transpose(-2, -1)


@builtin_rule(F.scaled_dot_product_attention)
def scaled_dot_product_attention(op: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Masked:
    """Fused attention over visible keys only (token dropping): the keys' visibility joins the model's
    ``attn_mask``. A query is visible if it is and has a visible key; one without any gets 0."""
    bound = _bind(
        args,
        kwargs,
        ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
        {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False},
    )
    if is_masked(bound["attn_mask"]):
        raise UnsupportedLayerError("attention whose attn_mask depends on the image.")
    if bound["is_causal"]:
        raise UnsupportedLayerError("causal attention (is_causal=True), which vision classifiers do not use.")
    for x in (query, key, value):
        if isinstance(x, Masked):
            _require_feature_dims(x, [-1], "attention")
    q, k, v = unwrap((query, key, value))
    keys = _key_visibility(key, value)
    queries = (
        align_rank(query.mask, q.ndim) > 0
        if isinstance(query, Masked)
        else torch.ones_like(q[..., :1], dtype=torch.bool)
    )
    if keys is None:
        keys = torch.ones_like(k[..., :1], dtype=torch.bool).transpose(-2, -1)
    any_key = keys.any(-1, keepdim=True)
    removed = ~keys & any_key  # a query without visible keys attends to all, and is zeroed below
    given = _without_keys(bound["attn_mask"], removed, true_ignores=False)
    out = op(
        q, k, v, attn_mask=given, dropout_p=bound["dropout_p"], scale=bound["scale"], enable_gqa=bound["enable_gqa"]
    )
    visible = (queries & any_key).to(out.dtype)
    return Masked(torch.where(visible > 0, out, 0), visible)


# ---------------------------------------------------------------------------------------------------------------
# attention written out: contractions over tokens, softmax over keys, fused attention (token dropping)


def _operand_masks(operands: Sequence[Any]) -> List[Optional[Tensor]]:
    """Each operand's mask at its own rank, or None for an operand that does not depend on the image."""
    return [align_rank(x.mask, x.value.ndim) if isinstance(x, Masked) else None for x in operands]


def _contraction(operands: Sequence[Any], labels: Sequence[str], output: str, call: Any) -> Masked:
    """A sum of products over the labels missing from ``output`` (``labels[i]`` names operand i's dimensions).

    A contracted dimension that is spatial (a token dimension) in one operand must be spatial in every operand
    that has it: the sum then runs over the cells visible in all of them, which is attention over visible keys
    (``weights @ v``) and exactly what running on the visible tokens alone computes. Contracting tokens against
    a fixed weight (a token-mixing MLP) has no such meaning, since it needs every token, and is refused.
    """
    masks = _operand_masks(operands)
    contracted = {label for spec in labels for label in spec if label not in output}
    zeroed = [False] * len(operands)
    for label in sorted(contracted):
        holders = [i for i, spec in enumerate(labels) if label in spec]
        spatial = [masks[i] is not None and masks[i].shape[labels[i].index(label)] != 1 for i in holders]
        if any(spatial) and not all(spatial):
            raise UnsupportedLayerError(
                "a product that sums over tokens or pixels against a tensor that does not follow them (a "
                "token-mixing weight needs every token); layer masking supports sums over tokens only between "
                "image-dependent tensors, as attention's weights @ values."
            )
        for i, is_spatial in zip(holders, spatial):
            zeroed[i] = zeroed[i] or is_spatial
    values = [x.value * m if z else unwrap(x) for x, m, z in zip(operands, masks, zeroed)]
    value = call(*values)
    ones = [torch.ones((1,) * unwrap(x).ndim, dtype=value.dtype, device=value.device) for x in operands]
    mask_terms = [m.to(value.dtype) if m is not None else one for m, one in zip(masks, ones)]
    mask = (call(*mask_terms) > 0).to(value.dtype)
    return Masked(value, mask)


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@builtin_rule(torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm", "__matmul__")
def matmul(op: Any, a: Any, b: Any, **kwargs: Any) -> Masked:
    """A matrix product: per token when it contracts channels (``q @ k.T``, ``x @ W``); over visible tokens
    only when it contracts a token dimension of both operands (``softmax(q @ k.T) @ v``).

    The mask of ``q @ k.T`` is the pair mask (query visible and key visible), that of ``weights @ v`` says which
    queries have a visible key.
    """
    if kwargs:
        raise UnsupportedLayerError("matmul with an out= argument.")
    ranks = [unwrap(a).ndim, unwrap(b).ndim]
    if min(ranks) < 2:
        raise UnsupportedLayerError("a matrix product with a 1-D operand; reshape it to 2-D first.")
    batch = _LETTERS[: max(ranks) - 2]
    left, right = batch[len(batch) - ranks[0] + 2 :] + "ik", batch[len(batch) - ranks[1] + 2 :] + "kj"
    return _contraction([a, b], [left, right], batch + "ij", torch.matmul)


def _einsum_labels(equation: str, operands: Sequence[Any]) -> Tuple[List[str], str]:
    """The equation's per-operand labels and output labels, with ``...`` spelled out as letters."""
    inputs, arrow, output = equation.replace(" ", "").partition("->")
    if not arrow:
        raise UnsupportedLayerError("einsum without an explicit output ('->'); write the output labels.")
    specs = inputs.split(",")
    extra = [unwrap(x).ndim - len(spec) + 3 for x, spec in zip(operands, specs) if "..." in spec]
    spelled = "".join(c for c in _LETTERS if c not in equation)[: max(extra, default=0)]

    def spell(x: Any, spec: str) -> str:
        count = unwrap(x).ndim - len(spec) + 3
        return spec.replace("...", spelled[len(spelled) - count :]) if "..." in spec else spec

    return [spell(x, spec) for x, spec in zip(operands, specs)], output.replace("...", spelled)


@builtin_rule(torch.einsum)
def einsum(op: Any, equation: str, *operands: Any) -> Masked:
    """``torch.einsum``, under the rule of :func:`matmul`: sums over tokens run over visible cells of every
    operand (MaxViT's attention, ``einsum("bhid,bhjd->bhij", q, k)`` and ``einsum("bhij,bhjd->bhid", w, v)``)."""
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    labels, output = _einsum_labels(equation, operands)
    equation = ",".join(labels) + "->" + output
    return _contraction(operands, labels, output, functools.partial(torch.einsum, equation))


def _masked_group_norm(x: Masked, groups: int, weight: Any, bias: Any, eps: float) -> Masked:
    """Group normalization with the mean and variance of each group taken over its visible cells only."""
    value, mask = x.value, x.mask
    batch, channels = value.shape[:2]
    grouped = value.reshape(batch, groups, -1)
    visible = mask.expand(batch, channels // groups, *value.shape[2:]).reshape(batch, 1, -1).expand_as(grouped)
    count = visible.sum(-1, keepdim=True)
    mean = _safe_divide((grouped * visible).sum(-1, keepdim=True), count)
    variance = _safe_divide((((grouped - mean) * visible) ** 2).sum(-1, keepdim=True), count)
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
    x = _require_masked(x, "group normalization")
    _require_feature_dims(x, [1], "group normalization")
    if isinstance(op, nn.GroupNorm):
        return _masked_group_norm(x, op.num_groups, op.weight, op.bias, op.eps)
    if isinstance(op, nn.InstanceNorm2d):
        if op.track_running_stats and not op.training:
            return pointwise(op, x)
        return _masked_group_norm(x, x.value.shape[1], op.weight, op.bias, op.eps)
    if op is F.group_norm:
        bound = _bind(
            args, kwargs, ("num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5}
        )
        return _masked_group_norm(x, bound["num_groups"], bound["weight"], bound["bias"], bound["eps"])
    bound = _bind(
        args,
        kwargs,
        ("running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps"),
        {"running_mean": None, "running_var": None, "weight": None, "bias": None, "use_input_stats": True, "eps": 1e-5},
    )
    if not bound["use_input_stats"]:
        return pointwise(op, x, *args, **kwargs)
    return _masked_group_norm(x, x.value.shape[1], bound["weight"], bound["bias"], bound["eps"])


# ---------------------------------------------------------------------------------------------------------------
# convolutions: g_k(Pad_k(x, m)) with the mask max-pooled by the same kernel (section 3.2, Algorithm 1)

_CONV_ARGS = ("weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _conv_geometry(op: Any, x: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    x = _require_masked(x, "a convolution")
    if masks_of((args, kwargs)):
        raise UnsupportedLayerError("a convolution whose weights depend on the image.")
    _require_feature_dims(x, [1], "a convolution")
    if isinstance(op, nn.Module):
        return dict(
            kernel_size=op.kernel_size,
            stride=op.stride,
            padding=op.padding,
            dilation=op.dilation,
            padding_mode=op.padding_mode,
        )
    bound = _bind(args, kwargs, _CONV_ARGS, _CONV_DEFAULTS)
    return dict(
        kernel_size=tuple(bound["weight"].shape[-2:]),
        stride=bound["stride"],
        padding=bound["padding"],
        dilation=bound["dilation"],
        padding_mode="zeros",
    )


@builtin_rule(nn.Conv2d, F.conv2d)
def conv2d(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Neighbor-pad the input, convolve, max-pool the mask (the paper's layer masking).

    The padding width is the kernel's reach ``(k - 1) * dilation`` rather than the paper's ``k``: cells farther
    away are read only by outputs whose mask is 0, so the visible outputs are the paper's exactly. A 1x1
    convolution therefore runs on the activations as they are, like any per-cell operation.
    """
    return _neighbor_padded_conv(op, x, args, kwargs, rings=None)


def _neighbor_padded_conv(op: Any, x: Any, args: Sequence[Any], kwargs: Dict[str, Any], rings: Optional[int]) -> Masked:
    geometry = _conv_geometry(op, x, args, kwargs)
    padded, mask = pad_for_convolution(x.value, x.mask, **geometry, rings=rings)
    return Masked(op(padded, *args, **kwargs), mask)


def conv2d_with_rings(rings: int) -> Any:
    """The ``conv2d`` rule padding only ``rings`` rings, for a convolution whose outer kept cells are never read.

    :func:`~captum_layermask.demand.padding_rings` finds such convolutions when a model is converted; the
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
        bound = _bind(args, kwargs, _CONV_ARGS, _CONV_DEFAULTS)
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

    scale = _safe_divide(window_count(torch.ones_like(x.mask[:1])), window_count(x.mask))
    value = response * scale
    if bias is not None:
        value = value + bias.reshape(1, -1, 1, 1)
    return Masked(value, propagate_mask(x.mask, **geometry))


# ---------------------------------------------------------------------------------------------------------------
# pooling

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
    x = _require_masked(x, "max pooling")
    _no_indices(_params(op, args, kwargs, _MAX_POOL_ARGS, _MAX_POOL_DEFAULTS))
    mask = _spatial_mask(x)
    visible = op(mask, *args, **kwargs)  # the layer's own padding (-inf, or timm's "same") never wins
    lowest = _lowest(x.value)
    pooled = _in_batch_slices(
        lambda value, part: op(_filled_for_pooling(value, part, lowest), *args, **kwargs), x.value, mask
    )
    if x.value.is_contiguous():
        pooled = pooled.contiguous()
    return Masked(pooled * visible, visible)


def _filled_for_pooling(value: Tensor, mask: Tensor, fill: float) -> Tensor:
    """``_fill_removed``, written channels-last for a batch of images (not under autograd or export, which take
    no ``out=``)."""
    if value.ndim != 4 or torch.compiler.is_compiling() or (torch.is_grad_enabled() and value.requires_grad):
        return _fill_removed(value, mask, fill)
    filled = torch.empty_like(value, memory_format=torch.channels_last)
    return torch.where(mask > 0, value, value.new_full((), fill), out=filled)


@builtin_rule(nn.AvgPool2d, F.avg_pool2d)
def avg_pool2d(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """The mean over the visible cells of each window, rescaled like the layer's own border handling.

    ``pool(x * m) * pool(1) / pool(m)``: with a full mask this is the layer itself (``count_include_pad``
    included); removed cells count as the mean of the visible ones, never as zeros (section 3.2, ``h_m``).
    """
    x = _require_masked(x, "average pooling")
    mask = _spatial_mask(x)
    total = op(x.value * mask, *args, **kwargs)
    visible = op(mask, *args, **kwargs)  # the layer's own border handling (padding, timm's "same") alike
    inside = op(torch.ones_like(mask[:1]), *args, **kwargs)
    return Masked(total * _safe_divide(inside, visible), _as_mask(visible > 0, mask))


@builtin_rule(nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d)
def adaptive_avg_pool2d(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """:math:`h(\\mathbf{x} \\odot \\mathbf{m}) / h(\\mathbf{m})` (section 3.2); 0 where a window sees nothing."""
    x = _require_masked(x, "adaptive average pooling")
    output_size = _params(op, args, kwargs, ("output_size",), {})["output_size"]
    mask = _spatial_mask(x)
    total = op(x.value * mask, *args, **kwargs)
    visible = F.adaptive_avg_pool2d(mask, output_size)
    return Masked(_safe_divide(total, visible), _as_mask(visible > 0, mask))


@builtin_rule(nn.AdaptiveMaxPool2d, F.adaptive_max_pool2d)
def adaptive_max_pool2d(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """The maximum over the visible cells of each window; 0 where a window sees nothing."""
    x = _require_masked(x, "adaptive max pooling")
    params = _params(op, args, kwargs, ("output_size", "return_indices"), {"return_indices": False})
    _no_indices(params)
    mask = _spatial_mask(x)
    lowest = _lowest(x.value)
    pooled = _in_batch_slices(
        lambda value, part: op(_fill_removed(value, part, lowest), *args, **kwargs), x.value, mask
    )
    visible = F.adaptive_max_pool2d(mask, params["output_size"])
    return Masked(pooled * visible, visible)


def _reduction(kind: str, op: Any, x: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Masked:
    """Mean, sum, maximum or minimum (``kind``) over dimensions; over spatial ones only the visible cells count."""
    x = _require_masked(x, "a reduction")
    bound = _bind(args, kwargs, ("dim", "keepdim"), {"dim": None, "keepdim": False})
    keepdim = bound["keepdim"]
    dims, mask_out, spatial = _reduced(x, bound["dim"], keepdim)
    if not spatial:
        return Masked(op(x.value, *args, **kwargs), mask_out)
    if kind in ("mean", "sum"):
        value = _visible_mean(x.value, x.mask, dims, keepdim)
        if kind == "sum":
            value = value * math.prod(x.value.shape[d] for d in dims)
        if kwargs.get("dtype") is not None:
            value = value.to(kwargs["dtype"])
    else:
        fill = _lowest(x.value) if kind == "amax" else -_lowest(x.value)
        value = getattr(torch, kind)(_fill_removed(x.value, x.mask, fill), dims, keepdim) * mask_out
    return Masked(value, mask_out)


def _reduced(x: Masked, dim: Any, keepdim: bool) -> Tuple[List[int], Tensor, bool]:
    """What every reduction rule starts from: the reduced dimensions, the output mask (visible if any reduced
    cell is), and whether a spatial dimension is reduced (if not, the operation runs as it is)."""
    dims = _dims(dim, x.value.ndim)
    mask_out = x.mask.amax(dims, keepdim=keepdim) if dims else x.mask
    return dims, mask_out, any(x.mask.shape[d] != 1 for d in dims)


def _visible_count(value: Tensor, mask: Tensor, dims: List[int], keepdim: bool) -> Tensor:
    """The number of visible values over ``dims`` (a channel dimension counts all its values per visible cell)."""
    broadcast = math.prod(value.shape[d] for d in dims if mask.shape[d] == 1)
    return mask.sum(dims, keepdim=keepdim) * broadcast


def _visible_mean(value: Tensor, mask: Tensor, dims: List[int], keepdim: bool) -> Tensor:
    """The mean over ``dims`` of the visible cells (0 where none)."""
    return _safe_divide((value * mask).sum(dims, keepdim=keepdim), _visible_count(value, mask, dims, keepdim))


@builtin_rule(torch.mean, "mean")
def mean(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """A mean over dimensions; over spatial ones, of the visible cells only (0 if none).

    ``x.mean([2, 3])`` is global average pooling, :math:`h_m` of section 3.2.
    """
    return _reduction("mean", op, x, args, kwargs)


@builtin_rule(torch.amax, "amax")
def amax(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """A maximum over dimensions; over spatial ones, of the visible cells only (0 if none)."""
    return _reduction("amax", op, x, args, kwargs)


@builtin_rule(torch.amin, "amin")
def amin(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """A minimum over dimensions; over spatial ones, of the visible cells only (0 if none)."""
    return _reduction("amin", op, x, args, kwargs)


@builtin_rule(torch.max, torch.min, "max", "min")
def max_min(op: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """``max``/``min`` in their three forms. With a second tensor (EvoNorm's ``left.max(right)``) it is
    element-wise, a per-cell operation. Over a dimension it returns ``(values, indices)``; over a spatial one
    both come from the visible cells only (0 where none). Over everything, it is the visible maximum (minimum).
    """
    other = args[0] if args else kwargs.get("other", kwargs.get("dim"))
    if isinstance(other, (Tensor, Masked)):
        return pointwise(op, x, *args, **kwargs)
    x = _require_masked(x, "max/min")
    kind = "amax" if getattr(op, "__name__", "") == "max" else "amin"
    bound = _bind(args, kwargs, ("dim", "keepdim"), {"dim": None, "keepdim": False})
    if bound["dim"] is None:
        return _reduction(kind, getattr(torch, kind), x, (), {})
    dims, mask_out, spatial = _reduced(x, bound["dim"], bound["keepdim"])
    fill = _lowest(x.value) if kind == "amax" else -_lowest(x.value)
    value = _fill_removed(x.value, x.mask, fill) if spatial else x.value
    values, indices = getattr(torch, kind[1:])(value, dims[0], bound["keepdim"])
    visible = mask_out > 0
    return Masked(torch.where(visible, values, 0), mask_out), Masked(torch.where(visible, indices, 0), mask_out)


@builtin_rule(torch.sum, "sum")
def sum_cells(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """A sum over dimensions. Over spatial ones each removed cell counts as the mean of the visible ones, the
    average pooling rule of section 3.2 (``h(x*m) / h(m)``) applied to a sum: ``N * mean(visible)``."""
    return _reduction("sum", op, x, args, kwargs)


@builtin_rule(torch.norm, torch.linalg.vector_norm, "norm")
def norm(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """A vector p-norm over dimensions (ConvNeXt-V2's global response normalization). Over spatial ones, as for
    a sum, each removed cell counts as the visible mean of ``|x|^p``: ``(N * mean(visible |x|^p))^(1/p)``; the
    maximum of the visible cells for ``p = inf``."""
    x = _require_masked(x, "a norm")
    first = "ord" if op is torch.linalg.vector_norm else "p"
    bound = _bind(args, kwargs, (first, "dim", "keepdim"), {first: 2, "dim": None, "keepdim": False})
    p = bound[first]
    keepdim = bound["keepdim"]
    dims, mask_out, spatial = _reduced(x, bound["dim"], keepdim)
    if not spatial:
        return Masked(op(x.value, *args, **kwargs), mask_out)
    if p in ("fro", None):
        p = 2
    if not isinstance(p, (int, float)) or p <= 0:
        raise UnsupportedLayerError(
            f"a norm of order {p!r} over spatial dimensions; orders p > 0 and inf are supported."
        )
    magnitude = x.value.abs()
    if math.isinf(p):
        return Masked(magnitude.mul(x.mask).amax(dims, keepdim=keepdim), mask_out)
    count = math.prod(x.value.shape[d] for d in dims)
    return Masked((_visible_mean(magnitude**p, x.mask, dims, keepdim) * count) ** (1 / p), mask_out)


@builtin_rule(F.normalize)
def normalize(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """``x / max(||x||_p, eps)`` along ``dim``: per cell over channels (cosine attention's q and k); over a
    token dimension (XCiT's cross-covariance attention), the norm of the visible tokens only."""
    x = _require_masked(x, "normalize")
    bound = _bind(args, kwargs, ("p", "dim", "eps"), {"p": 2.0, "dim": 1, "eps": 1e-12})
    dim = bound["dim"] % x.value.ndim
    if x.mask.shape[dim] == 1:
        return pointwise(op, x, *args, **kwargs)
    visible = x.value * x.mask
    norm = torch.linalg.vector_norm(visible, ord=bound["p"], dim=dim, keepdim=True)
    return Masked(visible / norm.clamp_min(bound["eps"]), x.mask)


@builtin_rule(torch.var, "var")
def variance(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Variance over dimensions; over spatial ones, of the visible cells (with the call's correction applied to
    their count), as group normalization's statistics are."""
    return _variance(op, x, args, kwargs, root=False)


@builtin_rule(torch.std, "std")
def standard_deviation(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Standard deviation over dimensions; over spatial ones, of the visible cells (see :func:`variance`)."""
    return _variance(op, x, args, kwargs, root=True)


def _variance(op: Any, x: Any, args: Sequence[Any], kwargs: Dict[str, Any], root: bool) -> Masked:
    x = _require_masked(x, "a variance")
    bound = _bind(
        args,
        kwargs,
        ("dim", "unbiased", "keepdim"),
        {"dim": None, "unbiased": None, "keepdim": False, "correction": None},
    )
    keepdim = bound["keepdim"]
    dims, mask_out, spatial = _reduced(x, bound["dim"], keepdim)
    if not spatial:
        return Masked(op(x.value, *args, **kwargs), mask_out)
    correction = bound["correction"]
    if correction is None:
        correction = 1 if bound["unbiased"] in (None, True) else 0
    mean_value = _visible_mean(x.value, x.mask, dims, keepdim=True)
    count = _visible_count(x.value, x.mask, dims, keepdim)
    squares = (((x.value - mean_value) * x.mask) ** 2).sum(dims, keepdim=keepdim)
    value = _safe_divide(squares, (count - correction).clamp(min=0))
    return Masked(value.sqrt() if root else value, mask_out)


# ---------------------------------------------------------------------------------------------------------------
# padding and resampling

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
    return _spatial_mask(x).expand(x.mask.shape[0], 1, *x.value.shape[-2:])


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
    x = _require_masked(x, "padding")
    if isinstance(op, nn.Module):
        widths, mode = tuple(op.padding), _PAD_MODULES[type(op)]
    else:
        bound = _bind(args, kwargs, ("pad", "mode", "value"), {"mode": "constant", "value": None})
        widths, mode = tuple(bound["pad"]), bound["mode"]
    if len(widths) % 2 or len(widths) > 2 * x.value.ndim:
        raise UnsupportedLayerError(f"padding {widths} of a tensor of shape {tuple(x.value.shape)}.")
    mask = align_rank(x.mask, x.value.ndim)
    for pair in range(len(widths) // 2):
        dim, before, after = x.value.ndim - 1 - pair, widths[2 * pair], widths[2 * pair + 1]
        if mask.shape[dim] > 1 and (before or after):
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
    return _bind(args, kwargs, names, defaults)


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
    x = _require_masked(x, "interpolation")
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


# ---------------------------------------------------------------------------------------------------------------
# shape operations


def _dim_groups(source: Sequence[int], target: Sequence[int]) -> List[Tuple[List[int], List[int]]]:
    """Pairs the dimensions of a reshape into groups of equal element count, in order."""
    groups: List[Tuple[List[int], List[int]]] = []
    i = j = 0
    while i < len(source) or j < len(target):
        group_source: List[int] = []
        group_target: List[int] = []
        size_source = size_target = 1
        if i < len(source):
            group_source.append(i)
            size_source *= source[i]
            i += 1
        if j < len(target):
            group_target.append(j)
            size_target *= target[j]
            j += 1
        while size_source != size_target:
            if size_source < size_target and i < len(source):
                group_source.append(i)
                size_source *= source[i]
                i += 1
            elif j < len(target):
                group_target.append(j)
                size_target *= target[j]
                j += 1
            else:
                raise UnsupportedLayerError(f"a reshape from {tuple(source)} to {tuple(target)} it cannot follow.")
        groups.append((group_source, group_target))
    return groups


def _batch_expanded(x: Masked, first_group: Sequence[int]) -> Tensor:
    """The mask, expanded along the batch if a reshape merges the batch with spatial dimensions (Swin's windows
    become the batch of its attention): a mask shared by the batch is then no longer shared."""
    mask = x.mask
    if len(first_group) > 1 and mask.shape[0] == 1 and x.value.shape[0] > 1:
        if any(mask.shape[d] == x.value.shape[d] > 1 for d in first_group[1:]):
            mask = mask.expand(x.value.shape[0], *mask.shape[1:])
    return mask


@builtin_rule(
    nn.Flatten,
    nn.Unflatten,
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.unflatten,
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "reshape_as",
    "view_as",
)
def reshape(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Reshapes that keep, split or merge dimensions; the mask follows the value.

    Channel dimensions stay size 1 in the mask and spatial ones are reshaped alike. When a reshape merges
    spatial dimensions into features (``flatten`` before a VGG-style classifier), the spatial part of the
    network ends there: removed cells are filled with 0 first (``x * m``) and the new mask says whether the
    sample has any visible cell.
    """
    x = _require_masked(x, "a reshape")
    args, kwargs = unwrap(args), unwrap(kwargs)  # reshape_as/view_as take a tensor
    value = op(x.value, *args, **kwargs)
    groups = _dim_groups(x.value.shape, value.shape)
    mask = _batch_expanded(x, groups[0][0])
    mask_shape: List[int] = []
    merged: List[int] = []
    for source, target in groups:
        if all(mask.shape[d] == 1 for d in source):
            mask_shape += [1] * len(target)
        elif all(mask.shape[d] == x.value.shape[d] for d in source):
            mask_shape += [value.shape[d] for d in target]
        else:
            merged += source
            mask_shape += [1] * len(target)
    if merged:
        value = op(x.value * mask, *args, **kwargs)
        mask = mask.amax(merged, keepdim=True)
    return Masked(value, mask.reshape(mask_shape))


@builtin_rule(
    torch.permute, torch.transpose, torch.swapaxes, torch.movedim, "permute", "transpose", "swapaxes", "movedim"
)
def reorder(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Dimension permutations apply to the mask as they do to the value."""
    x = _require_masked(x, "a permutation")
    return Masked(op(x.value, *args, **kwargs), op(x.mask, *args, **kwargs))


@builtin_rule(torch.roll, "roll")
def roll(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """A cyclic shift (Swin's shifted windows): the mask shifts with the value; along a channel dimension
    (mask size 1) it stays as it is."""
    x = _require_masked(x, "a roll")
    if _bind(args, kwargs, ("shifts", "dims"), {"dims": None})["dims"] is None:
        raise UnsupportedLayerError("torch.roll without dims (it flattens the tensor); pass dims=.")
    return Masked(op(x.value, *args, **kwargs), op(x.mask, *args, **kwargs))


@builtin_rule(torch.repeat_interleave, "repeat_interleave")
def repeat_interleave(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Repeating slices along a dimension (GCViT's global query, repeated for each window): the mask repeats
    alike along a spatial dimension, and stays as it is along one it broadcasts over."""
    x = _require_masked(x, "repeat_interleave")
    bound = _bind(args, kwargs, ("repeats", "dim"), {"dim": None})
    if bound["dim"] is None or is_masked(bound["repeats"]):
        raise UnsupportedLayerError(
            "repeat_interleave without dim (it flattens the tensor), or with image-dependent repeats."
        )
    dim = bound["dim"] % x.value.ndim
    mask = align_rank(x.mask, x.value.ndim)
    if mask.shape[dim] != 1:
        mask = op(mask, *args, **kwargs)
    return Masked(op(x.value, *args, **kwargs), mask)


@builtin_rule("expand", "expand_as")
def expand(op: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Broadcasting a tensor: the mask broadcasts with it."""
    if not isinstance(x, Masked):
        return op(x, *unwrap(args), **unwrap(kwargs))
    value = op(x.value, *unwrap(args), **unwrap(kwargs))
    return Masked(value, align_rank(x.mask, value.ndim))


def _index_for_mask(index: Any, x: Masked) -> Tuple[Any, ...]:
    """The index that selects, from the mask, the cells the same index selects from the value."""
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(item, (Tensor, list, bool)) for item in items):
        raise UnsupportedLayerError("indexing with tensors, lists or booleans (advanced indexing).")
    used = sum(item is not None and item is not Ellipsis for item in items)
    result: List[Any] = []
    dim = 0
    for item in items:
        if item is Ellipsis:
            skipped = x.value.ndim - used
            result += [slice(None)] * skipped
            dim += skipped
        elif item is None:
            result.append(None)
        else:
            if x.mask.shape[dim] == 1:
                item = slice(None) if isinstance(item, slice) else 0
            result.append(item)
            dim += 1
    return tuple(result)


@builtin_rule(operator.getitem)
def getitem(op: Any, container: Any, index: Any) -> Any:
    """Indexing: slices of spatial dimensions slice the mask too; channel indices leave it as it is."""
    if not isinstance(container, Masked):
        if isinstance(index, Masked) or masks_of(index):
            raise UnsupportedLayerError("indexing with an index that depends on the image.")
        return op(container, index)
    return Masked(op(container.value, index), op(container.mask, _index_for_mask(index, container)))


@builtin_rule(torch.cat, torch.concat, torch.concatenate, torch.stack)
def concatenate(op: Any, tensors: Sequence[Any], *args: Any, **kwargs: Any) -> Masked:
    """Concatenation: along channels the result is visible where every input is (masks kept consistent); along
    a spatial dimension each input brings its own cells."""
    value = op([unwrap(t) for t in tensors], *args, **kwargs)
    dim = _bind(args, kwargs, ("dim",), {"dim": 0})["dim"] % value.ndim
    masks = [
        align_rank(t.mask, value.ndim) if op is not torch.stack else t.mask.unsqueeze(dim)
        for t in tensors
        if isinstance(t, Masked)
    ]
    if op is torch.stack or all(mask.shape[dim] == 1 for mask in masks):
        return Masked(value, intersect(masks, value.ndim))
    common = list(torch.broadcast_shapes(*[mask.shape[:dim] + (1,) + mask.shape[dim + 1 :] for mask in masks]))
    parts = []
    for tensor in tensors:
        size = list(common)
        size[dim] = unwrap(tensor).shape[dim]
        if isinstance(tensor, Masked):
            parts.append(tensor.mask.expand(size))
        else:
            parts.append(torch.ones(size, dtype=masks[0].dtype, device=masks[0].device))
    return Masked(value, torch.cat(parts, dim))


def _split(name: str, op: Any, x: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Tuple[Masked, ...]:
    x = _require_masked(x, "a split")
    names = ("dim",) if name == "unbind" else ("sections", "dim")
    dim = _bind(args, kwargs, names, {"dim": 0})["dim"] % x.value.ndim
    values = op(x.value, *args, **kwargs)
    if x.mask.shape[dim] != 1:
        masks = op(x.mask, *args, **kwargs)
    elif name == "unbind":
        masks = [x.mask.select(dim, 0)] * len(values)
    else:
        masks = [x.mask] * len(values)
    return tuple(Masked(value, mask) for value, mask in zip(values, masks))


@builtin_rule(torch.chunk, torch.split, torch.tensor_split, "chunk", "split", "tensor_split")
def split(op: Any, x: Any, *args: Any, **kwargs: Any) -> Tuple[Masked, ...]:
    """Splitting along a channel dimension keeps the mask; along a spatial one splits it alike."""
    return _split("split", op, x, args, kwargs)


@builtin_rule(torch.unbind, "unbind")
def unbind(op: Any, x: Any, *args: Any, **kwargs: Any) -> Tuple[Masked, ...]:
    """Unbinding a channel dimension keeps the mask (without that dimension); a spatial one unbinds it alike."""
    return _split("unbind", op, x, args, kwargs)


_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "layout"}


@builtin_rule("size", "dim", "numel", "ndimension", "get_device", len, metadata=True)
def read_metadata(op: Any, *args: Any, **kwargs: Any) -> Any:
    """Shape and dtype queries: the value's, which do not depend on which pixels are visible."""
    return op(*unwrap(args), **unwrap(kwargs))


@builtin_rule(getattr, metadata=True)
def read_attribute(op: Any, x: Any, name: str, *default: Any) -> Any:
    """``x.shape``, ``x.dtype`` and other metadata attributes of an activation."""
    if name not in _METADATA_ATTRIBUTES:
        raise UnsupportedLayerError(f"reading attribute '{name}' of an activation.")
    return op(unwrap(x), name, *default)
