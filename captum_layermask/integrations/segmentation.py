"""``RegionScores``: a segmentation model as per-class scores over a region, the target Captum's perturbation
methods explain (Captum's segmentation tutorial sums the logits of a class over its pixels,
``agg_segmentation_wrapper``; this is the mean over the region's *visible* pixels, so that removing input does not
shrink the score by itself)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..core.errors import LayerMaskError, MaskShapeError
from ..core.model import LayerMaskedModel, select_output


class RegionScores(nn.Module):
    """Per-class scores of a segmentation model over a region of its output: ``(N, C)``, for ``target=c``.

    For class ``c``, the score of an image is the mean of ``c``'s logit over the region's output pixels that
    are visible (``masked(x, return_mask=True)``, docs/masking.md#the-output-mask). A layer-masked model is
    called with ``return_mask=True``, so that Captum's ``LayerMask()`` baseline removes pixels and the mean runs
    over what is still computed from visible input; a plain model (for an ordinary baseline, to compare) counts
    every region pixel. A region without a visible output pixel scores 0 for every class (the value a
    layer-masked model gives a cell that no visible pixel reaches).

    Args:
        model (nn.Module): a segmentation model, layer-masked (:func:`~captum_layermask.layer_masked`) or
            plain, whose output (or its ``output`` part) is ``(N, C, H, W)`` logits.
        region (Tensor): the output pixels to score, bool or 0/1, ``(H, W)``, ``(1, 1, H, W)`` or one per image
            ``(N, 1, H, W)`` (repeated over the batches of ``perturbations_per_eval``).
        output (str or int, optional): the part of the model's output that holds the logits (``"out"`` for
            torchvision's segmentation models).

    Examples::

        >>> scores = RegionScores(layer_masked(model), region, output="out")
        >>> attr = Lime(scores).attribute(image, target=class_id, feature_mask=segments, baselines=LayerMask())
    """

    def __init__(self, model: nn.Module, region: Tensor, output: Optional[Any] = None) -> None:
        super().__init__()
        if region.ndim == 2:
            region = region[None, None]
        if region.ndim != 4 or region.shape[1] != 1:
            raise MaskShapeError(
                f"region must be (H, W), (1, 1, H, W) or (N, 1, H, W) output pixels, got shape {tuple(region.shape)}."
            )
        self.model, self.output = model, output
        self.register_buffer("region", region > 0, persistent=False)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Scores ``(N, C)`` of the images ``x`` (and the model's further inputs)."""
        if isinstance(self.model, LayerMaskedModel):
            output, visible = self.model(x, *args, return_mask=True, **kwargs)
            logits, visible = select_output(output, self.output), select_output(visible, self.output)
        else:
            logits = select_output(self.model(x, *args, **kwargs), self.output)
            visible = torch.ones((), dtype=torch.bool, device=x.device)
        if not isinstance(logits, Tensor) or logits.ndim != 4:
            raise LayerMaskError(
                f"RegionScores needs (N, C, H, W) logits, the model returns {_described(logits)}; choose the "
                'tensor with output= ("out" for torchvision\'s segmentation models).'
            )
        weights = (self._region_for(logits) & visible).to(logits.dtype)
        count = weights.sum(dim=(2, 3))
        total = (logits * weights).sum(dim=(2, 3))
        return torch.where(count > 0, total / count.clamp_min(1), 0)

    def _region_for(self, logits: Tensor) -> Tensor:
        region, batch = self.region, logits.shape[0]
        if region.shape[-2:] != logits.shape[-2:]:
            raise MaskShapeError(
                f"the region is {tuple(region.shape[-2:])} pixels but the model's output is "
                f"{tuple(logits.shape[-2:])}; give the region in output pixels."
            )
        if region.shape[0] not in (1, batch):
            if batch % region.shape[0]:
                raise MaskShapeError(
                    f"{region.shape[0]} regions (one per image) do not fit a batch of {batch} outputs."
                )
            region = region.repeat(batch // region.shape[0], 1, 1, 1)  # Captum tiles the inputs per evaluation
        return region.to(logits.device)


def _described(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return f"a dict with keys {list(value)}"
    return type(value).__name__
