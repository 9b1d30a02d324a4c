"""Cost of LayerMask() in Captum: Lime on ResNet-18, 224x224, 500 samples, perturbations_per_eval=16 (issue: Captum).

Runs Lime with ``baselines=LayerMask()`` on the layer-masked model and with a grey baseline (0 after
normalisation) on the plain model, alternately, with the same random samples, and prints the median time of
each and the median of the per-pair ratios.

    .venv/bin/python benchmarks/captum_lime.py [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import torch
import torchvision
from _timing import paired_times, parse_arguments, print_medians, ratio_of_pairs
from captum.attr import Lime

from captum_layermask import LayerMask, layer_masked, patch_segments

SIZE, PATCH, SAMPLES, PER_EVAL = 224, 16, 500, 16


def main() -> None:
    args = parse_arguments(__doc__.splitlines()[0], "--rounds", 3)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    segments = patch_segments(SIZE, SIZE, PATCH)
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
        {name: (lambda pair=pair: lime_run(*pair)) for name, pair in runs.items()}, args.repeats, warmup=0
    )
    grey, layer = times.values()
    print(
        f"Lime, ResNet-18, {SIZE}x{SIZE}, {(SIZE // PATCH) ** 2} patches, {SAMPLES} samples, perturbations_per_eval={PER_EVAL}, {args.threads} threads"
    )
    print_medians(times, decimals=2)
    print(f"  ratio (median of pairs): {ratio_of_pairs(layer, grey):.2f}")


if __name__ == "__main__":
    main()
