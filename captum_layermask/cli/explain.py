"""``layermask explain``: one image explained under black, grey and layer masking side by side."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..evaluation.explanations import EXPLANATION_MASKERS, METHODS
from ..evaluation.normalization import normalizer
from ..evaluation.segmentation import SEGMENTER_NAMES
from ..weights import Classifier, load_classifier, load_model
from .arguments import (
    TASKS,
    add_common_arguments,
    add_engine_arguments,
    add_model_arguments,
    at_least,
    check_engine,
    subset,
)
from .attributions import ExplainSettings, attribute, check_target, class_name, save_explanation, segment
from .explain_detection import explain_detection
from .explain_region import explain_region
from .io import CommandError, check_output_folder, read_image, staged_output


def explain_image(
    classifier: Classifier,
    image_path: Path,
    out: Path,
    settings: ExplainSettings,
) -> Path:
    """Explains one image and writes ``explanation.png``, ``attributions.pt`` and ``.npy`` files into ``out``."""
    image = read_image(image_path, settings.size or classifier.size)
    normalize: Callable[[Tensor], Tensor] = normalizer(classifier.mean, classifier.std)
    ids = segment(image, settings.segments, settings.segments_file)
    x = normalize(image)
    with torch.no_grad():
        logits = classifier.model(x)
    target = int(logits.argmax(1)) if settings.target is None else settings.target
    check_target(target, logits.shape[1])
    results = attribute(classifier.model, x, ids, target, settings, mean=classifier.mean, std=classifier.std)
    name = class_name(classifier.classes, target)
    with staged_output(out, "explain") as staging:
        save_explanation(staging, image, ids, results, target, name, settings.top)
    print(
        f"predicted '{class_name(classifier.classes, int(logits.argmax(1)))}'; explained '{name}'; wrote {out}/explanation.png"
    )
    return out


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
    ex.add_argument(
        "--task",
        choices=TASKS,
        default="classification",
        help="segmentation: explain a class over a region of a segmentation model's output (--model demo: the "
        "bundled demo segmentation model; or a torchvision one, e.g. deeplabv3_resnet50); detection: explain one "
        "detection of a detector (--model demo: the bundled demo detector; or a torchvision one, e.g. "
        "retinanet_resnet50_fpn)",
    )
    ex.add_argument(
        "--target",
        type=at_least(0),
        help="class index to explain (default: the top prediction; for segmentation the class predicted on most "
        "pixels other than the background; for detection the best-scoring detection, of this class if given)",
    )
    ex.add_argument(
        "--region-file",
        type=Path,
        help="segmentation: .npy bool array (H, W) of the output pixels to explain (default: those predicted as "
        "--target)",
    )
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
    if args.task != "segmentation" and args.region_file is not None:
        raise CommandError("--region-file is for a segmentation model: give --task segmentation.")
    classifier = load_model(args.model, args.weights, args.num_classes, args.task)
    image = args.image
    if image is None:
        if args.model != "demo":
            raise CommandError(
                f"--image is needed with --model {args.model} (the bundled scene is for the demo model)."
            )
        from ..demo.model import SCENE

        image = SCENE
    settings = ExplainSettings(
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
    if args.task == "segmentation":
        return explain_region(classifier, image, args.out, settings, region_file=args.region_file)
    if args.task == "detection":
        return explain_detection(classifier, image, args.out, settings)
    return explain_image(classifier, image, args.out, settings)


def _run_on_dataset(args: argparse.Namespace) -> Path:
    from ..datasets import OutputMismatchError, explain_dataset

    check_engine(args)
    if args.task != "classification":
        raise CommandError(
            "dataset runs (--images) explain classifiers; explain a segmentation or a detection one image at a time."
        )
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
