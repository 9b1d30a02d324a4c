"""``layermask explain``: one image explained under black, grey and layer masking side by side."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..core.convert import layer_masked
from ..evaluation.attribution_metrics import segment_scores
from ..evaluation.explanations import EXPLANATION_MASKERS, METHODS, captum_attribution, captum_baseline
from ..evaluation.maskers import masker_title
from ..evaluation.normalization import normalizer
from ..evaluation.segmentation import SEGMENTER_NAMES, get_segmenter, segment_images
from ..weights import Classifier, load_classifier
from .arguments import add_common_arguments, add_engine_arguments, add_model_arguments, at_least, check_engine, subset
from .io import CommandError, check_output_folder, read_image, read_segments, staged_output


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
    maskers: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    samples: int,
    per_eval: int,
    seed: int,
    residual: str = "intersection",
) -> Dict[str, Tensor]:
    """Attributions of the target class under each masker, with the same random samples.

    Args:
        model: the plain classifier; the ``layer`` masker explains ``layer_masked(model)`` with ``LayerMask()``.
        x: the image ``(1, C, H, W)``, normalised with ``mean`` and ``std``.
        segments: ``(1, 1, H, W)`` feature ids.
    """
    masked = layer_masked(model, residual=residual)
    results = {}
    for masker in maskers:
        forward = masked if masker == "layer" else model
        torch.manual_seed(seed)
        print(f"{method}, {masker_title(masker)}:", file=sys.stderr)
        baseline = captum_baseline(masker, mean, std)
        result = captum_attribution(
            method, forward, x, segments, target, baseline, samples, per_eval, show_progress=True
        )
        results[masker] = result.detach()
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
    maskers: Sequence[str],
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
    results = attribute(
        classifier.model,
        x,
        ids,
        target,
        method=method,
        maskers=maskers,
        mean=classifier.mean,
        std=classifier.std,
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
        for masker, attribution in results.items():
            np.save(staging / f"attributions_{masker}.npy", attribution[0].numpy())
        np.save(staging / "segments.npy", ids[0, 0].numpy())
    print(
        f"predicted '{_class_name(classifier, int(logits.argmax(1)))}'; explained '{name}'; wrote {out}/explanation.png"
    )
    return out


def _class_name(classifier: Classifier, index: int) -> str:
    classes = classifier.classes
    return classes[index] if classes is not None and index < len(classes) else str(index)


EXPLAIN_DESCRIPTION = (
    "Explains an image's prediction with Lime, KernelShap, FeatureAblation or Occlusion under black, grey and layer "
    "masking side by side, and writes a figure in the style of the paper's Figure 8 (top segments for the class in "
    "green, against it in red) with the raw attributions. With no arguments it explains the bundled demo scene with "
    "the bundled demo model, offline."
)


def add_command(commands: argparse._SubParsersAction) -> None:
    """Adds ``layermask explain`` to the command's subparsers."""
    ex = commands.add_parser(
        "explain", help="explain one image under black, grey and layer masking", description=EXPLAIN_DESCRIPTION
    )
    add_model_arguments(ex)
    given = ex.add_mutually_exclusive_group()
    given.add_argument("--image", type=Path, help="image file (default: the bundled demo scene)")
    given.add_argument(
        "--images",
        type=Path,
        nargs="+",
        help="a whole dataset: an image folder (<folder>/<class>/<image>, or flat) or several image files; "
        "results per image in --out, resumable (docs/datasets.md)",
    )
    ex.add_argument("--target", type=at_least(0), help="class index to explain (default: the top prediction)")
    ex.add_argument("--method", choices=METHODS, default="lime", help="the Captum method (default: lime)")
    ex.add_argument(
        "--segments",
        choices=SEGMENTER_NAMES,
        default="patches",
        help="16x16 patches, SLIC (196) or quickshift, as in the paper",
    )
    ex.add_argument(
        "--segments-file", type=Path, help=".npy array of shape (H, W) with an integer segment id per pixel"
    )
    ex.add_argument(
        "--maskers",
        type=subset(EXPLANATION_MASKERS, "maskers"),
        default=list(EXPLANATION_MASKERS),
        help="comma-separated subset of black,grey,layer",
    )
    ex.add_argument(
        "--samples", type=at_least(1), default=500, help="perturbed samples for Lime and KernelShap (paper: 500)"
    )
    ex.add_argument("--per-eval", type=at_least(1), default=16, help="perturbations per forward pass")
    ex.add_argument(
        "--size", type=at_least(1), help="input resolution (default: 128 for the demo model, 224 otherwise)"
    )
    ex.add_argument("--top", type=at_least(1), default=5, help="segments highlighted each way")
    ex.add_argument("--seed", type=int, default=0, help="seed of the perturbation samples")
    add_engine_arguments(ex, "with --images: ")
    add_common_arguments(
        ex,
        Path("explain-output"),
        "output folder: replaced if it holds an earlier output; with --images, a resumable run folder",
    )
    ex.set_defaults(run=run)


def run(args: argparse.Namespace) -> Path:
    if args.images:
        return _run_on_dataset(args)
    if args.engine != "local" or args.address:
        raise CommandError("--engine and --address apply to a dataset: give --images.")
    check_output_folder(args.out)  # before any work
    classifier = load_classifier(args.model, args.weights, args.num_classes)
    image = args.image
    if image is None:
        if args.model != "demo":
            raise CommandError(
                f"--image is needed with --model {args.model} (the bundled scene is for the demo model)."
            )
        from ..demo.model import SCENE

        image = SCENE
    return explain_image(
        classifier,
        image,
        args.out,
        size=args.size,
        target=args.target,
        method=args.method,
        segments=args.segments,
        segments_file=args.segments_file,
        maskers=args.maskers,
        samples=args.samples,
        per_eval=args.per_eval,
        top=args.top,
        seed=args.seed,
        residual=args.residual,
    )


def _run_on_dataset(args: argparse.Namespace) -> Path:
    from ..datasets import OutputMismatchError, explain_dataset

    check_engine(args)
    if args.segments_file is not None:
        raise CommandError("--segments-file is for one image; with --images use --segments.")
    if args.residual != "intersection":
        raise CommandError("--residual is for one image; dataset runs use the paper's residual rule.")
    classifier = load_classifier(args.model, args.weights, args.num_classes)
    images = args.images[0] if len(args.images) == 1 and args.images[0].is_dir() else args.images
    try:
        results = explain_dataset(
            classifier.model,
            images,
            args.out,
            method=args.method,
            maskers=args.maskers,
            segments=args.segments,
            size=args.size or classifier.size,
            mean=classifier.mean,
            std=classifier.std,
            target=args.target,
            samples=args.samples,
            perturbations_per_eval=args.per_eval,
            seed=args.seed,
            engine=args.engine,
            address=args.address,
        )
    except (OutputMismatchError, FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from None
    print(f"explained {len(results) - len(results.errors)} of {len(results)} images; results in {args.out}")
    return args.out
