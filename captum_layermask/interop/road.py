"""ROAD's reference code (tleemann/road_evaluation): :class:`LayerMaskImputer`, an imputer to its interface.

ROAD removes the pixels an explanation ranks highest (or lowest), fills them with an imputer, normalises and
measures accuracy. Its imputers are ``imputer(img (C, H, W), mask (H, W))`` and
``imputer.batched_call(img (B, C, H, W), mask (B, H, W))``, with mask 1 where the pixel is present. This one
marks removed pixels NaN in every channel (a NaN survives the normalisation ROAD applies afterwards), and the
model given to ROAD is :class:`~captum_layermask.interop.NaNMasked`, which runs the layer-masked model on the
present pixels only::

    run_road(NaNMasked(layer_masked(model)), dataset, explanations, transform, percentages,
             imputation=LayerMaskImputer())
"""

from __future__ import annotations

from torch import Tensor

from ..core.errors import MaskShapeError
from .arrays import PLAIN_MODEL_GUARD, NaNMasked, check_no_nan

__all__ = ["LayerMaskImputer", "NaNMasked"]


class LayerMaskImputer:
    """A ROAD imputer that removes pixels for a layer-masked model instead of filling them.

    While it exists, a plain model (not :class:`~captum_layermask.interop.NaNMasked`) that receives its NaN
    pixels raises :class:`~captum_layermask.LayerMaskError`.
    """

    def __init__(self) -> None:
        PLAIN_MODEL_GUARD.acquire(self)

    def __call__(self, img: Tensor, mask: Tensor) -> Tensor:
        """``img`` ``(C, H, W)`` with the pixels where ``mask`` ``(H, W)`` is 0 set to NaN in every channel."""
        if img.ndim != 3 or tuple(mask.shape) != tuple(img.shape[-2:]):
            raise MaskShapeError(
                f"expected img (C, H, W) and mask (H, W), got {tuple(img.shape)} and {tuple(mask.shape)}."
            )
        return self.batched_call(img[None], mask[None])[0]

    def batched_call(self, img: Tensor, mask: Tensor) -> Tensor:
        """``img`` ``(B, C, H, W)`` with the pixels where ``mask`` ``(B, H, W)`` is 0 set to NaN."""
        if img.ndim != 4 or tuple(mask.shape) != (img.shape[0], *img.shape[-2:]):
            raise MaskShapeError(
                f"expected img (B, C, H, W) and mask (B, H, W), got {tuple(img.shape)} and {tuple(mask.shape)}."
            )
        check_no_nan(img, "the image ROAD imputes")
        present = (mask != 0)[:, None].to(img.device)
        img = img if img.is_floating_point() else img.float()
        return img.masked_fill(~present, float("nan"))

    def __repr__(self) -> str:
        return "LayerMaskImputer()"
