"""What a live ``LayerMask()`` costs unrelated models: its plain-model guard hooks every module call (issue: robustness).

Times a 50-layer MLP (batch 1, width 64) and a ResNet-18 forward (batch 1, 64x64), alternately with and without
a ``LayerMask`` alive, and prints the medians and the median of the per-pair ratios. The same for the NaN guard of
``captum_layermask.interop`` (alive with a ``LayerMaskRemoval`` or ``LayerMaskImputer``; issue: other tools).

    .venv/bin/python benchmarks/guard_overhead.py [--repeats 200] [--threads 2]
"""

from __future__ import annotations

import torch
import torchvision
from _timing import paired_times, parse_arguments, print_medians, ratio_of_pairs
from torch import nn

from captum_layermask import LayerMask
from captum_layermask.interop.quantus import LayerMaskRemoval


def runs_for(model: nn.Module, x: torch.Tensor, owner: type) -> tuple:
    """The model's forward with no ``owner`` (``LayerMask``, ``LayerMaskRemoval``) alive, and with one alive
    (created once, kept until the next run without)."""
    holder = []

    def without():
        holder.clear()  # the owner dies here, and with it the guard's hooks
        return model(x)

    def with_guard():
        if not holder:
            holder.append(owner())
        return model(x)

    return without, with_guard


def main() -> None:
    args = parse_arguments(__doc__.splitlines()[0], repeats=200)
    torch.manual_seed(0)
    models = {
        "50-layer MLP": (nn.Sequential(*[nn.Linear(64, 64) for _ in range(50)]).eval(), torch.randn(1, 64)),
        "ResNet-18, 64x64": (torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)),
    }
    models = {name: (model.to(args.device), x.to(args.device)) for name, (model, x) in models.items()}
    for owner in (LayerMask, LayerMaskRemoval):
        for name, (model, x) in models.items():
            without, with_guard = runs_for(model, x, owner)
            labels = (f"no {owner.__name__} alive", f"a {owner.__name__} alive")
            times = paired_times(dict(zip(labels, (without, with_guard))), args.repeats, warmup=3, device=args.device)
            plain, guarded = times.values()
            print(name)
            print_medians(times, decimals=6)
            print(f"  ratio (median of pairs): {ratio_of_pairs(guarded, plain):.3f}")


if __name__ == "__main__":
    main()
