"""``layermask explain --task detection``: one detection of a detector explained under black, grey and layer masking
side by side (the target is :class:`~captum_layermask.DetectionScores`, D-RISE's match score)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ..evaluation.detection import FILLS, box_masks
from ..integrations.detection import DetectionScores
from ..weights import Classifier
from .attributions import ExplainSettings, attribute, check_target, class_name, save_explanation, segment
from .io import CommandError, read_image, staged_output


def chosen_detection(found: Dict[str, Tensor], label: Optional[int], classes: int) -> Tuple[Tensor, int, float]:
    """The detection to explain: the best-scoring one (of class ``label`` if given).

    Returns:
        Its box ``(4,)``, label and score.

    Raises:
        CommandError: for a class out of range, or an image with no such detection.
    """
    if label is not None:
        check_target(label, classes)
    keep = torch.ones_like(found["labels"], dtype=torch.bool) if label is None else found["labels"] == label
    if not bool(keep.any()):
        which = "anything" if label is None else f"class {label}"
        raise CommandError(f"the detector finds no {which} in this image; choose another --target or image.")
    best = int(torch.nonzero(keep)[found["scores"][keep].argmax()])
    return found["boxes"][best], int(found["labels"][best]), float(found["scores"][best])


def explain_detection(
    model: Classifier,
    image_path: Path,
    out: Path,
    settings: ExplainSettings,
) -> Path:
    """Explains the detector's best detection (of class ``target`` if given) on one image; writes
    ``explanation.png`` (the box outlined), ``attributions.pt`` and ``.npy`` files into ``out``."""
    image = read_image(image_path, settings.size or model.size)
    with torch.no_grad():
        found = model.model(list(image))[0]
    classes = len(model.classes) if model.classes is not None else int(found["labels"].max(initial=0)) + 1
    box, label, score = chosen_detection(found, settings.target, classes)
    ids = segment(image, settings.segments, settings.segments_file)
    scores = functools.partial(DetectionScores, box=box, label=label)
    results = attribute(
        model.model, image, ids, None, settings, mean=model.mean, std=model.std, scores=scores, fills=FILLS
    )
    name = class_name(model.classes, label)
    region = box_masks([{"boxes": box[None]}], *image.shape[-2:])[0, 0]
    with staged_output(out, "explain") as staging:
        save_explanation(staging, image, ids, results, label, name, settings.top, region, "detection")
    print(
        f"explained the '{name}' detection (score {score:.2f}) at {[round(float(v)) for v in box]}; "
        f"wrote {out}/explanation.png"
    )
    return out
