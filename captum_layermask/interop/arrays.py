"""What every adapter shares: the layer-masked model called on a tool's arrays, with the mask the tool meant.

Tools remove pixels and call a model on arrays: numpy images, channels last (shap, lime) or first (Quantus,
ROAD), in pixel values or normalised. :class:`ArrayModel` is the layer-masked model as such a function, given the
mask (shap) or reading it from NaN pixels (lime); :class:`NaNMasked` is the ``nn.Module`` for tools that call a
torch model (Quantus, ROAD).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import LayerMaskedModel
from ..core.errors import LayerMaskError, MaskShapeError
from ..core.guard import PlainModelGuard
from ..evaluation.normalization import normalizer


class ChannelSplitError(MaskShapeError):
    """A tool removed some channels of a pixel and kept others; layer masking removes whole pixels."""


def require_layer_masked(model: Any, adapter: str) -> LayerMaskedModel:
    """``model`` if it is a :class:`~captum_layermask.LayerMaskedModel`; raises otherwise.

    A plain model would see the removed pixels' fill (NaN, or whatever the tool wrote) and explain that.
    """
    if not isinstance(model, LayerMaskedModel):
        raise LayerMaskError(
            f"{adapter} needs a layer-masked model, got a plain {type(model).__name__}: pass layer_masked(model)."
        )
    return model


def visible_from_nan(x: Tensor) -> Tensor:
    """The mask of an image batch whose removed pixels are NaN in every channel.

    Args:
        x (Tensor): ``(N, C, H, W)``.

    Returns:
        ``(N, 1, H, W)`` bool, True where visible.

    Raises:
        ChannelSplitError: if a pixel has NaN in some channels and not in others.
    """
    if x.ndim != 4:
        raise MaskShapeError(f"expected an image batch (N, C, H, W), got shape {tuple(x.shape)}.")
    nan = torch.isnan(x)
    removed = nan.all(1, keepdim=True)
    split = nan.any(1, keepdim=True) & ~removed
    if bool(split.any()):
        raise ChannelSplitError(
            f"{int(split.sum())} pixel(s) are NaN in some channels and not in others, and layer masking removes whole "
            "pixels: either the images hold NaN values of their own (give finite images), or the tool removed single "
            "channels (give it one attribution per pixel, shape (N, 1, H, W), and steps that remove whole pixels, e.g. "
            "PixelFlipping's features_in_step a multiple of the channels)."
        )
    return ~removed


def check_no_nan(image: Any, what: str) -> None:
    """Refuses an unperturbed image that holds NaN: the adapters mark removed pixels with NaN, so a NaN of the
    image's own would be taken for a removed pixel.

    Raises:
        LayerMaskError: if ``image`` (a tensor or array) holds a NaN.
    """
    values = image if isinstance(image, Tensor) else torch.as_tensor(np.asarray(image))
    if values.is_floating_point() and bool(torch.isnan(values).any()):
        raise LayerMaskError(
            f"{what} holds NaN values, and NaN marks the pixels that layer masking removes: replace them (e.g. "
            "np.nan_to_num) or remove those pixels explicitly."
        )


class NaNMasked(nn.Module):
    """A layer-masked model whose input marks removed pixels with NaN, for tools that call a torch model on
    perturbed images only (Quantus, ROAD): ``NaNMasked(masked)(x)`` is ``masked(x', mask)``, with ``mask`` the
    pixels that are not NaN (:func:`visible_from_nan`) and ``x'`` the image with its NaN pixels set to 0 (their
    value has no influence under layer masking).

    Args:
        masked (LayerMaskedModel): from :func:`~captum_layermask.layer_masked`; its train/eval mode is this one's.

    Raises:
        LayerMaskError: for a plain model.
    """

    def __init__(self, masked: LayerMaskedModel) -> None:
        super().__init__()
        self.masked = require_layer_masked(masked, "NaNMasked")
        self.train(masked.training)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        visible = visible_from_nan(x)
        if not bool(visible.all()):
            PLAIN_MODEL_GUARD.decoded()
        return self.masked(
            torch.where(visible, x, torch.zeros((), dtype=x.dtype, device=x.device)), *args, mask=visible, **kwargs
        )


def _holds_removed_pixels(x: Tensor) -> bool:
    return bool(torch.isnan(x).all(1).any())


PLAIN_MODEL_GUARD = PlainModelGuard(
    marked=_holds_removed_pixels,
    decoder=NaNMasked,
    refusal=(
        "{name} received pixels removed by captum-layermask (NaN) but is not layer-masked, so its outputs would be "
        "NaN; give the tool NaNMasked(layer_masked(model)) as the model."
    ),
    altered=(
        "{name} received pixels removed by captum-layermask (NaN), but the NaNMasked model inside it did not: the "
        "wrapper changed those pixels first. Give the tool NaNMasked(layer_masked(model)) itself."
    ),
)
"""Installed while an adapter that writes NaN pixels exists (LayerMaskRemoval, LayerMaskImputer): a plain model
would turn them into NaN outputs, and a tool taking their argmax would go on with class 0."""


class ArrayModel:
    """A layer-masked model as a function of image arrays: ``model(images, keep=None) -> (N, classes)`` numpy.

    Args:
        masked (LayerMaskedModel): from :func:`~captum_layermask.layer_masked`, in eval mode.
        channels_last (bool): images are ``(N, H, W, C)`` (shap, lime) rather than ``(N, C, H, W)``.
        mean, std (sequence of float, optional): the normalisation the model expects, applied after ``scale``.
        scale (float): pixel values are divided by it first (255 for 8-bit values).
        output (str): ``"probabilities"`` (softmax, what lime expects) or ``"logits"``.
        batch_size (int): images per forward pass.

    Removed pixels are those that ``keep`` ``(N, H, W)`` marks False, and those NaN in every channel; a pixel
    NaN in some channels only raises :class:`ChannelSplitError`.

    Raises:
        LayerMaskError: for a plain model.
        ValueError: when called with uint8 images and ``scale`` 1.
    """

    def __init__(
        self,
        masked: LayerMaskedModel,
        *,
        channels_last: bool = True,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        scale: float = 1.0,
        output: str = "probabilities",
        batch_size: int = 64,
    ) -> None:
        self.masked = require_layer_masked(masked, "ArrayModel")
        if output not in ("probabilities", "logits"):
            raise ValueError(f"output is 'probabilities' or 'logits', got {output!r}.")
        self.channels_last, self.scale, self.output, self.batch_size = channels_last, scale, output, batch_size
        self.normalize = None
        if mean is not None or std is not None:
            channels = len(mean if mean is not None else std)  # type: ignore[arg-type]
            self.normalize = normalizer(
                (0.0,) * channels if mean is None else mean, (1.0,) * channels if std is None else std
            )
        self.device = next(iter(masked.parameters()), torch.empty(0)).device

    def inputs(self, images: Any) -> Tensor:
        """Model inputs ``(N, C, H, W)`` float32 from the tool's images (NaN pixels stay NaN).

        Raises:
            ValueError: for 8-bit images (uint8) with ``scale`` 1, which would reach the model as values 0..255.
        """
        array = np.asarray(images)
        if array.dtype == np.uint8 and self.scale == 1.0:
            raise ValueError(
                "the images are uint8 (values 0..255) but ArrayModel's scale is 1: pass scale=255 so that they reach "
                "the model in [0, 1] before mean and std."
            )
        x = torch.as_tensor(array, dtype=torch.float32)
        if x.ndim != 4:
            raise MaskShapeError(f"expected a batch of images, got an array of shape {tuple(x.shape)}.")
        x = x.permute(0, 3, 1, 2) if self.channels_last else x
        x = x / self.scale
        return x if self.normalize is None else self.normalize(x)

    def __call__(self, images: Any, keep: Any = None) -> np.ndarray:
        x = self.inputs(images)
        visible = visible_from_nan(x)
        if keep is not None:
            keep = torch.as_tensor(np.asarray(keep)).bool()
            if tuple(keep.shape) != (x.shape[0], *x.shape[-2:]):
                raise MaskShapeError(
                    f"keep has shape {tuple(keep.shape)}, but the images are {tuple(x.shape[-2:])}: give (N, H, W)."
                )
            visible = visible & keep[:, None]
        x = torch.where(visible, x, torch.zeros(()))
        outputs = []
        with torch.no_grad():
            for part, mask in zip(x.split(self.batch_size), visible.split(self.batch_size)):
                logits = self.masked(part.to(self.device), mask=mask.to(self.device)).float()
                outputs.append(F.softmax(logits, 1) if self.output == "probabilities" else logits)
        return torch.cat(outputs).cpu().numpy()
