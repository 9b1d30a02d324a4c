"""``LayerMask()``: a Captum baseline that removes features instead of filling them with a colour.

Captum accepts only tensors and numbers as baselines and builds every perturbed input arithmetically
(``x * (1 - m) + baseline * m`` in FeatureAblation and Occlusion, ``keep * x + (1 - keep) * baseline`` in Lime and
KernelShap, the same swap in ShapleyValueSampling). ``LayerMask()`` is therefore a number: a sentinel value that
these formulas reproduce exactly in removed pixels, for finite inputs, in float16, bfloat16, float32 and float64.
A layer-masked model recognises pixels whose channels all hold it (the mask decoder this module installs in
:class:`~captum_layermask.LayerMaskedModel`) and runs without them. The sentinel is tiny (about -9e-5), so
Captum's default Lime weighting, which compares the perturbed image with the original, is that of a grey (zero)
baseline.

Two misuses would otherwise explain something else silently, and are refused:

- a plain model given ``LayerMask()`` pixels would explain a grey fill: while any ``LayerMask`` exists, the
  core's :class:`~captum_layermask.core.guard.PlainModelGuard` checks the input of every top-level module call;
- gradient methods (IntegratedGradients, DeepLift, ...) blend the baseline with the input under autograd, so the
  sentinel never reaches the model intact: ``LayerMask`` refuses tensor arithmetic while gradients are enabled
  (Captum's perturbation methods build their inputs under ``torch.no_grad()``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..core import LayerMaskedModel, register_mask_decoder
from ..core.errors import LayerMaskError, MaskShapeError
from ..core.guard import PlainModelGuard
from ..core.parts import LayerMaskedParts

SENTINEL = -1.5 * 2.0**-14
"""The value of ``LayerMask()``: a normal number in every float dtype (no flush-to-zero), and exact in each."""


_PARTIAL_PIXELS_REFUSED = 4
"""A sample with this many pixels where some channels, not all, hold the sentinel is refused. One channel of a
real image equals the sentinel by chance at a rate near 1e-7 per value (continuous data normalised by a power of
two), so isolated partial pixels are visible pixels; a feature mask that splits channels makes whole segments of
them."""


def _sentinel_hits(x: Tensor) -> Tensor:
    return x == torch.tensor(SENTINEL, dtype=x.dtype, device=x.device)


def mask_from_baseline(x: Tensor) -> Optional[Tensor]:
    """The mask a ``LayerMask()`` baseline left in an image batch, or None if no pixel holds it.

    Args:
        x (Tensor): images ``(N, C, H, W)``.

    Returns:
        Bool tensor ``(N, 1, H, W)``, True where visible; None if no pixel was removed.

    Raises:
        MaskShapeError: if, in a sample, several pixels have some channels at the sentinel and others not (a
            feature mask that splits a pixel's channels), or if ``x`` is not an image batch.
    """
    if not x.is_floating_point():
        return None
    hits = _sentinel_hits(x)
    if x.ndim != 4:
        if bool(hits.any()):
            raise MaskShapeError(
                f"LayerMask() removes pixels of an image batch (N, C, H, W), but it reached an input of shape "
                f"{tuple(x.shape)}; use it as the baseline of the image input only."
            )
        return None
    channels = x.shape[1]
    hit_channels = hits.sum(1, keepdim=True, dtype=torch.uint8 if channels < 256 else torch.int32)
    if not bool(hit_channels.any()):
        return None
    removed = hit_channels == channels
    partial = ((hit_channels != 0) & ~removed).flatten(1).sum(1)
    if bool((partial >= _PARTIAL_PIXELS_REFUSED).any()):
        raise MaskShapeError(_SPLIT_CHANNELS_MESSAGE)
    return ~removed if bool(removed.any()) else None


_SPLIT_CHANNELS_MESSAGE = (
    "LayerMask() removed some channels of a pixel but not others, and layer masking removes whole pixels: "
    "give every channel of a pixel the same feature id, i.e. pass feature_mask of shape (N, 1, H, W) to "
    "Lime, KernelShap or FeatureAblation (without one, each value is its own feature), and "
    "sliding_window_shapes=(C, h, w) spanning all channels to Occlusion."
)


def _splits_channels(selection: Tensor) -> bool:
    """Whether a 0/1 selection of image features, ``(..., C, H, W)``, selects some channels of a pixel and not
    others (a feature mask or occlusion window that does not span all channels)."""
    return selection.ndim >= 4 and selection.shape[-3] > 1 and bool((selection != selection[..., :1, :, :]).any())


def check_no_baseline(value: Any, what: str) -> None:
    """Raises if a tensor that is not the image holds ``LayerMask()`` values."""
    if isinstance(value, Tensor) and value.is_floating_point() and bool(_sentinel_hits(value).any()):
        raise MaskShapeError(f"LayerMask() reached {what}; it can only be the baseline of the image input.")


def decode_layer_mask(x: Tensor, other_inputs: Sequence[Any]) -> Optional[Tensor]:
    """The mask decoder of :class:`~captum_layermask.LayerMaskedModel` for ``LayerMask()`` baselines.

    Returns the mask of the image's removed pixels (None if none), after checking that no other input holds the
    sentinel.
    """
    mask = mask_from_baseline(x)
    for index, value in enumerate(other_inputs):
        check_no_baseline(value, f"input {index + 2} of the model")
    if mask is not None:
        _refuse_gradients(x)
        _GUARD.decoded()
    return mask


def _refuse_gradients(x: Tensor) -> None:
    """Raises if ``LayerMask()`` pixels reach a model whose input requires gradients (a gradient method)."""
    if torch.is_grad_enabled() and x.requires_grad:
        raise LayerMaskError(_GRADIENT_MESSAGE.format(what="it reached a model whose input requires gradients"))


def _holds_baseline(x: Tensor) -> bool:
    return bool(_sentinel_hits(x).all(1).any())


_GUARD = PlainModelGuard(
    marked=_holds_baseline,
    decoder=(LayerMaskedModel, LayerMaskedParts),
    refusal=(
        "{name} received a LayerMask() baseline but is not layer-masked, so it would explain a grey fill instead; "
        "pass layer_masked(model) to the Captum method."
    ),
    altered=(
        "{name} received a LayerMask() baseline, but the layer-masked model inside it did not: the wrapper changed "
        "those pixels first. Apply layer_masked to the whole model instead."
    ),
    before_refusal=_refuse_gradients,
)
_DECODER = register_mask_decoder(decode_layer_mask)


_GRADIENT_MESSAGE = (
    "LayerMask() means removal, which only perturbation methods perform (FeatureAblation, Occlusion, Lime, "
    "KernelShap, ShapleyValueSampling, ...); {what}, as gradient methods such as IntegratedGradients or DeepLift "
    "do, so it would act as a number (in effect a zero baseline). Give those methods a tensor baseline."
)
_SELECTIONS = (torch.Tensor.mul, torch.mul)


def _is_binary(tensor: Tensor) -> bool:
    return tensor.dtype == torch.bool or bool(((tensor == 0) | (tensor == 1)).all())


class LayerMask(float):
    """Captum baseline meaning "remove these features" for a :func:`~captum_layermask.layer_masked` model.

    Pass it wherever Captum takes ``baselines`` in a perturbation method: Lime, KernelShap, FeatureAblation,
    Occlusion, ShapleyValueSampling (and others that blend baselines arithmetically without gradients). Every
    perturbed input Captum builds is then evaluated with layer masking: removed pixels are not replaced by any
    colour. Feature masks must give all channels of a pixel the same id. Gradient methods refuse it.

    Examples::

        >>> lime = Lime(layer_masked(model))
        >>> attr = lime.attribute(image, target=label, feature_mask=segments, baselines=LayerMask(), n_samples=500)
    """

    def __new__(cls) -> LayerMask:
        instance = super().__new__(cls, SENTINEL)
        _GUARD.acquire(instance)
        return instance

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: Optional[dict] = None
    ) -> Any:
        """Allows the one operation perturbation methods apply to a baseline, a product with a 0/1 mask (which
        places the sentinel where features are removed); refuses every blend of it with an image."""
        kwargs = kwargs or {}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        if func not in _SELECTIONS or not all(_is_binary(t) for t in tensors):
            raise LayerMaskError(
                _GRADIENT_MESSAGE.format(
                    what=f"here it was combined with an image by {getattr(func, '__name__', func)}"
                )
            )
        if any(_splits_channels(t) for t in tensors):  # refused here whatever the number of split pixels
            raise MaskShapeError(_SPLIT_CHANNELS_MESSAGE)
        args = tuple(float(a) if isinstance(a, LayerMask) else a for a in args)
        return func(*args, **kwargs)

    def __reduce__(self) -> tuple:
        return (LayerMask, ())

    def __repr__(self) -> str:
        return "LayerMask()"
