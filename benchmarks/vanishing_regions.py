"""Single visible patches whose logits vanish, per torchvision family, under both residual rules (issue: robustness).

For every position of one visible 16x16 patch (all other pixels removed), counts the positions where the
layer-masked model's logits are exactly 0, i.e. where nothing of the visible patch reaches the output:
``residual="intersection"`` (the paper's rule, the default) against ``residual="union"``. Random weights; the
count depends only on the architecture's geometry.

    .venv/bin/python benchmarks/vanishing_regions.py [--size 224] [--models resnet18,resnet50,...]
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from _timing import checked_device

from captum_layermask import layer_masked, patch_segments

DEFAULT_MODELS = (
    "resnet18,resnet50,resnext50_32x4d,regnet_y_400mf,mobilenet_v2,efficientnet_b0,densenet121,convnext_tiny,vgg11_bn"
)


def vanishing_positions(
    model: torch.nn.Module, size: int, patch: int, residual: str, batch: int = 14, device: str = "cpu"
) -> int:
    masked = layer_masked(model.to(device), residual=residual)
    segments = patch_segments(size, size, patch)[0, 0].to(device)
    count = int(segments.max()) + 1
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    vanished = 0
    with torch.no_grad():
        for start in range(0, count, batch):
            ids = torch.arange(start, min(start + batch, count), device=device)
            masks = (segments[None] == ids[:, None, None])[:, None]
            logits = masked(x.expand(len(ids), -1, -1, -1), masks)
            vanished += int((logits == 0).all(1).sum())
    return vanished


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = checked_device(parser, args.device)
    positions = (-(-args.size // args.patch)) ** 2
    print("| model | vanishing positions, intersection (paper) | union | of |")
    print("|---|---|---|---|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name).eval()
        counts = [
            vanishing_positions(model, args.size, args.patch, residual, device=device)
            for residual in ("intersection", "union")
        ]
        print(f"| {name} | {counts[0]} | {counts[1]} | {positions} |", flush=True)


if __name__ == "__main__":
    main()
