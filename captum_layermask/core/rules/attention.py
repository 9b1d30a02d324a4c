"""Attention by token dropping (Jain et al. 2022): removed tokens take no part as keys. ``nn.MultiheadAttention``,
``scaled_dot_product_attention``, softmax over keys, and attention written out as contractions over tokens
(``matmul``, ``einsum``)."""

from __future__ import annotations

import functools
import math
import operator
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedLayerError
from ..masked import Masked, align_rank, is_masked, unwrap
from ..registry import builtin_rule
from .common import (
    bind_arguments,
    fill_removed,
    layer_parameters,
    lowest_value,
    require_feature_dims,
    require_masked,
)
from .pointwise import pointwise


def _token_mask(x: Any, batch_first: bool, like: Tensor) -> Tensor:
    """The visibility of each token of a ``(N, T, E)`` (or ``(T, N, E)``) sequence as ``(N, T)`` booleans."""
    if not isinstance(x, Masked):
        return torch.ones(like.shape[:2] if batch_first else like.shape[1::-1], dtype=torch.bool, device=like.device)
    require_feature_dims(x, [-1], "attention")
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
    bound = bind_arguments(
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


def _is_log_softmax(op: Any) -> bool:
    return isinstance(op, nn.LogSoftmax) or getattr(op, "__name__", "") == "log_softmax"


@builtin_rule(
    nn.Softmax, nn.LogSoftmax, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax"
)
def softmax(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Softmax over a channel dimension; or over keys (attention weights, the last dimension of ``q @ k.T``):
    removed keys get weight exactly 0 and the visible ones share 1, as when run on the visible tokens alone.
    A row without any visible key is 0 and removed."""
    x = require_masked(x, "softmax")
    dim = layer_parameters(op, args, kwargs, ("dim",), {"dim": None})["dim"]
    if dim is None:
        raise UnsupportedLayerError("softmax without an explicit dim; pass dim= to it.")
    if x.mask.shape[dim] == 1:
        return pointwise(op, x, *args, **kwargs)
    if _is_log_softmax(op):
        raise UnsupportedLayerError("log-softmax over tokens or pixels (removed ones would get log 0).")
    value = op(fill_removed(x.value, x.mask, lowest_value(x.value)), *args, **kwargs)
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
    bound = bind_arguments(
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
            require_feature_dims(x, [-1], "attention")
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
