"""``layermask explain --task segmentation``: a class over a region of a segmentation model's output, explained
under black, grey and layer masking side by side (the target is :class:`~captum_layermask.RegionScores`)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..core.model import select_output
from ..evaluation.normalization import normalizer
from ..integrations.segmentation import RegionScores
from ..weights import Classifier
from .attributions import ExplainSettings, attribute, check_target, class_name, save_explanation, segment
from .io import CommandError, read_image, staged_output


def predicted_region(logits: Tensor, target: Optional[int], background: Optional[int]) -> Tuple[int, Tensor]:
    """The class to explain and its region: the output pixels predicted as that class.

    Args:
        logits: ``(1, C, H, W)`` scores of the whole image.
        target: the class, or None for the class (not the background) predicted on most pixels.
        background: the background class, never chosen by default.

    Raises:
        CommandError: for a class out of range, or one the model predicts nowhere.
    """
    classes = logits.shape[1]
    if target is not None:
        check_target(target, classes)
    predicted = logits[0].argmax(0)
    if target is None:
        counts = torch.bincount(predicted.flatten(), minlength=classes)
        if background is not None:
            counts[background] = 0
        if int(counts.max()) == 0:
            raise CommandError("the model predicts only the background on this image; choose a class with --target.")
        target = int(counts.argmax())
    region = predicted == target
    if not bool(region.any()):
        raise CommandError(f"the model predicts class {target} on no pixel of this image; give --region-file.")
    return target, region


def read_region(path: Path, height: int, width: int) -> Tensor:
    """A region from an ``.npy`` file of shape ``(H, W)`` (bool or 0/1)."""
    try:
        region = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot read the region file {path}: {error}") from None
    if region.shape != (height, width):
        raise CommandError(f"the region file {path} is {region.shape}, the model's output is {(height, width)}.")
    return torch.from_numpy(region != 0)


def explain_region(
    model: Classifier,
    image_path: Path,
    out: Path,
    settings: ExplainSettings,
    region_file: Optional[Path] = None,
) -> Path:
    """Explains a class over a region of one image's segmentation (by default the pixels predicted as the class);
    writes ``explanation.png`` (the region outlined), ``attributions.pt`` and ``.npy`` files into ``out``."""
    image = read_image(image_path, settings.size or model.size)
    x = normalizer(model.mean, model.std)(image)
    with torch.no_grad():
        logits = select_output(model.model(x), model.output)
    target = settings.target
    if region_file is None:
        target, region = predicted_region(logits, target, model.background)
    elif target is None:
        raise CommandError("--region-file needs --target, the class to explain over the region.")
    else:
        check_target(target, logits.shape[1])
        region = read_region(region_file, *logits.shape[-2:])
    ids = segment(image, settings.segments, settings.segments_file)
    scores = functools.partial(RegionScores, region=region, output=model.output)
    results = attribute(model.model, x, ids, target, settings, mean=model.mean, std=model.std, scores=scores)
    name = class_name(model.classes, target)
    with staged_output(out, "explain") as staging:
        save_explanation(staging, image, ids, results, target, name, settings.top, region=region)
    print(f"explained '{name}' over {int(region.sum())} output pixels; wrote {out}/explanation.png")
    return out
