"""Missingness bias of the demo detector: mAP@0.5 under random patch removal and where Lime's top patches for a
detection lie, under black, grey and layer masking.

    python -m captum_layermask.evaluation.detection_report [--scenes 200] [--lime-scenes 30] [--samples 200]
        [--figure docs/images/detection-removal.png]

Held-out scenes (one or two shapes) rendered from a seed the detector was not trained on; the same removed
patches and Lime samples for every masking (:mod:`captum_layermask.evaluation.detection`).
"""

from __future__ import annotations

import argparse
import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from ..demo import shapes
from ..demo.model import load_demo_detector
from .detection import lime_object_share, removal_map

FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.5)
MASKINGS = ("black", "grey", "layer")


def plot(curves: Dict[str, List[float]], fractions: Sequence[float], shares: Dict[str, float], path: Path) -> None:
    """The removal curves of mAP and the Lime shares, side by side."""
    import matplotlib.pyplot as plt

    titles = {"black": "black fill", "grey": "grey fill", "layer": "layer masking"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for masking, values in curves.items():
        left.plot(fractions, values, marker="o", label=titles[masking])
    left.set_xlabel("share of 16x16 patches removed")
    left.set_ylabel("mAP@0.5 (objects half visible or more)")
    left.legend()
    right.bar([titles[m] for m in shares], list(shares.values()), color=["0.2", "0.6", "tab:green"])
    right.set_ylabel("share of Lime's top 5 patches on the object")
    right.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class DetectionReport:
    """What :func:`evaluate_detector` measured.

    Attributes:
        curves: per masking, mAP@0.5 at each of :data:`FRACTIONS` of the patches removed.
        shares: per masking, the share of Lime's top 5 patches on the detected object.
        explained: how many detections Lime explained.
    """

    curves: Dict[str, List[float]]
    shares: Dict[str, float]
    explained: int

    def markdown(self) -> str:
        """The two tables."""
        maskings = list(self.curves)
        lines = ["# Missingness bias of the detector", "", "## mAP@0.5 under random removal of 16x16 patches", ""]
        lines += ["| share removed | " + " | ".join(maskings) + " |", "|---" * (len(maskings) + 1) + "|"]
        for index, fraction in enumerate(FRACTIONS):
            lines.append(f"| {fraction:.1f} | " + " | ".join(f"{self.curves[m][index]:.3f}" for m in maskings) + " |")
        lines += ["", f"## share of Lime's top 5 patches on the detected object ({self.explained} detections)", ""]
        lines += ["| masking | share on the object |", "|---|---|"]
        lines += [f"| {masking} | {share:.3f} |" for masking, share in self.shares.items()]
        return "\n".join(lines) + "\n"

    def save(self, out: Path) -> List[str]:
        """Writes ``results.md``, ``results.csv`` and ``detection_removal.png`` into ``out``; returns their names."""
        maskings = list(self.curves)
        (out / "results.md").write_text(self.markdown())
        with open(out / "results.csv", "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["measure", "share_removed", *maskings])
            for index, fraction in enumerate(FRACTIONS):
                writer.writerow(["map50", fraction, *(f"{self.curves[m][index]:.6f}" for m in maskings)])
            shares = (f"{self.shares.get(m, float('nan')):.6f}" for m in maskings)
            writer.writerow(["lime_top5_on_object", "", *shares])
        plot(self.curves, FRACTIONS, self.shares, out / "detection_removal.png")
        return ["results.md", "results.csv", "detection_removal.png"]


def evaluate_detector(
    detector: nn.Module,
    images: Tensor,
    object_masks: Tensor,
    targets: Sequence[Dict[str, Tensor]],
    labels: Sequence[int],
    maskings: Sequence[str] = MASKINGS,
    lime_images: int = 30,
    samples: int = 200,
    seed: int = 0,
) -> DetectionReport:
    """mAP under random patch removal (:func:`~captum_layermask.evaluation.detection.removal_map`) on every image
    and Lime's top patches (:func:`~captum_layermask.evaluation.detection.lime_object_share`) on the first
    ``lime_images``, under each masking."""
    curves = removal_map(detector, images, object_masks, targets, labels, FRACTIONS, maskings, seed=seed)
    k = lime_images
    shares, explained = lime_object_share(
        detector, images[:k], object_masks[:k], targets[:k], maskings, samples=samples, seed=seed
    )
    return DetectionReport(curves, shares, explained)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--lime-scenes", type=int, default=30)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--figure", type=Path)
    args = parser.parse_args()
    started = time.time()
    scenes = shapes.segmentation_scenes(args.scenes, torch.Generator().manual_seed(args.seed))
    targets = shapes.detection_targets(scenes)
    labels = range(1, len(shapes.CLASSES) + 1)
    report = evaluate_detector(
        load_demo_detector(),
        scenes.images,
        scenes.object_masks,
        targets,
        labels,
        MASKINGS,
        args.lime_scenes,
        args.samples,
    )
    print(f"{args.scenes} scenes, Lime with {args.samples} samples")
    print(report.markdown())
    if args.figure:
        plot(report.curves, FRACTIONS, report.shares, args.figure)
        print(f"figure: {args.figure}")
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
