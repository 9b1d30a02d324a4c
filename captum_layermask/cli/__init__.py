"""The ``layermask`` command (also ``python -m captum_layermask``).

``layermask explain`` explains an image's prediction with Lime, KernelShap, FeatureAblation or Occlusion under
black, grey and layer masking side by side, and writes a figure in the style of the paper's Figure 8 (top
segments for the class in green, against it in red) with the raw attributions. ``layermask evaluate`` measures
missingness bias (removal curves, shape bias, LIME metrics, diagnostics). With no arguments both use the bundled
demo model, offline.
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from ..core.errors import LayerMaskError
from ..datasets.explain import MASKINGS, METHODS
from ..datasets.ray_engine import ClusterUnreachableError
from ..evaluation.maskers import MASKER_NAMES
from ..evaluation.segmentation import SEGMENTER_NAMES
from ..weights import load_classifier
from .evaluate import DESCRIPTION as EVALUATE_DESCRIPTION
from .evaluate import evaluate_command, evaluation_source
from .explain import explain_image
from .io import CommandError, check_output_folder

EXPLAIN_DESCRIPTION = (
    "Explains an image's prediction with Lime, KernelShap, FeatureAblation or Occlusion under black, grey and layer "
    "masking side by side, and writes a figure in the style of the paper's Figure 8 (top segments for the class in "
    "green, against it in red) with the raw attributions. With no arguments it explains the bundled demo scene with "
    "the bundled demo model, offline."
)


def _subset(choices: Sequence[str], what: str) -> Callable[[str], List[str]]:
    def parse(value: str) -> List[str]:
        names = [name.strip() for name in value.split(",") if name.strip()]
        if not names or any(name not in choices for name in names):
            raise argparse.ArgumentTypeError(f"{what} are a comma-separated subset of {','.join(choices)}")
        return names

    return parse


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number

    return parse


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="demo", help="'demo' (bundled, offline) or a torchvision classifier name, e.g. resnet50"
    )
    parser.add_argument(
        "--weights",
        help="state-dict file (loaded with weights_only=True) or a torchvision weights name, e.g. IMAGENET1K_V2",
    )
    parser.add_argument(
        "--num-classes", type=_at_least(1), help="classes of a torchvision model whose weights file has another head"
    )


def _add_common_arguments(parser: argparse.ArgumentParser, out: Path, out_help: str) -> None:
    parser.add_argument("--out", type=Path, default=out, help=out_help)
    parser.add_argument(
        "--residual",
        choices=("intersection", "union"),
        default="intersection",
        help="how layer masking combines the masks of a residual sum: the paper's intersection (default) or the union (docs/masking.md)",
    )


def _add_engine_arguments(parser: argparse.ArgumentParser, scope: str) -> None:
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help=f"{scope}this process, or Ray Data (default local; docs/datasets.md)",
    )
    parser.add_argument("--address", help="with --engine ray: an existing Ray cluster (default: a local Ray instance)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layermask", description="Perturbation-based explanations of CNNs with layer masking."
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser(
        "explain", help="explain one image under black, grey and layer masking", description=EXPLAIN_DESCRIPTION
    )
    _add_model_arguments(ex)
    given = ex.add_mutually_exclusive_group()
    given.add_argument("--image", type=Path, help="image file (default: the bundled demo scene)")
    given.add_argument(
        "--images",
        type=Path,
        nargs="+",
        help="a whole dataset: an image folder (<folder>/<class>/<image>, or flat) or several image files; "
        "results per image in --out, resumable (docs/datasets.md)",
    )
    ex.add_argument("--target", type=_at_least(0), help="class index to explain (default: the top prediction)")
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
        "--maskings",
        type=_subset(MASKINGS, "maskings"),
        default=list(MASKINGS),
        help="comma-separated subset of black,grey,layer",
    )
    ex.add_argument(
        "--samples", type=_at_least(1), default=500, help="perturbed samples for Lime and KernelShap (paper: 500)"
    )
    ex.add_argument("--per-eval", type=_at_least(1), default=16, help="perturbations per forward pass")
    ex.add_argument(
        "--size", type=_at_least(1), help="input resolution (default: 128 for the demo model, 224 otherwise)"
    )
    ex.add_argument("--top", type=_at_least(1), default=5, help="segments highlighted each way")
    ex.add_argument("--seed", type=int, default=0, help="seed of the perturbation samples")
    _add_engine_arguments(ex, "with --images: ")
    _add_common_arguments(
        ex,
        Path("explain-output"),
        "output folder: replaced if it holds an earlier output; with --images, a resumable run folder",
    )
    ex.set_defaults(run=_explain)

    ev = commands.add_parser(
        "evaluate",
        help="measure missingness bias: removal curves, shape bias, LIME metrics",
        description=EVALUATE_DESCRIPTION,
    )
    _add_model_arguments(ev)
    ev.add_argument(
        "--images", type=Path, help="ImageNet-style folder <images>/<class>/<image> (default: held-out demo scenes)"
    )
    ev.add_argument(
        "--object-masks",
        type=Path,
        help="folder <masks>/<class>/<image name>.png, non-zero on the object (enables shape bias and LIME alignment)",
    )
    ev.add_argument(
        "--limit",
        type=_at_least(1),
        help="evaluate on this many images (a seeded random subset of --images; demo: 64 scenes)",
    )
    ev.add_argument("--size", type=_at_least(1), help="input resolution of --images (default 224)")
    ev.add_argument(
        "--maskers",
        type=_subset(MASKER_NAMES, "maskers"),
        default=["black", "grey", "layer"],
        help="comma-separated subset of " + ",".join(MASKER_NAMES),
    )
    ev.add_argument(
        "--segments",
        type=_subset(SEGMENTER_NAMES, "segmenters"),
        default=["patches"],
        help="comma-separated subset of patches,slic,quickshift",
    )
    ev.add_argument(
        "--fractions", type=_at_least(2), default=11, help="points of the removal curves, evenly spaced from 0 to 1"
    )
    ev.add_argument(
        "--lime-images", type=_at_least(0), default=32, help="images explained with LIME for its metrics (0: none)"
    )
    ev.add_argument(
        "--diagnostic-images",
        type=_at_least(0),
        default=16,
        help="images for linearity, output collapse and feature magnitude (0: none)",
    )
    ev.add_argument("--samples", type=_at_least(1), default=500, help="LIME samples per image (paper: 500)")
    ev.add_argument(
        "--top-k",
        type=_at_least(1),
        help="segments taken by the top-k LIME metrics (default: a tenth of each image's segments, as the paper's 20 of 196)",
    )
    ev.add_argument("--batch-size", type=_at_least(1), default=64, help="images per forward pass")
    ev.add_argument("--seed", type=int, default=0, help="seed of the random removal order and of LIME's samples")
    ev.add_argument("--data-seed", type=int, default=1000, help="seed of the demo scenes and of the --limit subset")
    _add_engine_arguments(ev, "")
    _add_common_arguments(
        ev, Path("evaluate-output"), "output folder: resumed with the same arguments, refused with others"
    )
    ev.set_defaults(run=_evaluate)
    return parser


def _explain(args: argparse.Namespace) -> Path:
    if args.images:
        return _explain_dataset(args)
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
        maskings=args.maskings,
        samples=args.samples,
        per_eval=args.per_eval,
        top=args.top,
        seed=args.seed,
        residual=args.residual,
    )


def _explain_dataset(args: argparse.Namespace) -> Path:
    from ..datasets import OutputMismatchError, explain_dataset

    _check_engine(args)
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
            maskings=args.maskings,
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


def _check_engine(args: argparse.Namespace) -> None:
    if args.address and args.engine != "ray":
        raise CommandError("--address names a Ray cluster: give --engine ray with it.")


def _evaluate(args: argparse.Namespace) -> Path:
    _check_engine(args)
    check_output_folder(args.out)  # before any work
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command; user mistakes print one ``layermask: error:`` line and return 2."""
    args = build_parser().parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # figures go to files only
    try:
        args.run(args)
    except (CommandError, LayerMaskError, ClusterUnreachableError) as error:
        print(f"layermask: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {error.filename}" if error.filename else ""
        print(
            f"layermask: error: no space left on the device{where}; free some space (results written so far are "
            "kept, and the same command resumes a dataset run) or give --out on another disk.",
            file=sys.stderr,
        )
        return 1
    return 0
