"""Quantus: :class:`LayerMaskRemoval`, a ``perturb_func`` that removes features with layer masking.

Quantus's faithfulness metrics remove the features an explanation ranks highest with their ``perturb_func``
(a baseline colour, a blur, ROAD's noisy linear imputation) and call ``model.predict`` on the result. With
``perturb_func=LayerMaskRemoval()`` the removed features become NaN, and the model :class:`NaNMasked` runs
the layer-masked model without them::

    model = NaNMasked(layer_masked(net))
    metric = quantus.RegionPerturbation(patch_size=8, regions_evaluation=50, perturb_func=LayerMaskRemoval())
    scores = metric(model=model, x_batch=x, y_batch=y, a_batch=a, device="cpu")

It follows the three ways Quantus 0.6 calls a ``perturb_func``: flat indices per image of a batch
(``PixelFlipping``, ``RegionPerturbation``, ``Selectivity``, ...), a boolean mask (``IROF``), and pixel indices of
one image (``ROAD``, as its noisy linear imputation reads them). A step that removes some channels of a pixel and
not others raises :class:`~captum_layermask.interop.ChannelSplitError` when the model is called.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..core.errors import LayerMaskError, MaskShapeError
from .arrays import PLAIN_MODEL_GUARD, NaNMasked

__all__ = ["LayerMaskRemoval", "NaNMasked"]


class LayerMaskRemoval:
    """A Quantus ``perturb_func``: returns a copy of ``arr`` whose removed features are NaN.

    Quantus passes its own keyword arguments (``perturb_baseline``, ``noise``, ``indexed_axes``); they describe
    fills and are not used. While this object exists, a plain model (not :class:`NaNMasked`) that receives NaN
    pixels raises :class:`~captum_layermask.LayerMaskError` instead of returning NaN.
    """

    def __init__(self) -> None:
        PLAIN_MODEL_GUARD.acquire(self)

    def __call__(
        self, arr: np.ndarray, indices: Any = None, mask: Optional[np.ndarray] = None, **kwargs: Any
    ) -> np.ndarray:
        out = np.array(arr, dtype=np.result_type(arr.dtype, np.float32), copy=True)
        if mask is not None:  # IROF: (B, 1, H, W) or the shape of arr
            out[np.broadcast_to(np.asarray(mask, dtype=bool), out.shape)] = np.nan
        elif indices is None:
            raise LayerMaskError("LayerMaskRemoval needs the indices or the mask of the features to remove.")
        elif out.ndim == 2 and np.ndim(indices) == 2:  # a batch of flattened images, indices per image
            out[np.arange(len(out))[:, None], np.asarray(indices)] = np.nan
        elif out.ndim == 3 and np.ndim(indices) == 1:  # ROAD: one (C, H, W) image, pixel indices in all channels
            pixels = out.reshape(out.shape[0], -1)
            indices = np.asarray(indices, dtype=np.int64)
            if indices.size and indices.max() >= pixels.shape[1]:
                raise MaskShapeError(
                    f"ROAD asked to remove index {int(indices.max())} of an image of {pixels.shape[1]} pixels: Quantus "
                    "0.6's ROAD ranks the attribution broadcast over every channel but removes pixels, so it fails on "
                    "multi-channel images (with its own imputation too); use it on single-channel inputs."
                )
            pixels[:, indices] = np.nan
        else:
            raise LayerMaskError(
                f"LayerMaskRemoval does not know this call: an array of shape {arr.shape} with indices of "
                f"{np.ndim(indices)} dimension(s); it follows PixelFlipping, RegionPerturbation, Selectivity, IROF and ROAD."
            )
        return out

    def __repr__(self) -> str:
        return "LayerMaskRemoval()"
