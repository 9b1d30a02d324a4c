"""Layer masking in the other tools people explain and evaluate images with, through their public extension points.

Each tool removes pixels its own way and then calls the model without a mask. These adapters make every such call
an exact call of a :func:`~captum_layermask.layer_masked` model on the mask the tool meant:

- :mod:`~captum_layermask.interop.shap`: ``LayerMaskImage``, a shap masker that hands the model the image and
  the mask (``shap.Explainer(model_fn, LayerMaskImage(shape))``).
- :mod:`~captum_layermask.interop.lime`: ``lime_image_arguments``, the ``classifier_fn`` and ``hide_color`` of
  ``lime_image.LimeImageExplainer.explain_instance``.
- :mod:`~captum_layermask.interop.quantus`: ``LayerMaskRemoval``, a Quantus ``perturb_func``, with the model
  wrapper :class:`NaNMasked`.
- :mod:`~captum_layermask.interop.road`: ``LayerMaskImputer``, an imputer with the interface of ROAD's reference
  code.

Where a tool can only hand the model an image (lime, Quantus, ROAD), removed pixels travel as NaN in every
channel: a NaN cannot be a pixel value, and it survives the pointwise normalisation tools apply after removing.
:class:`NaNMasked` turns NaN pixels back into the mask. An image's own NaN would therefore read as a removed
pixel: the shap masker and the ROAD imputer, which see the unperturbed image, refuse one; lime and Quantus hand the
adapters perturbed images only, so give them finite images. The packages are optional (``pip install
"captum-layermask[tools]"``); each adapter imports its tool only when used.
"""

from .arrays import ArrayModel, ChannelSplitError, NaNMasked, visible_from_nan

__all__ = ["ArrayModel", "ChannelSplitError", "NaNMasked", "visible_from_nan"]
