"""Throughput of dataset runs: the local engine against a hand-written loop over ``Lime.attribute``, and the Ray
engine against the local one, on this machine's CPUs (issue: datasets).

Lime (500 samples, 16x16 patches, layer masking and grey fill) explains the demo model's shapes scenes. The
hand-written loop is what the runner does per image (the same seeds and calls) without writing results; the
local engine runs in this process with ``--threads`` torch threads; the Ray engine runs ``--threads`` model actors
of one thread each on a local Ray instance (Ray's start-up included). Each is run once, in turn.

    .venv/bin/python benchmarks/dataset_engines.py [--images 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from captum.attr import Lime

from captum_layermask import LayerMask, layer_masked, patch_segments
from captum_layermask.datasets import explain_dataset
from captum_layermask.demo import shapes
from captum_layermask.demo.model import load_demo_model
from captum_layermask.evaluation.images import read_image

SAMPLES, PER_EVAL = 500, 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    scenes = shapes.render(args.images, torch.Generator().manual_seed(0))
    for index, image in enumerate(scenes.images):
        torchvision.utils.save_image(image, root / f"{index:03d}.png")
    model = load_demo_model()
    options = dict(
        method="lime", maskers=("layer", "grey"), segments="patches", size=128, mean=shapes.MEAN, std=shapes.STD,
        samples=SAMPLES, perturbations_per_eval=PER_EVAL, show_progress=False,
    )  # fmt: skip

    def hand_loop() -> None:
        torch.set_num_threads(args.threads)
        masked, segments = layer_masked(model), patch_segments(128, 128, 16)
        for position, path in enumerate(sorted(root.glob("*.png"))):
            x = (read_image(path, 128) - 0.5) / 0.25
            target = int(model(x).argmax(1))
            for forward, baseline in ((masked, LayerMask()), (model, 0.0)):
                torch.manual_seed(position)
                Lime(forward).attribute(
                    x, target=target, feature_mask=segments, baselines=baseline, n_samples=SAMPLES,
                    perturbations_per_eval=PER_EVAL,
                )  # fmt: skip

    def engine(name: str) -> None:
        out = root / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        extra = {"threads": args.threads} if name == "local" else {"threads": 1, "workers": args.threads}
        explain_dataset(model, sorted(root.glob("*.png")), out, engine=name, **options, **extra)

    times = {}
    for name, run in (("hand-written loop", hand_loop), ("local engine", lambda: engine("local")),
                      ("ray engine", lambda: engine("ray"))):  # fmt: skip
        start = time.perf_counter()
        run()
        times[name] = time.perf_counter() - start
    print(f"Lime on the demo model, {args.images} images, {SAMPLES} samples, 2 maskers, {args.threads} CPU threads")
    for name, seconds in times.items():
        print(f"  {name:18s} {seconds:7.1f} s  {args.images / seconds:6.2f} images/s")
    print(f"  local engine / hand-written loop, throughput: {times['hand-written loop'] / times['local engine']:.2f}")
    print(f"  ray engine / local engine, throughput:        {times['local engine'] / times['ray engine']:.2f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
