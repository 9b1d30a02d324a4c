"""Ways of removing pixels from a model's input, for the diagnostics and the evaluation.

A masker is a callable ``masker(model, x, mask) -> output``: ``x`` is a batch of model inputs ``(N, C, H, W)``
(normalised as the model expects), ``mask`` is ``(N, 1, H, W)`` bool with True for visible pixels, and the result
is the model's output with the removed pixels taken away in the masker's way. Layer masking runs the model on
the visible pixels only (paper section 3); the fills replace removed pixels with a colour (the paper's grey-out
and black-out, section 4), a blurred copy of the image or the image's mean colour (supplementary section 8).

Every function of :mod:`captum_layermask.evaluation` (diagnostics, removal curves, LIME metrics) takes ``masker=``
as a name (``"layer"``, ``"grey"``, ``"black"``, ``"blur"``, ``"mean"``), a :class:`Masker`, or any callable
``fn(model, x, mask)``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.convert import layer_masked
from ..core.errors import LayerMaskError
from .normalization import IMAGENET_MEAN, IMAGENET_STD

MaskedForward = Callable[[Tensor, Tensor], Any]


class Masker:
    """Base class of the built-in maskers: ``bind(model)`` returns ``forward(x, mask)``.

    Binding once per evaluation lets a masker prepare the model (layer masking converts it once).
    """

    name = "masker"

    def bind(self, model: nn.Module) -> MaskedForward:
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: Tensor, mask: Tensor) -> Any:
        return self.bind(model)(x, mask)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LayerMasking(Masker):
    """Layer masking (paper section 3): the model runs on the visible pixels only.

    Args:
        padding (str): ``"neighbor"`` (the paper's), ``"zero"`` or ``"partial"`` (see :func:`layer_masked`).
        residual (str): ``"intersection"`` (the paper's) or ``"union"`` (see :func:`layer_masked`).
    """

    name = "layer"

    def __init__(self, padding: str = "neighbor", residual: str = "intersection") -> None:
        self.padding, self.residual = padding, residual

    def bind(self, model: nn.Module) -> MaskedForward:
        masked = layer_masked(
            model, padding=self.padding, residual=self.residual
        )  # a layer-masked model is used as it is
        return lambda x, mask: masked(x, mask=mask)

    def __repr__(self) -> str:
        return f"LayerMasking(padding={self.padding!r}, residual={self.residual!r})"


class _Fill(Masker):
    """Removed pixels replaced by ``fill_values(x, mask)``, then the plain model."""

    def fill_values(self, x: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def bind(self, model: nn.Module) -> MaskedForward:
        return lambda x, mask: model(torch.where(mask.bool(), x, self.fill_values(x, mask)))


class ConstantFill(_Fill):
    """Removed pixels take one colour, given in model-input (normalised) space.

    Args:
        value (float or sequence of float): one value, or one per channel.
        name (str): how results name this masker.
    """

    def __init__(self, value: Union[float, Sequence[float]], name: str = "constant") -> None:
        self.value = torch.as_tensor(value, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.name = name

    def fill_values(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.value.to(device=x.device, dtype=x.dtype)

    def __repr__(self) -> str:
        return f"ConstantFill({self.value.flatten().tolist()}, name={self.name!r})"


def grey() -> ConstantFill:
    """Grey-out: the dataset mean colour, which is 0 after normalisation (paper section 4)."""
    return ConstantFill(0.0, name="grey")


def black(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> ConstantFill:
    """Black-out: pixels of value 0 before normalisation, i.e. ``-mean / std`` (paper section 4).

    Args:
        mean, std: the per-channel normalisation of the model's inputs (ImageNet's by default).
    """
    if len(mean) != len(std):
        raise ValueError(f"mean and std must have one value per channel, got {len(mean)} and {len(std)}.")
    return ConstantFill([-m / s for m, s in zip(mean, std)], name="black")


class MeanColourFill(_Fill):
    """Removed pixels take the image's own mean colour over all its pixels (supplementary section 8)."""

    name = "mean"

    def fill_values(self, x: Tensor, mask: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1), keepdim=True)


class BlurFill(_Fill):
    """Removed pixels take the values of a Gaussian-blurred copy of the image.

    Args:
        sigma (float): the blur's standard deviation in pixels; the kernel spans ``±3 sigma``.
    """

    name = "blur"

    def __init__(self, sigma: float = 10.0) -> None:
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}.")
        self.sigma = sigma

    def fill_values(self, x: Tensor, mask: Tensor) -> Tensor:
        radius = min(math.ceil(3 * self.sigma), min(x.shape[-2:]) - 1)
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (offsets / self.sigma) ** 2)
        kernel = kernel / kernel.sum()
        channels = x.shape[1]
        rows = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
        blurred = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), rows, groups=channels)
        return F.conv2d(F.pad(blurred, (radius, radius, 0, 0), mode="reflect"), rows.transpose(2, 3), groups=channels)

    def __repr__(self) -> str:
        return f"BlurFill(sigma={self.sigma})"


class _CallableMasker(Masker):
    def __init__(self, function: Callable[[nn.Module, Tensor, Tensor], Any]) -> None:
        self.function = function
        self.name = getattr(function, "__name__", "custom")

    def bind(self, model: nn.Module) -> MaskedForward:
        return lambda x, mask: self.function(model, x, mask)

    def __repr__(self) -> str:
        return f"masker {self.name}"


MaskerSpec = Union[str, Masker, Callable[[nn.Module, Tensor, Tensor], Any]]
MASKER_NAMES = ("layer", "grey", "black", "blur", "mean")
MASKER_TITLES = {
    "black": "black fill",
    "grey": "grey fill",
    "layer": "layer masking",
    "blur": "blur fill",
    "mean": "mean-colour fill",
}
"""How figures and tables name each built-in masker."""


def masker_title(name: str) -> str:
    """The title of a masker in figures and tables: ``"layer masking"`` for ``"layer"``, a custom name as it is."""
    return MASKER_TITLES.get(name, name)


def get_masker(
    masker: MaskerSpec,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    residual: str = "intersection",
) -> Masker:
    """A :class:`Masker` from a name, a masker or a callable ``fn(model, x, mask)``.

    Names: ``"layer"`` (:class:`LayerMasking`), ``"grey"`` (:func:`grey`), ``"black"`` (:func:`black` with the
    normalisation ``mean``/``std``, ImageNet's by default), ``"blur"`` (:class:`BlurFill`) and ``"mean"``
    (:class:`MeanColourFill`). ``residual`` is that of ``"layer"``.

    Raises:
        LayerMaskError: for an unknown name or an object that is not callable.
    """
    if isinstance(masker, Masker):
        return masker
    if isinstance(masker, str):
        factories = {
            "layer": lambda: LayerMasking(residual=residual),
            "grey": grey,
            "black": lambda: black(mean, std),
            "blur": BlurFill,
            "mean": MeanColourFill,
        }
        if masker not in factories:
            raise LayerMaskError(
                f"unknown masker {masker!r}; use one of {', '.join(MASKER_NAMES)}, a Masker or a callable fn(model, x, mask)."
            )
        return factories[masker]()
    if callable(masker):
        return _CallableMasker(masker)
    raise LayerMaskError(
        f"masker must be a name ({', '.join(MASKER_NAMES)}), a Masker or a callable fn(model, x, mask), got {type(masker).__name__}."
    )
