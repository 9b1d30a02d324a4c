"""What the ``layermask`` subcommands share on their command lines: value parsers and argument groups."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, List, Sequence

from .io import CommandError

TASKS = ("classification", "segmentation", "detection")
"""The model tasks the commands take (``--task``)."""


def subset(choices: Sequence[str], what: str) -> Callable[[str], List[str]]:
    def parse(value: str) -> List[str]:
        names = [name.strip() for name in value.split(",") if name.strip()]
        if not names or any(name not in choices for name in names):
            raise argparse.ArgumentTypeError(f"{what} are a comma-separated subset of {','.join(choices)}")
        return names

    return parse


def at_least(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number

    return parse


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="demo", help="'demo' (bundled, offline) or a torchvision classifier name, e.g. resnet50"
    )
    parser.add_argument(
        "--weights",
        help="state-dict file (loaded with weights_only=True) or a torchvision weights name, e.g. IMAGENET1K_V2",
    )
    parser.add_argument(
        "--num-classes", type=at_least(1), help="classes of a torchvision model whose weights file has another head"
    )


def add_common_arguments(parser: argparse.ArgumentParser, out: Path, out_help: str) -> None:
    parser.add_argument("--out", type=Path, default=out, help=out_help)
    parser.add_argument(
        "--residual",
        choices=("intersection", "union"),
        default="intersection",
        help="how layer masking combines the masks of a residual sum: the paper's intersection (default) or the union (docs/masking.md)",
    )


def add_engine_arguments(parser: argparse.ArgumentParser, scope: str) -> None:
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help=f"{scope}this process, or Ray Data (default local; docs/datasets.md)",
    )
    parser.add_argument("--address", help="with --engine ray: an existing Ray cluster (default: a local Ray instance)")


def check_engine(args: argparse.Namespace) -> None:
    if args.address and args.engine != "ray":
        raise CommandError("--address names a Ray cluster: give --engine ray with it.")
