"""Checks of layer masking's defining properties, for any model: the sweeps of this project use them, and so can a
rule you write for your own layer (docs/custom-layers.md).

>>> from captum_layermask.testing import check_layer_masking
>>> check_layer_masking(model, images, mask)   # raises AssertionError naming the property that fails
"""

from __future__ import annotations

import copy
from typing import Any, List, Optional

import torch
from torch import Tensor, nn

from .core import LayerMaskedModel, layer_masked

PROPERTIES = {
    1: "a full mask reproduces the model",
    2: "removed pixels have no influence, whatever they hold",
    3: "nothing visible gives a finite output that does not depend on the image",
    4: "the original model is left untouched",
    5: "padding only the rings later layers read changes nothing",
}
"""The properties :func:`check_layer_masking` checks, by number (paper section 3: what layer masking means)."""


def _tensors(output: Any) -> List[Tensor]:
    """The tensors of a model output (a tensor, or tuples, lists and dicts of them), in a fixed order."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for key in output for t in _tensors(output[key])]
    if isinstance(output, (tuple, list)):
        return [t for part in output for t in _tensors(part)]
    return []


def _fail(number: int, detail: str) -> None:
    raise AssertionError(f"property {number} ({PROPERTIES[number]}) fails: {detail}")


def _relative_error(output: Any, reference: Any) -> float:
    pairs = list(zip(_tensors(output), _tensors(reference)))
    return max(
        (float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in pairs if b.numel()), default=0.0
    )


def _identical(first: Any, second: Any) -> bool:
    a, b = _tensors(first), _tensors(second)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def check_layer_masking(
    model: nn.Module,
    images: Tensor,
    mask: Tensor,
    masked: Optional[LayerMaskedModel] = None,
    *,
    rtol: float = 1e-5,
    check_padding: bool = True,
) -> None:
    """Checks that ``layer_masked(model)`` has the properties of layer masking on ``images`` and ``mask``.

    1. A full mask reproduces ``model(images)`` (relative error at most ``rtol`` of the output's largest value).
    2. Removed pixels have no influence: filled with large noise, NaN, inf, zeros or a per-channel constant (a
       black fill), the output is bitwise the same, and finite.
    3. With nothing visible, the output is finite and does not depend on the image.
    4. The original model is untouched: its state and its output are as before.
    5. (``check_padding``) The demand analysis, which pads only the rings that later layers read, changes no
       output beyond float rounding (``1e-6`` relative) against padding every convolution's full reach.

    Args:
        model (nn.Module): the plain model, in eval mode.
        images (Tensor): ``(N, C, H, W)`` inputs.
        mask (Tensor): ``(N, 1, H, W)``, 1 (True) for visible pixels; some pixels removed.
        masked (LayerMaskedModel, optional): ``layer_masked(model, ...)`` with the options to check (default:
            ``layer_masked(model)``).
        rtol (float): the tolerance of property 1.
        check_padding (bool): check property 5 (converts the model a second time).

    Raises:
        AssertionError: naming the first property that fails, with what was measured.
    """
    masked = layer_masked(model) if masked is None else masked
    state = copy.deepcopy(model.state_dict())
    visible = mask > 0
    with torch.no_grad():
        reference = model(images)
        error = _relative_error(masked(images, torch.ones_like(mask)), reference)
        if error > rtol:
            _fail(1, f"relative error {error:.3g} > {rtol:g}")
        out = masked(images, mask)
        if not all(t.isfinite().all() for t in _tensors(out)):
            _fail(2, "the output with pixels removed is not finite")
        fills = {
            "noise": 1e3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0)).to(images),
            "NaN": torch.full_like(images, float("nan")),
            "inf": torch.full_like(images, float("inf")),
            "a per-channel constant": torch.zeros_like(images) + images.amin((0, 2, 3), keepdim=True),
            "zeros": torch.zeros_like(images),
        }
        for name, fill in fills.items():
            if not _identical(masked(torch.where(visible, images, fill), mask), out):
                _fail(2, f"the output changes when removed pixels hold {name}")
        nothing = torch.zeros_like(mask)
        empty = masked(images, nothing)
        if not all(t.isfinite().all() for t in _tensors(empty)):
            _fail(3, "the output is not finite")
        if not _identical(masked(images.flip(0).roll(1, -1), nothing), empty):
            _fail(3, "the output depends on the image")
        if not _identical(model(images), reference) or any(
            not torch.equal(value, state[key]) for key, value in model.state_dict().items()
        ):
            _fail(4, "the model's output or state changed")
        if check_padding and masked.options.get("prune_padding", True):
            options = {**masked.options, "prune_padding": False}
            error = _relative_error(out, layer_masked(model, **options)(images, mask))
            if error > 1e-6:
                _fail(5, f"relative difference {error:.3g} from padding the full reach")
