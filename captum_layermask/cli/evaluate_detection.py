"""``layermask evaluate --task detection``: missingness bias of a detector, mAP@0.5 under random patch removal and
where Lime's top patches for a detection lie, under black, grey and layer masking
(:mod:`captum_layermask.evaluation.detection`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch

from ..evaluation.detection import FILLS, box_masks, read_coco
from ..evaluation.detection_report import MASKINGS, evaluate_detector
from ..weights import load_model
from .io import MANIFEST, CommandError


def evaluation_data(args: argparse.Namespace, size: int):
    """Images ``(N, 3, S, S)`` in ``[0, 1]``, their targets, object masks and the labels scored: held-out demo scenes
    (with their exact object masks), or ``--images`` with COCO-style ``--annotations`` (boxes as the objects)."""
    if args.images is None:
        from ..demo import shapes

        scenes = shapes.segmentation_scenes(args.limit or 200, torch.Generator().manual_seed(args.data_seed))
        return scenes.images, shapes.detection_targets(scenes), scenes.object_masks, range(1, len(shapes.CLASSES) + 1)
    try:
        images, targets, names = read_coco(args.annotations, args.images, size, args.limit)
    except ValueError as error:
        raise CommandError(str(error)) from None
    labels = sorted({int(label) for target in targets for label in target["labels"]} | set(names))
    return images, targets, box_masks(targets, size, size), labels


def evaluate_detection(args: argparse.Namespace) -> Path:
    """``--task detection``: the detector (the demo one by default) on held-out demo scenes or on ``--images``
    with ``--annotations``; writes the tables and the figure into ``--out``."""
    if (args.images is None) != (args.annotations is None):
        raise CommandError("--task detection takes --images and --annotations together (or neither: the demo scenes).")
    if args.images is None and args.model != "demo":
        raise CommandError(
            f"--images and --annotations are needed with --model {args.model} (the scenes are the demo's)."
        )
    model = load_model(args.model, args.weights, args.num_classes, "detection")
    maskings: Sequence[str] = [m for m in args.maskers if m in MASKINGS] or list(MASKINGS)
    images, targets, objects, labels = evaluation_data(args, args.size or model.size)
    report = evaluate_detector(
        model.model, images, objects, targets, labels, maskings, args.lime_images, args.samples, args.seed
    )
    args.out.mkdir(parents=True, exist_ok=True)
    files = report.save(args.out)
    (args.out / MANIFEST).write_text(json.dumps({"command": "evaluate", "files": files}, indent=1) + "\n")
    print(report.markdown())
    print(f"wrote {args.out}/results.md (fills of the detector's [0, 1] input: {FILLS})")
    return args.out
