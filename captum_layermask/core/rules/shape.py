"""Shape operations: reshapes, permutes, rolls, repeats, indexing, concatenation and splits move the mask with the
values; metadata reads (``x.shape``, ``x.size()``) do not depend on pixel values."""

from __future__ import annotations

import operator
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..errors import UnsupportedLayerError
from ..masked import Masked, align_rank, intersect, is_masked, masks_of, unwrap
from ..registry import builtin_rule
from .common import (
    bind_arguments,
    require_masked,
)


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
    x = require_masked(x, "a reshape")
    args, kwargs = unwrap(args), unwrap(kwargs)  # reshape_as/view_as take a tensor
    value = op(x.value, *args, **kwargs)
    groups = _dim_groups(x.value.shape, value.shape)
    mask = _batch_expanded(x, groups[0][0])
    mask_shape: List[int] = []
    merged: List[int] = []
    constant: List[int] = []
    for source, target in groups:
        if all(mask.shape[d] == 1 for d in source):
            mask_shape += [1] * len(target)
        elif all(mask.shape[d] == x.value.shape[d] for d in source):
            mask_shape += [value.shape[d] for d in target]
        elif suffix := _constant_suffix(mask.shape, x.value.shape, source, value.shape, target):
            mask = mask.expand(*[x.value.shape[d] if d in source else n for d, n in enumerate(mask.shape)])
            mask_shape += [value.shape[d] for d in target]
            constant += target[len(target) - suffix :]
        else:
            merged += source
            mask_shape += [1] * len(target)
    if merged:
        value = op(x.value * mask, *args, **kwargs)
        mask = mask.amax(merged, keepdim=True)
    mask = mask.reshape(mask_shape)
    if constant:
        mask = mask[tuple(slice(0, 1) if d in constant else slice(None) for d in range(mask.ndim))]
    return Masked(value, mask)


def _constant_suffix(
    mask: Sequence[int], source: Sequence[int], group: List[int], target: Sequence[int], target_group: List[int]
) -> int:
    """For a group whose mask varies along its leading dimensions only (full sizes, then size 1: a batch merged
    with features, ``(N, E) -> (N * heads, E / heads)`` in attention written out), the number of trailing target
    dimensions along which the reshaped mask is constant; 0 for any other pattern, which the caller treats as a
    merge of the group.

    The mask depends on the flat index through ``index // P`` (``P``: the size of the source dimensions where it
    is 1), so it is constant along a trailing block of target dimensions whose size divides ``P``.
    """
    ones = [mask[d] == 1 for d in group]
    if True not in ones or False in ones[ones.index(True) :]:
        return 0
    if any(mask[d] != source[d] for d in group[: ones.index(True)]):
        return 0
    period = 1
    for d in group[ones.index(True) :]:
        period *= source[d]
    suffix, size = 0, 1
    for d in reversed(target_group):
        if period % (size * target[d]):
            break
        size *= target[d]
        suffix += 1
    return suffix


@builtin_rule(
    torch.permute, torch.transpose, torch.swapaxes, torch.movedim, "permute", "transpose", "swapaxes", "movedim"
)
def reorder(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Dimension permutations apply to the mask as they do to the value."""
    x = require_masked(x, "a permutation")
    return Masked(op(x.value, *args, **kwargs), op(x.mask, *args, **kwargs))


@builtin_rule(torch.roll, "roll")
def roll(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """A cyclic shift (Swin's shifted windows): the mask shifts with the value; along a channel dimension
    (mask size 1) it stays as it is."""
    x = require_masked(x, "a roll")
    if bind_arguments(args, kwargs, ("shifts", "dims"), {"dims": None})["dims"] is None:
        raise UnsupportedLayerError("torch.roll without dims (it flattens the tensor); pass dims=.")
    return Masked(op(x.value, *args, **kwargs), op(x.mask, *args, **kwargs))


@builtin_rule(torch.repeat_interleave, "repeat_interleave")
def repeat_interleave(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Repeating slices along a dimension (GCViT's global query, repeated for each window): the mask repeats
    alike along a spatial dimension, and stays as it is along one it broadcasts over."""
    x = require_masked(x, "repeat_interleave")
    bound = bind_arguments(args, kwargs, ("repeats", "dim"), {"dim": None})
    if bound["dim"] is None or is_masked(bound["repeats"]):
        raise UnsupportedLayerError(
            "repeat_interleave without dim (it flattens the tensor), or with image-dependent repeats."
        )
    dim = bound["dim"] % x.value.ndim
    mask = align_rank(x.mask, x.value.ndim)
    if mask.shape[dim] != 1:
        mask = op(mask, *args, **kwargs)
    return Masked(op(x.value, *args, **kwargs), mask)


@builtin_rule("repeat")
def repeat(op: Any, x: Any, *sizes: Any) -> Masked:
    """Tiling (``x.repeat(1, tokens, 1)``: SwiftFormer's global query, repeated for every token): the mask tiles
    alike along a dimension it varies over, and stays size 1 along one it broadcasts over (tiles of one
    broadcast cell are all alike)."""
    x = require_masked(x, "repeat")
    counts = sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)) else sizes
    if is_masked(counts):
        raise UnsupportedLayerError("repeat with image-dependent counts.")
    value = op(x.value, *sizes)
    mask = align_rank(x.mask, len(counts))
    shape = (1,) * (len(counts) - x.value.ndim) + tuple(x.value.shape)
    mask = mask.repeat(*[n if mask.shape[d] == shape[d] else 1 for d, n in enumerate(counts)])
    return Masked(value, mask)


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
    dim = bind_arguments(args, kwargs, ("dim",), {"dim": 0})["dim"] % value.ndim
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
    x = require_masked(x, "a split")
    names = ("dim",) if name == "unbind" else ("sections", "dim")
    dim = bind_arguments(args, kwargs, names, {"dim": 0})["dim"] % x.value.ndim
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
