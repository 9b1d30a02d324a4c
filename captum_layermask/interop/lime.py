"""lime: the ``classifier_fn`` and ``hide_color`` that make ``LimeImageExplainer`` use layer masking.

``lime_image.LimeImageExplainer.explain_instance`` replaces the pixels of each removed superpixel with
``hide_color`` (every channel), or with the superpixel's mean colour when it is None, and calls
``classifier_fn`` on the batch. With ``hide_color=NaN`` the removed pixels are marked, and a ``classifier_fn`` that
reads NaN pixels as removed (:class:`~captum_layermask.interop.ArrayModel`) runs the layer-masked model on the
rest::

    explainer = lime_image.LimeImageExplainer(random_state=0)
    explanation = explainer.explain_instance(image.astype(np.float64), **lime_image_arguments(masked, mean=MEAN,
                                             std=STD), top_labels=5, num_samples=500)

The image must be a float array (NaN has no integer value): ``(H, W, 3)`` in the pixel scale ``scale`` says.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np

from ..core import LayerMaskedModel
from .arrays import ArrayModel


def lime_image_arguments(
    masked: LayerMaskedModel,
    *,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    scale: float = 1.0,
    batch_size: int = 64,
) -> Dict[str, Any]:
    """``classifier_fn`` and ``hide_color`` for ``LimeImageExplainer.explain_instance`` (pass with ``**``).

    Args:
        masked (LayerMaskedModel): from :func:`~captum_layermask.layer_masked`, in eval mode.
        mean, std: the normalisation the model expects, applied after dividing by ``scale``.
        scale (float): what the image's pixel values are divided by first (255 for values in [0, 255]).
        batch_size (int): images per forward pass.

    Returns:
        ``{"classifier_fn": ArrayModel(...) returning class probabilities, "hide_color": nan}``.

    Raises:
        LayerMaskError: for a plain model.
    """
    classifier = ArrayModel(
        masked, channels_last=True, mean=mean, std=std, scale=scale, output="probabilities", batch_size=batch_size
    )
    return {"classifier_fn": classifier, "hide_color": np.nan}
