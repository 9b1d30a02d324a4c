"""``layermask evaluate``: missingness bias of a model under several maskers, written as tables and figures.

The per-image part (removal curves, shape bias, LIME metrics) runs through the dataset runner
(:func:`~captum_layermask.datasets.evaluate_dataset`, one run per segmenter in ``<out>/runs/<segmenter>``), in
this process or on Ray, and resumes where an interrupted run stopped; the diagnostics, on a few images, run here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..datasets import OutputMismatchError, evaluate_dataset
from ..datasets.sources import ImageSource, image_source
from ..evaluation.maskers import MASKER_NAMES, get_masker
from ..evaluation.normalization import normalizer
from ..evaluation.report import EvaluationReport, diagnose
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
from .evaluate_detection import evaluate_detection
from .io import MANIFEST, CommandError, check_output_folder

DESCRIPTION = (
    "Measures how much each masking method distorts the model (paper section 4): removal curves of accuracy, class "
    "entropy and unchanged predictions with their AUC, shape bias, and LIME's top-k ablation accuracy, alignment "
    "score and top-k Jaccard. Writes results.md, results.csv and figures; per-image results stay in <out>/runs, so "
    "an interrupted run resumes. With no arguments it evaluates the bundled demo model on held-out demo scenes, "
    "offline."
)


def evaluation_source(
    classifier: Classifier,
    images: Optional[Path],
    object_masks: Optional[Path],
    *,
    demo: bool,
    limit: Optional[int],
    data_seed: int,
) -> ImageSource:
    """The images of ``images`` (with their labels and optional object masks), or held-out demo scenes."""
    if images is None:
        if not demo:
            raise CommandError(
                "--images is needed with a torchvision model (the bundled scenes are for the demo model)."
            )
        from ..demo import shapes

        scenes = shapes.render(limit or 64, torch.Generator().manual_seed(data_seed), objects=1)
        dataset = torch.utils.data.TensorDataset(scenes.images, scenes.labels[:, 0], scenes.object_masks[:, 0])
        return image_source(dataset)
    try:
        source = image_source(images, object_masks)
    except FileNotFoundError as error:
        message = str(error)
        if not images.is_dir():
            message = f"--images {images} is not a folder; give a folder with one subfolder of images per class."
        raise CommandError(message) from None
    if source.labels is None:
        raise CommandError(f"--images {images} holds no images in class subfolders (<folder>/<class>/<image>).")
    if limit and limit < len(source.keys):
        chosen = torch.randperm(len(source.keys), generator=torch.Generator().manual_seed(data_seed))[:limit]
        source = source.subset(sorted(chosen.tolist()))
    return source


def _labels(source: ImageSource) -> Sequence[int]:
    if source.labels is not None:
        return source.labels
    return [int(source.dataset[index][1]) for index in range(len(source.keys))]


def _start_output(out: Path) -> None:
    """Refuses an ``--out`` holding other files; marks it as this command's, so that an interrupted run resumes."""
    check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MANIFEST).exists():
        (out / MANIFEST).write_text(json.dumps({"command": "evaluate", "files": ["runs"]}, indent=1) + "\n")


def evaluate_command(
    classifier: Classifier,
    source: ImageSource,
    out: Path,
    *,
    maskers: Sequence[str],
    segmenters: Sequence[str],
    fractions: int,
    lime_images: int,
    diagnostic_images: int,
    samples: int,
    top_k: Optional[int],
    batch_size: int,
    seed: int,
    residual: str = "intersection",
    engine: str = "local",
    address: Optional[str] = None,
    size: Optional[int] = None,
) -> Path:
    """Evaluates ``source`` with :func:`~captum_layermask.datasets.evaluate_dataset` per segmenter and the
    diagnostics on its first ``diagnostic_images`` images, then writes ``results.md``, ``results.csv`` and
    figures into ``out``."""
    side = size or classifier.size
    with torch.no_grad():
        width = classifier.model(torch.zeros(1, 3, side, side)).shape[1]
    if max(_labels(source)) >= width:
        raise CommandError(
            f"labels go up to {max(_labels(source))}, but the model has {width} classes: check the class folders or --num-classes."
        )
    _start_output(out)
    report = EvaluationReport()
    for segmenter in segmenters:
        try:
            run = evaluate_dataset(
                classifier.model,
                source,
                out / "runs" / segmenter,
                maskers=maskers,
                segments=segmenter,
                fractions=[i / (fractions - 1) for i in range(fractions)],
                lime_images=lime_images,
                samples=samples,
                top_k=top_k,
                size=side,
                mean=classifier.mean,
                std=classifier.std,
                residual=residual,
                seed=seed,
                batch_size=batch_size,
                engine=engine,
                address=address,
            )
        except OutputMismatchError as error:
            raise CommandError(f"{error} (give a new --out, or remove {out})") from None
        except (FileNotFoundError, ValueError) as error:
            raise CommandError(str(error)) from None
        try:
            part = run.report()
        except ValueError as error:
            raise CommandError(str(error)) from None
        report.images, report.lime_images = part.images, max(report.lime_images, part.lime_images)
        report.removal += part.removal
        report.lime.update(part.lime)
        report.shape = report.shape or part.shape
    if diagnostic_images > 0:
        normalize = normalizer(classifier.mean, classifier.std)
        readable = [i for i, key in enumerate(source.keys) if key not in run.errors][:diagnostic_images]
        first = [source.load(i, side)[0] for i in readable]
        maskers_ = [get_masker(name, classifier.mean, classifier.std, residual) for name in maskers]
        diagnose(report, classifier.model, normalize(torch.stack(first)), maskers_, batch_size=batch_size)
    (out / "results.md").write_text(report.to_markdown())
    report.to_csv(out / "results.csv")
    figures = report.save_figures(out, classifier.classes)
    files = ["runs", "results.md", "results.csv", *(path.name for path in figures)]
    (out / MANIFEST).write_text(json.dumps({"command": "evaluate", "files": files}, indent=1) + "\n")
    print(report.to_markdown())
    print(f"wrote {out}/results.md, results.csv and figures")
    return out


def add_command(commands: argparse._SubParsersAction) -> None:
    """Adds ``layermask evaluate`` to the command's subparsers."""
    ev = commands.add_parser(
        "evaluate",
        help="measure missingness bias: removal curves, shape bias, LIME metrics",
        description=DESCRIPTION,
    )
    add_model_arguments(ev)
    ev.add_argument(
        "--task",
        choices=TASKS,
        default="classification",
        help="segmentation: mean IoU removal curves on the visible pixels and where a region's explanation lies, "
        "for a segmentation model (demo, or a torchvision one such as deeplabv3_resnet50) on --images with "
        "--labels (default: held-out demo scenes; docs/evaluation.md); detection: mAP@0.5 under patch removal and "
        "where Lime's top patches for a detection lie, for a detector (demo, or a torchvision one) on --images with "
        "COCO-style --annotations",
    )
    ev.add_argument(
        "--annotations",
        type=Path,
        help="--task detection: a COCO-style JSON file of --images' boxes (images, annotations, categories)",
    )
    ev.add_argument(
        "--images", type=Path, help="ImageNet-style folder <images>/<class>/<image> (default: held-out demo scenes)"
    )
    ev.add_argument(
        "--labels",
        type=Path,
        help="--task segmentation: folder of label maps <labels>/<image name>.png, one class index per pixel "
        "(Pascal VOC's SegmentationClass; 255 is not scored)",
    )
    ev.add_argument(
        "--object-masks",
        type=Path,
        help="folder <masks>/<class>/<image name>.png, non-zero on the object (enables shape bias and LIME alignment)",
    )
    ev.add_argument(
        "--limit",
        type=at_least(1),
        help="evaluate on this many images (a seeded random subset of --images; demo: 64 scenes)",
    )
    ev.add_argument("--size", type=at_least(1), help="input resolution of --images (default 224)")
    ev.add_argument(
        "--maskers",
        type=subset(MASKER_NAMES, "maskers"),
        default=["black", "grey", "layer"],
        help="comma-separated subset of " + ",".join(MASKER_NAMES),
    )
    ev.add_argument(
        "--segments",
        type=subset(SEGMENTER_NAMES, "segmenters"),
        default=["patches"],
        help="comma-separated subset of patches,slic,quickshift",
    )
    ev.add_argument(
        "--fractions", type=at_least(2), default=11, help="points of the removal curves, evenly spaced from 0 to 1"
    )
    ev.add_argument(
        "--lime-images", type=at_least(0), default=32, help="images explained with LIME for its metrics (0: none)"
    )
    ev.add_argument(
        "--diagnostic-images",
        type=at_least(0),
        default=16,
        help="images for linearity, output collapse and feature magnitude (0: none)",
    )
    ev.add_argument("--samples", type=at_least(1), default=500, help="LIME samples per image (paper: 500)")
    ev.add_argument(
        "--top-k",
        type=at_least(1),
        help="segments taken by the top-k LIME metrics (default: a tenth of each image's segments, as the paper's 20 of 196)",
    )
    ev.add_argument("--batch-size", type=at_least(1), default=64, help="images per forward pass")
    ev.add_argument("--seed", type=int, default=0, help="seed of the random removal order and of LIME's samples")
    ev.add_argument("--data-seed", type=int, default=1000, help="seed of the demo scenes and of the --limit subset")
    add_engine_arguments(ev, "")
    add_common_arguments(
        ev, Path("evaluate-output"), "output folder: resumed with the same arguments, refused with others"
    )
    ev.set_defaults(run=run)


def run(args: argparse.Namespace) -> Path:
    check_engine(args)
    check_output_folder(args.out)  # before any work
    if args.task == "segmentation":
        return _evaluate_segmentation(args)
    if args.task == "detection":
        if args.engine != "local":
            raise CommandError("--task detection runs in this process; --engine is for dataset runs.")
        return evaluate_detection(args)
    classifier = load_classifier(args.model, args.weights, args.num_classes)
    source = evaluation_source(
        classifier,
        args.images,
        args.object_masks,
        demo=args.model == "demo",
        limit=args.limit,
        data_seed=args.data_seed,
    )
    return evaluate_command(
        classifier,
        source,
        args.out,
        maskers=args.maskers,
        segmenters=args.segments,
        fractions=args.fractions,
        lime_images=args.lime_images,
        diagnostic_images=args.diagnostic_images,
        samples=args.samples,
        top_k=args.top_k,
        batch_size=args.batch_size,
        seed=args.seed,
        residual=args.residual,
        engine=args.engine,
        address=args.address,
        size=args.size,
    )


def _evaluate_segmentation(args: argparse.Namespace) -> Path:
    """``--task segmentation``: the segmentation model (the demo one by default) on ``--images`` with their
    ``--labels`` (or held-out demo scenes with one or two objects each), through the dataset runner (resumable,
    ``--engine ray``): mean IoU removal curves and region shares."""
    if (args.images is None) != (args.labels is None):
        raise CommandError("--task segmentation takes --images and --labels together (or neither: the demo scenes).")
    if args.images is None and args.model != "demo":
        raise CommandError(f"--images and --labels are needed with --model {args.model} (the scenes are the demo's).")
    model = load_model(args.model, args.weights, args.num_classes, "segmentation")
    images, labels = args.images, args.labels
    if images is None:
        from ..demo import shapes

        scenes = shapes.segmentation_scenes(args.limit or 64, torch.Generator().manual_seed(args.data_seed))
        images = torch.utils.data.TensorDataset(scenes.images, shapes.pixel_labels(scenes))
    _start_output(args.out)
    try:
        run = evaluate_dataset(
            model.model, images, args.out / "runs" / "segmentation", task="segmentation", label_maps=labels,
            maskers=[m for m in args.maskers if m in ("black", "grey", "layer")], size=args.size or model.size,
            mean=model.mean, std=model.std, lime_images=args.lime_images, seed=args.seed,
            batch_size=args.batch_size, engine=args.engine, address=args.address, output=model.output,
        )  # fmt: skip
        report = run.report()
    except (OutputMismatchError, FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from None
    files = ["runs", *(path.name for path in report.save(args.out))]
    (args.out / MANIFEST).write_text(json.dumps({"command": "evaluate", "files": files}, indent=1) + "\n")
    print(report.markdown())
    print(f"wrote {args.out}/results.md")
    return args.out
