"""Reductions (mean, sum, max, min, norm, variance): over channel dimensions as they are, over spatial or token
dimensions of the visible cells only."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import UnsupportedLayerError
from ..masked import Masked
from ..primitives import all_visible
from ..registry import builtin_rule
from .common import (
    bind_arguments,
    fill_removed,
    lowest_value,
    normalized_dims,
    require_masked,
    safe_divide,
    visible_spatial_sum,
)
from .pointwise import pointwise


def _reduction(kind: str, op: Any, x: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Masked:
    """Mean, sum, maximum or minimum (``kind``) over dimensions; over spatial ones only the visible cells count."""
    x = require_masked(x, "a reduction")
    bound = bind_arguments(args, kwargs, ("dim", "keepdim"), {"dim": None, "keepdim": False})
    keepdim = bound["keepdim"]
    dims, mask_out, spatial = _reduced(x, bound["dim"], keepdim)
    if not spatial or all_visible(x.mask):  # the operation itself: a full mask gives the model's own result
        return Masked(op(x.value, *args, **kwargs), mask_out)
    if kind in ("mean", "sum"):
        value = _visible_mean(x.value, x.mask, dims, keepdim)
        if kind == "sum":
            value = value * math.prod(x.value.shape[d] for d in dims)
        if kwargs.get("dtype") is not None:
            value = value.to(kwargs["dtype"])
    else:
        fill = lowest_value(x.value) if kind == "amax" else -lowest_value(x.value)
        value = getattr(torch, kind)(fill_removed(x.value, x.mask, fill), dims, keepdim) * mask_out
    return Masked(value, mask_out)


def _reduced(x: Masked, dim: Any, keepdim: bool) -> Tuple[List[int], Tensor, bool]:
    """What every reduction rule starts from: the reduced dimensions, the output mask (visible if any reduced
    cell is), and whether a spatial dimension is reduced (if not, the operation runs as it is)."""
    dims = normalized_dims(dim, x.value.ndim)
    mask_out = x.mask.amax(dims, keepdim=keepdim) if dims else x.mask
    return dims, mask_out, any(x.mask.shape[d] != 1 for d in dims)


def _visible_count(value: Tensor, mask: Tensor, dims: List[int], keepdim: bool) -> Tensor:
    """The number of visible values over ``dims`` (a channel dimension counts all its values per visible cell)."""
    broadcast = math.prod(value.shape[d] for d in dims if mask.shape[d] == 1)
    return mask.sum(dims, keepdim=keepdim) * broadcast


def _visible_mean(value: Tensor, mask: Tensor, dims: List[int], keepdim: bool) -> Tensor:
    """The mean over ``dims`` of the visible cells (0 where none)."""
    total = visible_spatial_sum(value, mask) if sorted(dims) == [2, 3] else None
    if total is None:
        total = (value * mask).sum(dims, keepdim=keepdim)
    elif not keepdim:
        total = total.flatten(2)[..., 0]
    return safe_divide(total, _visible_count(value, mask, dims, keepdim))


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
    x = require_masked(x, "max/min")
    kind = "amax" if getattr(op, "__name__", "") == "max" else "amin"
    bound = bind_arguments(args, kwargs, ("dim", "keepdim"), {"dim": None, "keepdim": False})
    if bound["dim"] is None:
        return _reduction(kind, getattr(torch, kind), x, (), {})
    dims, mask_out, spatial = _reduced(x, bound["dim"], bound["keepdim"])
    fill = lowest_value(x.value) if kind == "amax" else -lowest_value(x.value)
    value = fill_removed(x.value, x.mask, fill) if spatial else x.value
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
    x = require_masked(x, "a norm")
    first = "ord" if op is torch.linalg.vector_norm else "p"
    bound = bind_arguments(args, kwargs, (first, "dim", "keepdim"), {first: 2, "dim": None, "keepdim": False})
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
    x = require_masked(x, "a variance")
    bound = bind_arguments(
        args,
        kwargs,
        ("dim", "unbiased", "keepdim"),
        {"dim": None, "unbiased": None, "keepdim": False, "correction": None},
    )
    keepdim = bound["keepdim"]
    dims, mask_out, spatial = _reduced(x, bound["dim"], keepdim)
    if not spatial or all_visible(x.mask):  # the operation itself: a full mask gives the model's own result
        return Masked(op(x.value, *args, **kwargs), mask_out)
    correction = bound["correction"]
    if correction is None:
        correction = 1 if bound["unbiased"] in (None, True) else 0
    mean_value = _visible_mean(x.value, x.mask, dims, keepdim=True)
    count = _visible_count(x.value, x.mask, dims, keepdim)
    squares = (((x.value - mean_value) * x.mask) ** 2).sum(dims, keepdim=keepdim)
    value = safe_divide(squares, (count - correction).clamp(min=0))
    return Masked(value.sqrt() if root else value, mask_out)
