"""torchvision's Swin Transformer under layer masking: window attention over visible tokens, patch merging.

Imported the first time a model with a torchvision submodule is converted (``captum_layermask`` registers it with
:func:`~captum_layermask.register_rule_set`). torchvision marks ``shifted_window_attention`` and
``_patch_merging_pad`` as ``torch.fx`` leaves, so each is one node of the traced graph; the rules below give
them the meaning of token dropping (docs/layer-rules.md, "Vision transformers"). ViT's ``EncoderBlock`` is a
token block: chains of them run on the visible tokens only (:mod:`~captum_layermask.core.gathering`).
``torchvision.ops.stochastic_depth`` (the identity in eval mode) takes the per-cell rule here, not in the core,
so that importing the package does not import torchvision. Everything else in torchvision's classifiers (MaxViT,
the CNNs) is traced into and masked by the core rules.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.swin_transformer import _patch_merging_pad, shifted_window_attention
from torchvision.models.vision_transformer import EncoderBlock
from torchvision.ops.stochastic_depth import stochastic_depth

from ..core.errors import UnsupportedLayerError
from ..core.gathering import register_token_block
from ..core.masked import Masked, align_rank
from ..core.primitives import neighbor_pad
from ..core.registry import builtin_rule
from ..core.rules import bind_arguments, lowest_value, require_feature_dims, require_masked
from ..core.rules.pointwise import pointwise

_WINDOW_ARGS = (
    "qkv_weight",
    "proj_weight",
    "relative_position_bias",
    "window_size",
    "num_heads",
    "shift_size",
    "attention_dropout",
    "dropout",
    "qkv_bias",
    "proj_bias",
    "logit_scale",
    "training",
)


def _windowed_keys(mask: Tensor, window_size: Sequence[int], shift_size: Sequence[int]) -> Tensor:
    """Each window's visible keys, laid out as ``shifted_window_attention`` lays out its windows.

    Args:
        mask (Tensor): token mask, shape ``(B, H, W)``, booleans.

    Returns:
        Tensor of shape ``(B * windows, 1, 1, window_size[0] * window_size[1])``: True for visible keys. The
        zero tokens the function pads to a multiple of the window take the mask of the edge token next to
        them, as constant padding does everywhere (the ``F.pad`` rule).
    """
    height, width = mask.shape[1:]
    pad_bottom, pad_right = (-height) % window_size[0], (-width) % window_size[1]
    mask = F.pad(mask[:, None].float(), (0, pad_right, 0, pad_bottom), mode="replicate")[:, 0] > 0
    padded = mask.shape[1:]
    shifts = [0 if window >= size else shift for window, size, shift in zip(window_size, padded, shift_size)]
    if sum(shifts) > 0:
        mask = torch.roll(mask, shifts=(-shifts[0], -shifts[1]), dims=(1, 2))
    rows, columns = padded[0] // window_size[0], padded[1] // window_size[1]
    mask = mask.view(-1, rows, window_size[0], columns, window_size[1]).permute(0, 1, 3, 2, 4)
    return mask.reshape(-1, 1, 1, window_size[0] * window_size[1])


@builtin_rule(shifted_window_attention)
def window_attention(op: Any, x: Any, *args: Any, **kwargs: Any) -> Masked:
    """Swin's (shifted) window attention over the visible tokens of each window (token dropping).

    Removed keys get a score of the lowest finite number added to the relative position bias, so their weight is
    exactly 0 and the visible keys of the window share the softmax as if the removed tokens did not exist; the
    shift's own attention mask and the window padding stay as in the model. A token keeps its mask (its own key
    is in its window); a window with no visible token gives finite values that its removed tokens carry unread.
    """
    x = require_masked(x, "window attention")
    require_feature_dims(x, [-1], "window attention")
    bound = bind_arguments(args, kwargs, _WINDOW_ARGS, {"attention_dropout": 0.0, "dropout": 0.0, "training": True})
    if bound["training"]:
        raise UnsupportedLayerError("window attention in training mode (dropout); call .eval() on the model.")
    if any(isinstance(item, Masked) for item in bound.values()):
        raise UnsupportedLayerError("window attention whose weights or bias depend on the image.")
    batch = x.value.shape[0]
    tokens = align_rank(x.mask, 4)[..., 0].expand(batch, *x.value.shape[1:3]) > 0
    keys = _windowed_keys(tokens, bound["window_size"], bound["shift_size"])
    removed = torch.zeros(keys.shape, dtype=x.value.dtype, device=keys.device).masked_fill(~keys, lowest_value(x.value))
    bound["relative_position_bias"] = bound["relative_position_bias"] + removed
    return Masked(op(x.value, **bound), x.mask)


def _merged_mask(mask: Tensor) -> Tensor:
    """``(B, H, W)`` token mask -> ``(B, ceil(H/2), ceil(W/2))``: visible where any token of the 2x2 block is."""
    padded = F.pad(mask[:, None], (0, mask.shape[2] % 2, 0, mask.shape[1] % 2))
    return F.max_pool2d(padded, 2)[:, 0]


@builtin_rule(_patch_merging_pad)
def patch_merging(op: Any, x: Any) -> Masked:
    """Swin's patch merging (the 2x2 blocks of ``(B, H, W, C)`` tokens concatenated into ``(B, H/2, W/2, 4C)``,
    before a linear layer): a 2x2, stride-2 convolution, under the convolution rule. A merged token is visible
    if any of its four tokens is; removed ones among them are neighbor-padded from the visible ones
    (Algorithm 1, one ring reaches every cell of a block); the odd-size padding stays zeros, as in the model."""
    x = require_masked(x, "patch merging")
    require_feature_dims(x, [-1], "patch merging")
    mask = align_rank(x.mask, 4)[..., 0]
    filled = neighbor_pad(x.value.permute(0, 3, 1, 2), mask[:, None], 1).permute(0, 2, 3, 1)
    return Masked(op(filled), _merged_mask(mask)[..., None])


builtin_rule(stochastic_depth, per_cell="intersection")(pointwise)  # the identity in eval mode
register_token_block(EncoderBlock)  # LayerNorm, nn.MultiheadAttention, MLP: nothing reads a token's position


from . import torchvision_detection  # noqa: E402,F401  (the detectors' rules and part models)
