"""shap: :class:`LayerMaskImage`, a masker that removes pixels with layer masking.

A shap masker is a callable ``masker(mask, x) -> model arguments``. ``shap.maskers.Image`` fills the masked
values (a colour, a blur, inpainting) and hands the model one image; :class:`LayerMaskImage` hands it the image
and the mask of kept pixels, and the model function is a layer-masked model that takes both
(:class:`~captum_layermask.interop.ArrayModel`)::

    masked = layer_masked(model)
    explainer = shap.Explainer(ArrayModel(masked, mean=MEAN, std=STD), LayerMaskImage((224, 224, 3)))
    values = explainer(images, max_evals=500, batch_size=50)   # images (N, 224, 224, 3); values (N, 224, 224, 1, K)
    shap.image_plot(values)

Its features are pixels, all channels of a pixel together (layer masking removes whole pixels), split by the
same axis-aligned partition tree as ``shap.maskers.Image``; shap's values come out ``(H, W, 1)`` per output (one
channel: the value of the whole pixel), the layout ``shap.image_plot`` draws.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

try:
    import shap
except ImportError:
    raise ImportError("the shap adapter needs shap: pip install 'captum-layermask[tools]'.") from None

from ..core.errors import MaskShapeError
from .arrays import check_no_nan


class LayerMaskImage(shap.maskers.Masker):
    """A shap masker for images explained with layer masking: the model receives ``(images, keep)``.

    Args:
        shape (tuple): ``(H, W, C)`` of the images explained (channels last, as ``shap.maskers.Image``).

    The model function must take ``(images (N, H, W, C), keep (N, H, W) bool)``:
    :class:`~captum_layermask.interop.ArrayModel` of a layer-masked model does.
    """

    def __init__(self, shape: Sequence[int]) -> None:
        if len(shape) != 3:
            raise MaskShapeError(f"shape is (H, W, C) of the images, got {tuple(shape)}.")
        self.input_shape: Tuple[int, int, int] = tuple(int(s) for s in shape)  # type: ignore[assignment]
        height, width, _ = self.input_shape
        self.shape = (1, height * width)  # one sample per mask, one feature per pixel
        self.clustering = shap.maskers.Image(0.0, (height, width, 1)).clustering  # shap's tree, over pixels
        self.image_data = True
        self.immutable_outputs = True
        self.fixed_background = False

    def __call__(self, mask: Optional[Any], x: Any) -> Tuple[np.ndarray, np.ndarray]:
        """``(x[None], keep[None])``: the image unchanged and the pixels the mask keeps, ``(1, H, W)``."""
        x = np.asarray(x.cpu().numpy() if hasattr(x, "cpu") else x)
        if x.shape != self.input_shape:
            raise MaskShapeError(
                f"LayerMaskImage was built for images of shape {self.input_shape}, got {x.shape}; build it with "
                "the (H, W, C) shape of the images you explain."
            )
        check_no_nan(x, "the image shap explains")
        height, width, _ = self.input_shape
        keep = np.zeros(height * width, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if keep.shape != (height * width,):
            raise MaskShapeError(f"expected a mask of {height * width} pixels, got shape {keep.shape}.")
        return x[None].copy(), keep.reshape(1, height, width)

    def mask_shapes(self, x: Any) -> List[Tuple[int, int, int]]:
        """The features are the pixels, ``(H, W, 1)``: all channels of a pixel are one feature."""
        return [(*self.input_shape[:2], 1)]

    def __repr__(self) -> str:
        return f"LayerMaskImage({self.input_shape})"
