"""Tensor primitives of layer masking: neighbor padding (Algorithm 1) and mask propagation (section 3.2).

Masks are 4-D tensors of shape ``(N, 1, H, W)`` (``N`` may be 1 and broadcast over the batch) holding 1 for
visible cells and 0 for removed ones, in a floating dtype.
"""

from __future__ import annotations

import functools
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .native import native_neighbor_pad

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
    :math:`\epsilon = 10^{-8}` in the denominator is left out: each filled cell is the sum of its known
    neighbours times 1 / (their number), which only the cells being filled receive (float rounding apart, the
    paper's value to a relative 1e-8).

    On the CPU, without autograd, it runs as the compiled operation of :mod:`~captum_layermask.core.native`
    where that builds (the same values to float rounding; channels-last activations stay channels-last).

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
    return _neighbor_pad(x, mask, width)[0]


@torch.library.custom_op("captum_layermask::neighbor_pad", mutates_args=())
def _neighbor_pad_op(x: Tensor, mask: Tensor, width: int) -> Tensor:
    """``neighbor_pad`` as a torch custom op: how exported graphs (``torch.export``) show it."""
    return _neighbor_pad(x, mask, width)[0]


@_neighbor_pad_op.register_fake
def _(x: Tensor, mask: Tensor, width: int) -> Tensor:
    return x.new_empty(x.shape)


class _Ring(NamedTuple):
    count: Tensor
    """``uint8``: the number of known cells in each cell's 3x3 neighbourhood before this ring."""
    known: Tensor
    """Bool, True on the cells known before this ring."""
    grown: Tensor
    """Bool, True on the cells known after it: the mask dilated once more (3x3 window, zero outside)."""

    def weights(self, dtype: torch.dtype) -> Tensor:
        """1 / (number of known neighbours) on the ring's cells, 0 elsewhere."""
        return self.count.to(dtype).clamp_(min=1).reciprocal_().mul_(self.grown ^ self.known)


def _rings(mask: Tensor, width: int) -> Iterator[_Ring]:
    """The rings of Algorithm 1, innermost first; each tensor has the mask's shape.

    Ring ``r`` is the set of cells first reached at iteration ``r``. The counts are kept in ``uint8`` (at most
    9), so that this mask-only work stays small next to the padding of the activations.
    """
    known = (mask > 0).contiguous()
    columns = torch.empty(known.shape, dtype=torch.uint8, device=known.device)
    total = torch.empty_like(columns)
    for _ in range(width):
        count = _box_sum_into(known.view(torch.uint8), columns, total)
        grown = count > 0
        yield _Ring(count, known, grown)
        known = grown


def _neighbor_pad(
    x: Tensor,
    mask: Tensor,
    width: int,
    grow: Optional[int] = None,
    stride: Tuple[int, int] = (1, 1),
    overwrite: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """``neighbor_pad``, and with ``grow`` the mask grown by that many rings and subsampled by ``stride`` (in the
    mask's dtype): the output mask of a centred convolution of radius ``grow``. With ``overwrite`` the compiled
    padding may pad ``x`` itself (see :func:`pad_for_convolution`).

    After ``max(H, W) - 1`` rings every cell of the grid is within reach of any visible cell (Chebyshev distance),
    so later rings are empty: they are not computed (a dilated convolution on a small map, DeepLab's atrous
    pyramid at rate 36 on a 14x14 map, asks for 72), and the mask they would give is the last one. On the CPU the
    compiled padding of :mod:`~captum_layermask.core.native` runs where it loads; the PyTorch passes otherwise.
    """
    computed = min(width, max(x.shape[-2:]) - 1)
    native = native_neighbor_pad(x, mask, computed, grow or 0, stride, overwrite) if computed > 0 else None
    if native is not None:
        return native[0], (native[1] if grow is not None else None)
    padded = (x * (mask > 0)).contiguous()
    grown: List[Tensor] = []
    if torch.is_grad_enabled() and padded.requires_grad:
        for ring in _rings(mask, computed):
            padded = padded + box_sum_3x3(padded) * ring.weights(x.dtype)
            grown.append(ring.grown)
        return padded, _reached(grown, mask, grow, stride)
    height, row = padded.shape[-2:]
    columns = torch.empty_like(padded)
    planes, column_planes = padded.view(-1, height * row), columns.view(-1, height * row)
    for ring in _rings(mask, computed):
        # vertical pass of the box sum, then its horizontal pass added straight into the ring cells
        torch.add(planes[:, row:], planes[:, :-row], out=column_planes[:, row:])
        column_planes[:, :row].copy_(planes[:, :row])
        column_planes[:, :-row].add_(planes[:, row:])
        weight = ring.weights(x.dtype)
        padded[..., 1:].addcmul_(columns[..., :-1], weight[..., 1:])
        padded.addcmul_(columns, weight)
        padded[..., :-1].addcmul_(columns[..., 1:], weight[..., :-1])
        grown.append(ring.grown)
    return padded, _reached(grown, mask, grow, stride)


def _reached(grown: List[Tensor], mask: Tensor, rings: Optional[int], stride: Tuple[int, int]) -> Optional[Tensor]:
    """The mask after ``rings`` rings (``grown`` holds the masks after each computed ring; the rings not computed
    leave the last), subsampled by ``stride``, in the mask's dtype; ``None`` without ``rings``."""
    if rings is None:
        return None
    after = grown[min(rings, len(grown)) - 1] if grown and rings > 0 else mask > 0
    return after[..., :: stride[0], :: stride[1]].to(mask.dtype)


def all_visible(mask: Tensor) -> bool:
    """Whether no cell of ``mask`` is removed; always ``False`` while compiling, exporting or tracing, so that
    exported and compiled graphs keep the masked computation (their control flow cannot depend on values)."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return False
    return bool(mask.all())


def centred_radius(
    kernel_size: IntPair, padding: Union[str, IntPair], dilation: IntPair = 1, padding_mode: str = "zeros"
) -> Optional[int]:
    """``(k - 1) / 2`` for an odd, square, undilated kernel zero-padded by that much on each side, else None.

    Such a convolution's output mask is its input mask dilated that many times (3x3 window), then subsampled by
    the stride.
    """
    kh, kw = _pair(kernel_size)
    if kh != kw or kh % 2 == 0 or _pair(dilation) != (1, 1) or padding_mode != "zeros":
        return None
    radius = (kh - 1) // 2
    return radius if conv_padding(kernel_size, padding) == (radius,) * 4 else None


def pad_for_convolution(
    x: Tensor,
    mask: Tensor,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: Union[str, IntPair] = 0,
    dilation: IntPair = 1,
    padding_mode: str = "zeros",
    *,
    rings: Optional[int] = None,
    overwrite: bool = False,
) -> Tuple[Tensor, Tensor]:
    r"""A convolution's neighbor-padded input and its output mask (section 3.2), sharing the mask work.

    The padding width is the kernel's reach ``(k - 1) * dilation`` (see :func:`receptive_reach`), or ``rings``
    when fewer are read: :func:`~captum_layermask.core.demand.padding_rings` finds convolutions whose outer kept
    outputs are never read (the last convolution of a residual block), and with ``rings=0`` the input is used as
    it is. For the common centred kernel (odd, square, undilated, zero padding ``(k - 1) / 2``), the output mask
    is the input mask dilated ``(k - 1) / 2`` times and subsampled by the stride, a dilation the padding has
    already computed (and with a full mask, in eager mode, the input is used as it is); otherwise it is
    :func:`propagate_mask`.

    Args:
        x (Tensor): activations ``(N, C, H, W)``, finite.
        mask (Tensor): ``(N, 1, H, W)`` or ``(1, 1, H, W)``, 1 for visible cells.
        kernel_size, stride, padding, dilation, padding_mode: those of the convolution.
        rings (int, optional): pad at most this many rings.
        overwrite (bool): let the compiled padding write the rings into ``x`` itself instead of a copy (its ring
            cells are filled, its other removed cells keep their values): for an ``x`` whose removed cells
            nothing reads as they were, which the layer rules guarantee (they read visible cells only).

    Returns:
        ``(padded, output_mask)``: ``padded`` of the shape of ``x``; ``output_mask`` of shape
        ``(N, 1, H_out, W_out)`` in ``mask``'s dtype.
    """
    reach, radius = _padding_plan(_hashable(kernel_size), _hashable(padding), _hashable(dilation), padding_mode)
    width = reach if rings is None else min(rings, reach)
    if reach == 0 or torch.compiler.is_exporting():
        padded = neighbor_pad(x, mask, width) if width else x
        return padded, propagate_mask(mask, kernel_size, stride, padding, dilation, padding_mode)
    if radius is None:  # an output mask of its own (an even, dilated or off-centre kernel)
        padded = x if not width or all_visible(mask) else _neighbor_pad(x, mask, width, overwrite=overwrite)[0]
        return padded, propagate_mask(mask, kernel_size, stride, padding, dilation, padding_mode)
    sh, sw = _pair(stride)
    if all_visible(mask):  # nothing to pad: the layer's own input, and a full output mask
        return x, mask[..., ::sh, ::sw]
    if width >= radius:
        return _neighbor_pad(x, mask, width, radius, (sh, sw), overwrite)
    # fewer rings padded than the output mask grows by
    padded = _neighbor_pad(x, mask, width, overwrite=overwrite)[0] if width else x
    return padded, _reached([ring.grown for ring in _rings(mask, radius)], mask, radius, (sh, sw))


def _hashable(value: Union[str, IntPair]) -> Union[str, int, Tuple[int, ...]]:
    return value if isinstance(value, (str, int)) else tuple(int(item) for item in value)


@functools.lru_cache(maxsize=1024)
def _padding_plan(
    kernel_size: IntPair, padding: Union[str, IntPair], dilation: IntPair, padding_mode: str
) -> Tuple[int, Optional[int]]:
    """``receptive_reach`` and ``centred_radius`` of a convolution, computed once per geometry (every call of a
    convolution rule asks)."""
    return receptive_reach(kernel_size, dilation), centred_radius(kernel_size, padding, dilation, padding_mode)


def conv_padding(
    kernel_size: IntPair, padding: Union[str, IntPair], dilation: IntPair = 1
) -> Tuple[int, int, int, int]:
    """Explicit ``(left, right, top, bottom)`` padding of a convolution, as ``F.pad`` takes it.

    Args:
        kernel_size: ``(kh, kw)`` or an int.
        padding: an int, a pair, or ``"same"`` / ``"valid"`` as ``torch.nn.Conv2d`` accepts, or an explicit
            ``(left, right, top, bottom)`` (asymmetric "same" padding, as TensorFlow ports compute it).
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
    if not isinstance(padding, int) and len(padding) == 4:
        left, right, top, bottom = (int(width) for width in padding)
        return (left, right, top, bottom)
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
    they repeat for the other modes. Computed as a count of the visible cells in each window (a convolution with
    a kernel of ones), which is exact and on CPU several times faster than max pooling for large kernels.

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
    left, right, top, bottom = pad
    symmetric = padding_mode == "zeros" and left == right and top == bottom
    if any(pad) and not symmetric:
        mask = F.pad(mask, pad, mode=_PAD_MODES[padding_mode])
    window = torch.ones((1, 1, *_pair(kernel_size)), dtype=mask.dtype, device=mask.device)
    count = F.conv2d(mask, window, None, _pair(stride), (top, left) if symmetric else 0, _pair(dilation))
    return (count > 0).to(mask.dtype)


def receptive_reach(kernel_size: IntPair, dilation: IntPair = 1) -> int:
    """Neighbor-padding width a kernel needs: the farthest distance between two cells it reads together.

    An output cell that is kept (at least one visible input) reads only cells within ``(k - 1) * d`` of that
    visible input, so padding this many rings reproduces the paper's width-k padding on every kept output.
    """
    kh, kw = _pair(kernel_size)
    dh, dw = _pair(dilation)
    return max((kh - 1) * dh, (kw - 1) * dw)
