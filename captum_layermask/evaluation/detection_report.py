"""Missingness bias of the demo detector: mAP@0.5 under random patch removal and where Lime's top patches for a
detection lie, under black, grey and layer masking.

    python -m captum_layermask.evaluation.detection_report [--scenes 200] [--lime-scenes 30] [--samples 200]
        [--figure docs/images/detection-removal.png]

Held-out scenes (one or two shapes) rendered from a seed the detector was not trained on; the same removed
patches and Lime samples for every masking (:mod:`captum_layermask.evaluation.detection`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--lime-scenes", type=int, default=30)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--figure", type=Path)
    args = parser.parse_args()
    started = time.time()
    detector = load_demo_detector()
    scenes = shapes.segmentation_scenes(args.scenes, torch.Generator().manual_seed(args.seed))
    targets = shapes.detection_targets(scenes)
    labels = range(1, len(shapes.CLASSES) + 1)
    curves = removal_map(detector, scenes.images, scenes.object_masks, targets, labels, FRACTIONS, MASKINGS)
    print(f"mAP@0.5 under random removal of 16x16 patches ({args.scenes} scenes)")
    print(f"{'removed':>10}" + "".join(f"{masking:>8}" for masking in MASKINGS))
    for index, fraction in enumerate(FRACTIONS):
        print(f"{fraction:>10.1f}" + "".join(f"{curves[masking][index]:>8.3f}" for masking in MASKINGS))
    k = args.lime_scenes
    shares, explained = lime_object_share(
        detector, scenes.images[:k], scenes.object_masks[:k], targets[:k], MASKINGS, samples=args.samples
    )
    print(f"share of Lime's top 5 patches on the detected object ({explained} detections, {args.samples} samples)")
    print("".join(f"{masking:>8}" for masking in MASKINGS))
    print("".join(f"{shares[masking]:>8.3f}" for masking in MASKINGS))
    if args.figure:
        plot(curves, FRACTIONS, shares, args.figure)
        print(f"figure: {args.figure}")
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
