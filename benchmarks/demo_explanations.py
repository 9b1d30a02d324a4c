"""What the demo shows: how often Lime's top segments lie on the object they explain, per masking.

Renders two-object scenes (the bundled demo's kind, held-out seed), explains each object's class with Lime
(16x16 patches, the demo's settings) under black fill, grey fill and layer masking, and reports top-k precision:
the share of the k segments with the largest positive attribution that lie mostly (over half their pixels) on
the explained object. Chance is the share of such segments in the image; the ceiling is what a perfect
ranking scores (objects are small: most cover only one or two segments mostly).

    .venv/bin/python benchmarks/demo_explanations.py [--scenes 12] [--samples 500] [--top 5]
"""

from __future__ import annotations

import argparse

import torch
from _timing import checked_device
from captum.attr import Lime

from captum_layermask import LayerMask, layer_masked, patch_segments
from captum_layermask.demo import shapes
from captum_layermask.demo.model import load_demo_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=12)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(2)
    device = checked_device(parser, args.device)
    model = load_demo_model().to(device)
    masked = layer_masked(model)
    scenes = shapes.render(args.scenes, torch.Generator().manual_seed(args.seed), objects=2)
    segments = patch_segments(shapes.SIZE, shapes.SIZE)
    fills = {
        "black": (model, shapes.normalize(torch.zeros(1, 3, 1, 1)).to(device)),
        "grey": (model, 0.0),
        "layer masking": (masked, LayerMask()),
    }
    hits = {name: 0 for name in fills}
    chance = ceiling = total = 0
    for index in range(args.scenes):
        x = shapes.normalize(scenes.images[index : index + 1])
        for k in range(2):
            target = int(scenes.labels[index, k])
            share = torch.bincount(segments.flatten(), weights=scenes.object_masks[index, k].flatten().double()) / 256
            on_object = share > 0.5
            chance += float(on_object.double().mean()) * args.top
            ceiling += min(int(on_object.sum()), args.top)
            for name, (forward, baseline) in fills.items():
                torch.manual_seed(index)
                attribution = Lime(forward).attribute(
                    x.to(device),
                    target=target,
                    feature_mask=segments.to(device),
                    baselines=baseline,
                    n_samples=args.samples,
                    perturbations_per_eval=16,
                )
                scores = torch.bincount(segments.flatten(), weights=attribution[0].sum(0).flatten().double().cpu())
                hits[name] += int(on_object[scores.topk(args.top).indices].sum())
            total += args.top
    print(
        f"Lime top-{args.top} precision on {args.scenes} two-object scenes ({2 * args.scenes} explanations, {args.samples} samples, 16x16 patches)"
    )
    for name, count in hits.items():
        print(f"  {name:15} {count / total:.3f}")
    print(f"  {'chance':15} {chance / total:.3f}")
    print(f"  {'ceiling':15} {ceiling / total:.3f}")


if __name__ == "__main__":
    main()
