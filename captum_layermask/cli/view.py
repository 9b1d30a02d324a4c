"""``layermask view`` (the browser app) and ``layermask report`` (a run as one HTML page)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..weights import load_model
from .arguments import TASKS, add_model_arguments
from .io import CommandError

VIEW_DESCRIPTION = (
    "Starts a local web app: pick or upload an image, click its segments away and see the model's top predictions "
    "under layer masking, grey, black and blur fill side by side; run Lime or KernelShap under each masking; open "
    "finished dataset runs. With no arguments it opens the bundled demo model on demo scenes, offline."
)


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Adds ``layermask view`` and ``layermask report``."""
    view = commands.add_parser("view", help="the browser view (needs the [view] extra)", description=VIEW_DESCRIPTION)
    add_model_arguments(view)
    view.add_argument(
        "--task",
        choices=TASKS,
        default="classification",
        help="the model's task (--model demo: the bundled demo classifier, segmentation model or detector)",
    )
    view.add_argument("--images", type=Path, help="folder of images to offer (default: demo scenes)")
    view.add_argument("--runs", type=Path, nargs="*", default=[], help="dataset run folders to open in the view")
    view.add_argument("--size", type=int, help="input resolution (default: the model's)")
    view.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    view.add_argument("--port", type=int, default=8765)
    view.add_argument("--no-browser", action="store_true", help="do not open the default browser")
    view.set_defaults(run=run_view)
    report = commands.add_parser(
        "report",
        help="a dataset run as one self-contained HTML page",
        description="Writes a finished dataset run "
        "(explain_dataset, evaluate_dataset or layermask evaluate output) as one HTML file, every image inlined.",
    )
    report.add_argument("run_dir", type=Path, help="the run's output folder")
    report.add_argument("--out", type=Path, default=Path("report.html"), help="the HTML file (default: report.html)")
    report.set_defaults(run=run_report)


def run_view(args: argparse.Namespace) -> None:
    from ..view import ImageLibrary, demo_library, serve

    classifier = load_model(args.model, args.weights, args.num_classes, args.task)
    size = args.size or classifier.size
    if args.images is None:
        if args.model != "demo":
            raise CommandError(
                f"--images is needed with --model {args.model} (the demo scenes are for the demo model)."
            )
        library = demo_library(size)
    elif not args.images.is_dir():
        raise CommandError(f"--images {args.images} is not a folder.")
    else:
        library = ImageLibrary.from_folder(args.images, size)
        if not library.images:
            raise CommandError(f"--images {args.images} holds no PNG, JPEG, BMP or WebP image.")
    for folder in args.runs:
        if not folder.is_dir():
            raise CommandError(f"--runs {folder} is not a folder.")
    serve(classifier, library, args.runs, args.host, args.port, open_browser=not args.no_browser, task=args.task)


def run_report(args: argparse.Namespace) -> None:
    from ..view import write_report

    if not args.run_dir.is_dir():
        raise CommandError(f"{args.run_dir} is not a folder.")
    try:
        out = write_report(args.run_dir, args.out)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    print(f"wrote {out}")
