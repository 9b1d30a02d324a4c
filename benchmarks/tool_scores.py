"""ROAD and pixel-flipping scores of the demo model's explanations under four ways of removing pixels (issue: other
tools): grey fill, blur, noisy linear imputation (ROAD's) and layer masking.

Explanations: Lime with layer masking, Lime with grey fill (300 samples, 16x16 patches, true class) and random
scores, on held-out demo scenes resized to 96x96 (Quantus's PixelFlipping removes ``features_in_step`` of the
C*H*W values per step but asserts that it divides H*W, so whole RGB pixels need 3 | H*W: true at 96, not at 128).

- ROAD (Rong et al. 2022): the top p% pixels of the explanation (MoRF) or the bottom p% (LeRF) removed with an
  imputer of ROAD's interface (``imputer.batched_call(img, mask)``: ``LayerMaskImputer`` for layer masking), then
  accuracy; the mean over p = 10, 30, 50, 70, 90. A faithful explanation gives a low MoRF and a high LeRF score.
- Pixel flipping (Quantus ``PixelFlipping``, 36 steps of 256 pixels, ``LayerMaskRemoval`` for layer masking): the
  mean softmax probability of the true class along the flipping curve (lower: the explanation found what matters).

    .venv/bin/python benchmarks/tool_scores.py [--images 16]
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import quantus
import torch
import torch.nn.functional as F
import torchvision
from quantus.functions.perturb_func import noisy_linear_imputation

from captum_layermask import layer_masked, patch_segments
from captum_layermask.demo import shapes
from captum_layermask.demo.model import load_demo_model
from captum_layermask.evaluation import lime_attributions
from captum_layermask.interop import NaNMasked
from captum_layermask.interop.quantus import LayerMaskRemoval
from captum_layermask.interop.road import LayerMaskImputer

SIDE, PERCENTAGES, STEP = 96, (10, 30, 50, 70, 90), 3 * 256
MEAN = torch.tensor(shapes.MEAN).view(1, 3, 1, 1)
STD = torch.tensor(shapes.STD).view(1, 3, 1, 1)


def blurred(images: torch.Tensor) -> torch.Tensor:
    return torchvision.transforms.functional.gaussian_blur(images, kernel_size=[21, 21], sigma=[5.0, 5.0])


class FillImputer:
    """ROAD's imputer interface for the fills: grey (the normalisation's mean), blur, noisy linear imputation."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def batched_call(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        present = mask.bool()[:, None]
        if self.kind == "grey":
            return torch.where(present, img, MEAN)
        if self.kind == "blur":
            return torch.where(present, img, blurred(img))
        out = [
            torch.from_numpy(noisy_linear_imputation(image.numpy(), np.flatnonzero(~keep[0].numpy()), noise=0.01))
            for image, keep in zip(img, present)
        ]
        return torch.stack(out).float()


def road_scores(model, images, labels, attributions, imputer, most_first: bool) -> float:
    """ROAD's accuracy, averaged over PERCENTAGES: pixels ranked by ``attributions`` removed with ``imputer``."""
    ranks = attributions.flatten(1).argsort(dim=1, descending=most_first, stable=True)
    accuracies = []
    for percentage in PERCENTAGES:
        removed = torch.zeros_like(ranks, dtype=torch.bool).scatter_(
            1, ranks[:, : SIDE * SIDE * percentage // 100], True
        )
        present = ~removed.view(-1, SIDE, SIDE)
        with torch.no_grad():
            logits = model((imputer.batched_call(images, present.float()) - MEAN) / STD)
        accuracies.append(float((logits.argmax(1) == labels).double().mean()))
    return float(np.mean(accuracies))


def batched_fill(kind: str):
    """A batched Quantus ``perturb_func`` (PixelFlipping's convention: flattened images, indices per image)."""

    def perturb(arr: np.ndarray, indices: np.ndarray, **kwargs) -> np.ndarray:
        out = arr.copy()
        images = torch.from_numpy(arr.reshape(len(arr), 3, SIDE, SIDE))
        if kind == "grey":
            values = np.zeros_like(arr)  # the normalised mean
        elif kind == "blur":
            values = blurred(images).reshape(len(arr), -1).numpy()
        else:  # noisy linear imputation of the pixels touched, per image
            values = np.stack(
                [
                    noisy_linear_imputation(image.numpy(), np.unique(index % (SIDE * SIDE)), noise=0.01).reshape(-1)
                    for image, index in zip(images, indices)
                ]
            )
        rows = np.arange(len(arr))[:, None]
        out[rows, indices] = values[rows, indices]
        return out

    return perturb


def pixel_flipping(model, x, labels, attributions, perturb) -> float:
    metric = quantus.PixelFlipping(features_in_step=STEP, perturb_func=perturb, disable_warnings=True)
    curves = metric(
        model=model, x_batch=x.numpy(), y_batch=labels.numpy(), a_batch=attributions[:, None].numpy(), device="cpu"
    )
    return float(np.mean(curves))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    np.random.seed(0)  # ROAD's noisy imputation draws its noise from NumPy's global generator
    model = load_demo_model()
    masked = layer_masked(model)
    scenes = shapes.render(args.images, torch.Generator().manual_seed(1000), objects=1)
    pixels = F.interpolate(scenes.images, size=(SIDE, SIDE), mode="bilinear", antialias=True).clamp(0, 1)
    labels = scenes.labels[:, 0]
    x = (pixels - MEAN) / STD
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == labels).double().mean())
    segments = patch_segments(SIDE, SIDE, 16)[0].expand(len(x), -1, -1)
    explanations = {
        f"Lime ({masker})": lime_attributions(
            model, x, labels, segments, masker, n_samples=args.samples, show_progress=False
        )
        for masker in ("layer", "grey")
    }
    explanations["random"] = torch.rand(len(x), SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    removals = {
        "grey fill": (model, FillImputer("grey"), model, batched_fill("grey")),
        "blur": (model, FillImputer("blur"), model, batched_fill("blur")),
        "noisy linear imputation": (model, FillImputer("linear"), model, batched_fill("linear")),
        "layer masking": (NaNMasked(masked), LayerMaskImputer(), NaNMasked(masked), LayerMaskRemoval()),
    }
    print(f"{args.images} demo scenes at {SIDE}x{SIDE} (clean accuracy {accuracy:.3f}); Lime {args.samples} samples\n")
    print("| explanation | metric | " + " | ".join(removals) + " |")
    print("|---|---|" + "---|" * len(removals))
    for name, attributions in explanations.items():
        rows = {"ROAD MoRF accuracy (lower is better)": [], "ROAD LeRF accuracy (higher is better)": [],
                "pixel flipping, mean probability (lower is better)": []}  # fmt: skip
        for road_model, imputer, flip_model, perturb in removals.values():
            rows["ROAD MoRF accuracy (lower is better)"].append(
                road_scores(road_model, pixels, labels, attributions, imputer, True)
            )
            rows["ROAD LeRF accuracy (higher is better)"].append(
                road_scores(road_model, pixels, labels, attributions, imputer, False)
            )
            rows["pixel flipping, mean probability (lower is better)"].append(
                pixel_flipping(flip_model, x, labels, attributions, perturb)
            )
        for metric, values in rows.items():
            print(f"| {name} | {metric} | " + " | ".join(f"{v:.3f}" for v in values) + " |")


if __name__ == "__main__":
    main()
