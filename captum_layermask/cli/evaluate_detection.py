"""``layermask evaluate --task detection``: missingness bias of a detector, mAP@0.5 under random patch removal and
where Lime's top patches for a detection lie, under black, grey and layer masking
(:mod:`captum_layermask.evaluation.detection`)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from ..evaluation.detection import FILLS, box_masks, lime_object_share, read_coco, removal_map
from ..evaluation.detection_report import FRACTIONS, plot
from ..weights import load_model
from .io import MANIFEST, CommandError

MASKINGS = ("black", "grey", "layer")


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


def write_results(out: Path, curves: Dict[str, List[float]], shares: Dict[str, float], explained: int) -> List[str]:
    """``results.md``, ``results.csv`` and ``detection_removal.png`` in ``out``; returns their names."""
    maskings = list(curves)
    lines = ["# Missingness bias of the detector", "", "## mAP@0.5 under random removal of 16x16 patches", ""]
    lines += ["| share removed | " + " | ".join(maskings) + " |", "|---" * (len(maskings) + 1) + "|"]
    for index, fraction in enumerate(FRACTIONS):
        lines.append(f"| {fraction:.1f} | " + " | ".join(f"{curves[m][index]:.3f}" for m in maskings) + " |")
    lines += ["", f"## Lime's top 5 patches on the detected object ({explained} detections)", ""]
    lines += ["| masking | share on the object |", "|---|---|"]
    lines += [f"| {masking} | {share:.3f} |" for masking, share in shares.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    with open(out / "results.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["measure", "share_removed", *maskings])
        for index, fraction in enumerate(FRACTIONS):
            writer.writerow(["map50", fraction, *(f"{curves[m][index]:.6f}" for m in maskings)])
        writer.writerow(["lime_top5_on_object", "", *(f"{shares.get(m, float('nan')):.6f}" for m in maskings)])
    plot(curves, FRACTIONS, shares, out / "detection_removal.png")
    return ["results.md", "results.csv", "detection_removal.png"]


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
    torch.manual_seed(args.seed)
    curves = removal_map(model.model, images, objects, targets, labels, FRACTIONS, maskings, seed=args.seed)
    k = args.lime_images
    shares, explained = lime_object_share(
        model.model, images[:k], objects[:k], targets[:k], maskings, samples=args.samples, seed=args.seed
    )
    args.out.mkdir(parents=True, exist_ok=True)
    files = write_results(args.out, curves, shares, explained)
    (args.out / MANIFEST).write_text(json.dumps({"command": "evaluate", "files": files}, indent=1) + "\n")
    print((args.out / "results.md").read_text())
    print(f"wrote {args.out}/results.md (fills of the detector's [0, 1] input: {FILLS})")
    return args.out
