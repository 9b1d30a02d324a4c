"""Residual sums under ``layer_masked(residual="union")``: every visible cell of either summand is kept (the
paper's intersection rule is :func:`~captum_layermask.core.rules.pointwise.pointwise`)."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..masked import Masked, is_masked
from ..primitives import neighbor_pad
from .pointwise import pointwise

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
