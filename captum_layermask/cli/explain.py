"""``layermask explain``: one image explained under black, grey and layer masking side by side."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..core.convert import layer_masked
from ..datasets.explain import captum_attribution
from ..evaluation.attribution_metrics import segment_scores
from ..evaluation.maskers import masker_title
from ..evaluation.normalization import normalizer
from ..evaluation.segmentation import get_segmenter, segment_images
from ..integrations.captum import LayerMask
from ..weights import Classifier
from .io import CommandError, read_image, read_segments, staged_output


def segment(image: Tensor, how: str, file: Optional[Path]) -> Tensor:
    """Segment ids ``(1, 1, H, W)`` of an image in [0, 1]: 16x16 patches, SLIC or quickshift, or from a file."""
    if file is None:
        return segment_images(image, get_segmenter(how, mean=(0, 0, 0), std=(1, 1, 1)))[:, None]
    return segment_images(image, read_segments(file, *image.shape[-2:])[None])[:, None]


def attribute(
    model: nn.Module,
    x: Tensor,
    segments: Tensor,
    target: int,
    *,
    method: str,
    maskings: Sequence[str],
    black: Tensor,
    samples: int,
    per_eval: int,
    seed: int,
    residual: str = "intersection",
) -> Dict[str, Tensor]:
    """Attributions of the target class under each masking, with the same random samples.

    Args:
        model: the plain classifier; ``layer`` masking explains ``layer_masked(model)`` with ``LayerMask()``.
        x: the normalised image ``(1, C, H, W)``.
        segments: ``(1, 1, H, W)`` feature ids.
        black: the normalised value of a black pixel, ``(1, C, 1, 1)``.
    """
    fills = {"black": black, "grey": 0.0, "layer": LayerMask()}
    masked = layer_masked(model, residual=residual)
    results = {}
    for masking in maskings:
        forward = masked if masking == "layer" else model
        torch.manual_seed(seed)
        print(f"{method}, {masking} masking:", file=sys.stderr)
        result = captum_attribution(
            method, forward, x, segments, target, fills[masking], samples, per_eval, show_progress=True
        )
        results[masking] = result.detach()
    return results


def plot_explanation(
    image: Tensor, segments: Tensor, results: Dict[str, Tensor], title: str, top: int, path: Path
) -> None:
    """Paper Figure 8 style: per masking, the top segments for the class in green and against it in red."""
    import matplotlib.pyplot as plt

    pixels = image[0].permute(1, 2, 0).numpy()
    fig, axes = plt.subplots(1, len(results) + 1, figsize=(3.2 * (len(results) + 1), 3.6))
    axes[0].imshow(pixels)
    axes[0].set_title(f"input; class '{title}'")
    ids = segments[:, 0]
    for axis, (masking, attribution) in zip(axes[1:], results.items()):
        scores = segment_scores(attribution, ids)[0]
        order = torch.argsort(scores, descending=True)
        positive = [int(s) for s in order[:top] if scores[s] > 0]
        negative = [int(s) for s in order.flip(0)[:top] if scores[s] < 0]
        shown = 0.35 * pixels + 0.25
        seg = ids[0].numpy()
        for chosen, colour in ((positive, (0.1, 0.8, 0.2)), (negative, (0.9, 0.15, 0.1))):
            region = np.isin(seg, chosen)
            shown[region] = 0.55 * pixels[region] + 0.45 * np.array(colour)
        axis.imshow(shown)
        axis.set_title(masker_title(masking))
    for axis in axes:
        axis.axis("off")
    fig.suptitle(f"top {top} segments for (green) and against (red) '{title}'")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def explain_image(
    classifier: Classifier,
    image_path: Path,
    out: Path,
    *,
    size: Optional[int],
    target: Optional[int],
    method: str,
    segments: str,
    segments_file: Optional[Path],
    maskings: Sequence[str],
    samples: int,
    per_eval: int,
    top: int,
    seed: int,
    residual: str = "intersection",
) -> Path:
    """Explains one image and writes ``explanation.png``, ``attributions.pt`` and ``.npy`` files into ``out``."""
    image = read_image(image_path, size or classifier.size)
    normalize: Callable[[Tensor], Tensor] = normalizer(classifier.mean, classifier.std)
    ids = segment(image, segments, segments_file)
    x = normalize(image)
    with torch.no_grad():
        logits = classifier.model(x)
    classes = logits.shape[1]
    target = int(logits.argmax(1)) if target is None else target
    if not 0 <= target < classes:
        raise CommandError(f"target {target} is out of range: the model has {classes} classes (0 to {classes - 1}).")
    black = normalize(torch.zeros(1, x.shape[1], 1, 1))
    results = attribute(
        classifier.model,
        x,
        ids,
        target,
        method=method,
        maskings=maskings,
        black=black,
        samples=samples,
        per_eval=per_eval,
        seed=seed,
        residual=residual,
    )
    name = _class_name(classifier, target)
    with staged_output(out, "explain") as staging:
        plot_explanation(image, ids, results, name, top, staging / "explanation.png")
        torch.save(
            {"attributions": results, "segments": ids, "target": target, "image": image}, staging / "attributions.pt"
        )
        for masking, attribution in results.items():
            np.save(staging / f"attributions_{masking}.npy", attribution[0].numpy())
        np.save(staging / "segments.npy", ids[0, 0].numpy())
    print(
        f"predicted '{_class_name(classifier, int(logits.argmax(1)))}'; explained '{name}'; wrote {out}/explanation.png"
    )
    return out


def _class_name(classifier: Classifier, index: int) -> str:
    classes = classifier.classes
    return classes[index] if classes is not None and index < len(classes) else str(index)
