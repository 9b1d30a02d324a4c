"""``make demo``: what layer masking changes, on a bundled photo (runs offline in a few seconds).

1. ``neighbor_padding.png``: a photo with removed patches, filled by neighbor padding (Algorithm 1) with
   growing width, as in the paper's Figure 3.
2. ``fill_sensitivity.png`` / ``.csv``: the same removed patches filled with black, grey, white or noise. A
   plain ResNet-18 changes its logits with the fill; the layer-masked one gives identical logits, since it
   never reads removed pixels. The network has random weights (no pretrained weights can be downloaded here),
   so only the invariance is meaningful, not the predicted classes.

    python -m captum_layermask.demo.fill --out demo-output
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from skimage import data  # noqa: E402

from .. import layer_masked, neighbor_pad  # noqa: E402
from ..evaluation.normalization import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def photo(size: int = 224) -> torch.Tensor:
    """scikit-image's bundled cat photo, center-cropped and resized: (1, 3, size, size) in [0, 1]."""
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255
    side = min(image.shape[-2:])
    top, left = (image.shape[-2] - side) // 2, (image.shape[-1] - side) // 2
    image = image[..., top : top + side, left : left + side]
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def patch_mask(size: int, patch: int, keep: float, seed: int) -> torch.Tensor:
    """(1, 1, size, size) mask keeping each patch with probability ``keep`` (1 = visible)."""
    generator = torch.Generator().manual_seed(seed)
    grid = (torch.rand(1, 1, size // patch, size // patch, generator=generator) < keep).float()
    return grid.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def plot_neighbor_padding(image: torch.Tensor, mask: torch.Tensor, path: Path) -> None:
    widths = [0, 4, 16, 64]
    fig, axes = plt.subplots(1, len(widths), figsize=(3 * len(widths), 3.2))
    for axis, width in zip(axes, widths):
        padded = neighbor_pad(image, mask, width)
        axis.imshow(padded[0].permute(1, 2, 0).clamp(0, 1).numpy())
        axis.set_title("removed patches" if width == 0 else f"neighbor padding, k={width}")
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def fill_sensitivity(image: torch.Tensor, mask: torch.Tensor, seed: int) -> list[dict]:
    """Max |logit change| caused by the fill colour alone, relative to grey fill, plain vs layer-masked."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18().eval()
    masked = layer_masked(model)
    normalized = (image - MEAN) / STD
    fills = {
        "grey (dataset mean)": torch.zeros_like(normalized),
        "black": (-MEAN / STD).expand_as(normalized),
        "white": ((1 - MEAN) / STD).expand_as(normalized),
        "noise": torch.randn_like(normalized),
    }
    rows = []
    with torch.no_grad():
        inputs = {name: torch.where(mask > 0, normalized, fill) for name, fill in fills.items()}
        plain_reference = model(inputs["grey (dataset mean)"])
        masked_reference = masked(inputs["grey (dataset mean)"], mask)
        for name, filled in inputs.items():
            rows.append(
                {
                    "fill": name,
                    "plain: max |logit change|": float((model(filled) - plain_reference).abs().max()),
                    "layer-masked: max |logit change|": float((masked(filled, mask) - masked_reference).abs().max()),
                }
            )
    return rows


def plot_fill_sensitivity(rows: list[dict], path: Path) -> None:
    names = [row["fill"] for row in rows]
    positions = np.arange(len(rows))
    fig, axis = plt.subplots(figsize=(6, 3.2))
    axis.bar(positions - 0.2, [row["plain: max |logit change|"] for row in rows], 0.4, label="plain (fill colour)")
    axis.bar(positions + 0.2, [row["layer-masked: max |logit change|"] for row in rows], 0.4, label="layer masking")
    axis.set_xticks(positions, names)
    axis.set_ylabel("max |logit change| vs grey fill")
    axis.set_title("Same visible pixels, different fill (ResNet-18, random weights)")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Layer masking vs filling removed pixels with a colour.")
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="folder for the figures")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    image, mask = photo(), patch_mask(224, 16, keep=0.5, seed=args.seed)
    plot_neighbor_padding(image, mask, args.out / "neighbor_padding.png")
    rows = fill_sensitivity(image, mask, args.seed)
    with open(args.out / "fill_sensitivity.csv", "w", newline="") as table:
        writer = csv.DictWriter(table, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_fill_sensitivity(rows, args.out / "fill_sensitivity.png")
    print(f"{'fill':22}{'plain':>12}{'layer-masked':>14}   (max |logit change| vs grey fill)")
    for row in rows:
        print(
            f"{row['fill']:22}{row['plain: max |logit change|']:>12.4f}{row['layer-masked: max |logit change|']:>14.4f}"
        )
    print(f"figures and table written to {args.out}/")


if __name__ == "__main__":
    main()
