"""``LayerMask()``: a Captum baseline that removes features instead of filling them with a colour.

Captum accepts only tensors and numbers as baselines and builds every perturbed input arithmetically
(``x * (1 - m) + baseline * m`` in FeatureAblation and Occlusion, ``keep * x + (1 - keep) * baseline`` in Lime and
KernelShap, the same swap in ShapleyValueSampling). ``LayerMask()`` is therefore a number: a sentinel value that
these formulas reproduce exactly in removed pixels, for finite inputs, in float16, bfloat16, float32 and float64.
A layer-masked model recognises pixels whose channels all hold it and runs without them. The sentinel is tiny
(about -9e-5), so Captum's default Lime weighting, which compares the perturbed image with the original, is that
of a grey (zero) baseline.

A plain model cannot recognise the sentinel and would silently explain a grey baseline instead. While any
``LayerMask`` exists, a global forward pre-hook refuses such calls.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Optional

import torch
from torch import Tensor

from .errors import LayerMaskError, MaskShapeError

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
        raise MaskShapeError(
            "the feature mask removes some channels of a pixel but not others; layer masking removes whole "
            "pixels, so give every channel of a pixel the same feature id (e.g. a feature_mask of shape (N, 1, H, W))."
        )
    return ~removed if bool(removed.any()) else None


def check_no_baseline(value: Any, what: str) -> None:
    """Raises if a tensor that is not the image holds ``LayerMask()`` values."""
    if isinstance(value, Tensor) and value.is_floating_point() and bool(_sentinel_hits(value).any()):
        raise MaskShapeError(f"LayerMask() reached {what}; it can only be the baseline of the image input.")


class _PlainModelGuard:
    """Refuses top-level module calls that receive ``LayerMask()`` pixels but do not decode them."""

    def __init__(self) -> None:
        self.live = 0
        self.handles: list = []
        self.depth = threading.local()

    def acquire(self, owner: object) -> None:
        if self.live == 0:
            module = torch.nn.modules.module
            self.handles = [
                module.register_module_forward_pre_hook(self._enter),
                module.register_module_forward_hook(self._leave, always_call=True),
            ]
        self.live += 1
        weakref.finalize(owner, self._release)

    def _release(self) -> None:
        self.live -= 1
        if self.live == 0:
            for handle in self.handles:
                handle.remove()
            self.handles = []

    def _enter(self, module: torch.nn.Module, args: tuple) -> None:
        depth = getattr(self.depth, "value", 0)
        self.depth.value = depth + 1
        if depth or getattr(module, "decodes_layer_mask", False) or not args or not isinstance(args[0], Tensor):
            return
        x = args[0]
        if x.ndim == 4 and x.is_floating_point() and bool(_sentinel_hits(x).all(1).any()):
            self.depth.value = depth
            raise LayerMaskError(
                f"{type(module).__name__} received a LayerMask() baseline but is not layer-masked, so it would "
                "explain a grey fill instead; pass layer_masked(model) to the Captum method."
            )

    def _leave(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.depth.value = max(getattr(self.depth, "value", 1) - 1, 0)


_GUARD = _PlainModelGuard()


class LayerMask(float):
    """Captum baseline meaning "remove these features" for a :func:`~captum_layermask.layer_masked` model.

    Pass it wherever Captum takes ``baselines``: Lime, KernelShap, FeatureAblation, Occlusion,
    ShapleyValueSampling (and other perturbation methods that blend baselines arithmetically). Every perturbed
    input Captum builds is then evaluated with layer masking: removed pixels are not replaced by any colour.
    Feature masks must give all channels of a pixel the same id.

    Examples::

        >>> lime = Lime(layer_masked(model))
        >>> attr = lime.attribute(image, target=label, feature_mask=segments, baselines=LayerMask(), n_samples=500)
    """

    def __new__(cls) -> "LayerMask":
        instance = super().__new__(cls, SENTINEL)
        _GUARD.acquire(instance)
        return instance

    def __reduce__(self) -> tuple:
        return (LayerMask, ())

    def __repr__(self) -> str:
        return "LayerMask()"
