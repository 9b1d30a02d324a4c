"""Cost of LayerMask() in Captum: Lime on ResNet-18 (or vit_b_16, ...), 224x224, 500 samples, perturbations_per_eval=16.

Runs Lime with ``baselines=LayerMask()`` on the layer-masked model and with a grey baseline (0 after
normalisation) on the plain model, alternately, with the same random samples, and prints the median time of
each and the median of the per-pair ratios.

On a ViT the layer-masked model runs its encoder on the visible tokens only (about half of them in Lime's
samples), so it is faster than the plain model on grey-filled images.

    .venv/bin/python benchmarks/captum_lime.py [--model resnet18 | --model vit_b_16] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import torch
import torchvision
from _timing import paired_times, parse_arguments, print_medians, ratio_of_pairs
from captum.attr import Lime

from captum_layermask import LayerMask, layer_masked, patch_segments
from captum_layermask.core import native

SIZE, PATCH, SAMPLES, PER_EVAL = 224, 16, 500, 16


def main() -> None:
    args = parse_arguments(__doc__.splitlines()[0], "--rounds", 3, model="resnet18")
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model).eval().to(args.device)
    x = torch.randn(1, 3, SIZE, SIZE).to(args.device)
    segments = patch_segments(SIZE, SIZE, PATCH).to(args.device)
    masked = layer_masked(model)
    runs = {
        "grey baseline, plain model": (Lime(model), 0.0),
        "LayerMask(), layer-masked model": (Lime(masked), LayerMask()),
    }

    def lime_run(lime, baseline, samples=SAMPLES):
        torch.manual_seed(1)  # the same samples for both
        lime.attribute(
            x, target=0, feature_mask=segments, baselines=baseline, n_samples=samples, perturbations_per_eval=PER_EVAL
        )

    for lime, baseline in runs.values():  # one-time costs (weight reorders, first Lasso fit) out of the timing
        lime_run(lime, baseline, samples=PER_EVAL)
    times = paired_times(
        {name: (lambda pair=pair: lime_run(*pair)) for name, pair in runs.items()},
        args.repeats,
        warmup=0,
        device=args.device,
    )
    grey, layer = times.values()
    print(
        f"Lime, {args.model}, {SIZE}x{SIZE}, {(SIZE // PATCH) ** 2} patches, {SAMPLES} samples, perturbations_per_eval={PER_EVAL}, {args.device}, {args.threads} threads; neighbor padding: {native.status()}"
    )
    print_medians(times, decimals=2)
    print(f"  ratio (median of pairs): {ratio_of_pairs(layer, grey):.2f}")


if __name__ == "__main__":
    main()
