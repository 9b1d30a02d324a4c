"""Tensor primitives of layer masking: neighbor padding (Algorithm 1) and mask propagation (section 3.2).

Masks are 4-D tensors of shape ``(N, 1, H, W)`` (``N`` may be 1 and broadcast over the batch) holding 1 for
visible cells and 0 for removed ones, in a floating dtype.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

IntPair = Union[int, Tuple[int, int], Sequence[int]]


def _pair(value: IntPair) -> Tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


def box_sum_3x3(x: Tensor) -> Tensor:
    r"""Sum of every cell's 3x3 neighbourhood, zero outside the image.

    This is ``x * f`` of Algorithm 1 with :math:`f = \mathbf{1}_{3\times3}` and zero padding, computed as a
    vertical then a horizontal pass of shifted additions: exact, and on CPU as fast as a depthwise convolution
    for many channels and an order of magnitude faster for few. The vertical pass shifts each ``H * W`` plane,
    flattened, by one row, so that every addition runs over long contiguous memory.

    Args:
        x (Tensor): shape ``(..., H, W)``.

    Returns:
        Tensor of the shape of ``x``.
    """
    if torch.is_grad_enabled() and x.requires_grad:  # in-place updates of fresh tensors: autograd follows them
        height, width = x.shape[-2:]
        planes = x.reshape(-1, height * width)
        columns = planes.clone()
        columns[:, width:] += planes[:, :-width]
        columns[:, :-width] += planes[:, width:]
        columns = columns.view(x.shape)
        total = columns.clone()
        total[..., 1:] += columns[..., :-1]
        total[..., :-1] += columns[..., 1:]
        return total
    x = x.contiguous()
    return _box_sum_into(x, torch.empty_like(x), torch.empty_like(x))


def _box_sum_into(x: Tensor, columns: Tensor, total: Tensor) -> Tensor:
    """``box_sum_3x3`` written into preallocated contiguous buffers (no autograd): two passes per direction."""
    height, width = x.shape[-2:]
    planes, column_planes = x.view(-1, height * width), columns.view(-1, height * width)
    torch.add(planes[:, width:], planes[:, :-width], out=column_planes[:, width:])
    column_planes[:, :width].copy_(planes[:, :width])
    column_planes[:, :-width].add_(planes[:, width:])
    torch.add(columns[..., 1:], columns[..., :-1], out=total[..., 1:])
    total[..., :1].copy_(columns[..., :1])
    total[..., :-1].add_(columns[..., 1:])
    return total


def neighbor_pad(x: Tensor, mask: Tensor, width: int) -> Tensor:
    r"""Neighbor padding, :math:`\mathrm{Pad}_k(\mathbf{x}, \mathbf{m})` of Algorithm 1 (paper section 3.1).

    Removed cells are filled ring by ring from the visible region: at each of the ``width`` iterations, every
    removed cell adjacent (8-neighbourhood) to the cells known so far takes the average of its known neighbours.
    Visible cells keep their values; removed cells farther than ``width`` from any visible cell are 0.

    As in the paper, the input is first multiplied by the mask (:math:`\mathbf{x} \odot \mathbf{m}`), so the
    values of removed cells never reach the result as long as they are finite (``0 * inf`` is NaN):
    :func:`~captum_layermask.layer_masked` clears removed pixels once at the input for that reason. The paper's
    :math:`\epsilon = 10^{-8}` in the denominator is replaced by an exact division restricted to the cells being
    filled, which differs from it by at most a relative 1e-8.

    Args:
        x (Tensor): activations, shape ``(N, C, H, W)``, finite.
        mask (Tensor): shape ``(N, 1, H, W)`` or ``(1, 1, H, W)``; 1 (or True) for visible cells, 0 for removed.
        width (int): number of iterations :math:`k`, i.e. how many cells beyond the visible region get filled.

    Returns:
        Tensor of the shape and dtype of ``x``.

    Examples::

        >>> x = torch.tensor([[[[1.0, 2.0, 0.0]]]])
        >>> m = torch.tensor([[[[1.0, 1.0, 0.0]]]])
        >>> neighbor_pad(x, m, width=1)
        tensor([[[[1.0000, 2.0000, 2.0000]]]])
    """
    if not isinstance(width, int) or width < 0:
        raise ValueError(f"neighbor_pad width must be a non-negative int, got {width!r}.")
    if torch.compiler.is_exporting():  # one node per padded layer, for exporters to translate (ONNX: a function)
        return torch.ops.captum_layermask.neighbor_pad(x, mask.to(x.dtype), width)
    return _neighbor_pad(x, mask, width)


@torch.library.custom_op("captum_layermask::neighbor_pad", mutates_args=())
def _neighbor_pad_op(x: Tensor, mask: Tensor, width: int) -> Tensor:
    """``neighbor_pad`` as a torch custom op: how exported graphs (``torch.export``) show it."""
    return _neighbor_pad(x, mask, width)


@_neighbor_pad_op.register_fake
def _(x: Tensor, mask: Tensor, width: int) -> Tensor:
    return x.new_empty(x.shape)


def _neighbor_pad(x: Tensor, mask: Tensor, width: int) -> Tensor:
    known = (mask > 0).to(x.dtype)
    padded = (x * known).contiguous()
    buffers = None if torch.is_grad_enabled() and padded.requires_grad else (torch.empty_like(padded), torch.empty_like(padded))
    for _ in range(width):
        count = box_sum_3x3(known)
        grown = (count > 0).to(x.dtype)
        weight = (grown - known) / count.clamp(min=1)  # 1 / (number of known neighbours) on the new ring
        neighbours = box_sum_3x3(padded) if buffers is None else _box_sum_into(padded, *buffers)
        padded = padded.addcmul_(neighbours, weight)
        known = grown
    return padded


def conv_padding(
    kernel_size: IntPair, padding: Union[str, IntPair], dilation: IntPair = 1
) -> Tuple[int, int, int, int]:
    """Explicit ``(left, right, top, bottom)`` padding of a convolution, as ``F.pad`` takes it.

    Args:
        kernel_size: ``(kh, kw)`` or an int.
        padding: an int, a pair, or ``"same"`` / ``"valid"`` as ``torch.nn.Conv2d`` accepts.
        dilation: an int or a pair.

    Returns:
        A 4-tuple for ``torch.nn.functional.pad``.
    """
    kh, kw = _pair(kernel_size)
    dh, dw = _pair(dilation)
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        total_h, total_w = dh * (kh - 1), dw * (kw - 1)
        return (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
    ph, pw = _pair(padding)
    return (pw, pw, ph, ph)


_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def propagate_mask(
    mask: Tensor,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: Union[str, IntPair] = 0,
    dilation: IntPair = 1,
    padding_mode: str = "zeros",
) -> Tensor:
    r"""Output mask of a convolution: :math:`\mathrm{MaxPool}_k(\mathbf{m})` of paper section 3.2.

    An output cell is visible when at least one of the input cells its kernel reads is visible. Cells the
    convolution adds by its own padding count as removed for ``padding_mode="zeros"`` and as copies of the cells
    they repeat for the other modes.

    Args:
        mask (Tensor): shape ``(N, 1, H, W)``, 1 for visible cells.
        kernel_size, stride, padding, dilation, padding_mode: those of the convolution
            (as ``torch.nn.Conv2d`` takes them).

    Returns:
        Tensor of shape ``(N, 1, H_out, W_out)``, the convolution's output size.
    """
    pad = conv_padding(kernel_size, padding, dilation)
    if _pair(kernel_size) == (1, 1) and not any(pad):
        sh, sw = _pair(stride)
        return mask[..., ::sh, ::sw]
    if any(pad):
        mask = F.pad(mask, pad, mode=_PAD_MODES[padding_mode])
    return F.max_pool2d(mask, _pair(kernel_size), _pair(stride), 0, _pair(dilation))


def receptive_reach(kernel_size: IntPair, dilation: IntPair = 1) -> int:
    """Neighbor-padding width a kernel needs: the farthest distance between two cells it reads together.

    An output cell that is kept (at least one visible input) reads only cells within ``(k - 1) * d`` of that
    visible input, so padding this many rings reproduces the paper's width-k padding on every kept output.
    """
    kh, kw = _pair(kernel_size)
    dh, dw = _pair(dilation)
    return max((kh - 1) * dh, (kw - 1) * dw)
