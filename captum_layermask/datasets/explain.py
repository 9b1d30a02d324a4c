"""One image's explanation under each masking, as a dataset run computes it (both engines call this).

The perturbation samples are seeded per image (``seed`` and the image's position), and are the same for every
masking, so that maskings differ only in what happens to removed segments; a run gives the same results
whichever engine, worker or attempt computes an image.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..core.convert import layer_masked
from ..evaluation.attribution_metrics import segment_scores
from ..evaluation.normalization import normalizer
from ..evaluation.segmentation import get_segmenter
from ..integrations.captum import LayerMask

METHODS = ("lime", "kernelshap", "ablation", "occlusion")
MASKINGS = ("black", "grey", "layer")


@dataclass(frozen=True)
class Settings:
    """What a run computes for each image (everything but the model and the images)."""

    method: str = "lime"
    maskings: Tuple[str, ...] = ("layer", "grey")
    segments: str = "slic"
    size: int = 224
    mean: Tuple[float, ...] = (0.485, 0.456, 0.406)
    std: Tuple[float, ...] = (0.229, 0.224, 0.225)
    target: Optional[int] = None
    samples: int = 500
    seed: int = 0

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}.")
        unknown = sorted(set(self.maskings) - set(MASKINGS))
        if unknown or not self.maskings:
            raise ValueError(f"maskings must be a non-empty subset of {', '.join(MASKINGS)}, got {self.maskings}.")
        get_segmenter(self.segments)
        if self.samples < 1 or self.size < 1:
            raise ValueError("samples and size must be positive.")


def captum_attribution(
    method: str,
    forward: nn.Module,
    x: Tensor,
    segments: Tensor,
    target: int,
    baseline: Any,
    samples: int,
    per_eval: int,
    show_progress: bool = False,
) -> Tensor:
    """One Captum attribution of ``x`` ``(1, C, H, W)``: Lime or KernelShap (``samples`` samples) or
    FeatureAblation over ``segments`` ``(1, 1, H, W)``, or Occlusion with 16x16 windows at stride 8 (what
    ``layermask explain`` computes, for one image or for a dataset)."""
    from captum.attr import FeatureAblation, KernelShap, Lime, Occlusion

    common = dict(target=target, baselines=baseline, perturbations_per_eval=per_eval, show_progress=show_progress)
    if method == "lime":
        return Lime(forward).attribute(x, feature_mask=segments, n_samples=samples, **common)
    if method == "kernelshap":
        return KernelShap(forward).attribute(x, feature_mask=segments, n_samples=samples, **common)
    if method == "ablation":
        return FeatureAblation(forward).attribute(x, feature_mask=segments, **common)
    channels = x.shape[1]
    return Occlusion(forward).attribute(x, sliding_window_shapes=(channels, 16, 16), strides=(channels, 8, 8), **common)


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, (RuntimeError, MemoryError)) and (
        isinstance(error, MemoryError) or "out of memory" in message or "DefaultCPUAllocator" in message
    )


def with_halving(run: Callable[[int], Tensor], per_eval: int, on_halve: Optional[Callable[[int], None]] = None):
    """``run(per_eval)``, halving ``per_eval`` after an out-of-memory error (CUDA, or a CPU allocation failure)
    until it fits; an error at ``per_eval = 1`` is raised."""
    while True:
        try:
            return run(per_eval)
        except (RuntimeError, MemoryError) as error:
            if not _is_out_of_memory(error) or per_eval == 1:
                raise
            per_eval = max(1, per_eval // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if on_halve is not None:
                on_halve(per_eval)


class ImageExplainer:
    """Explains images one at a time for a run: the model, its layer-masked version and the settings.

    Args:
        model: the plain classifier (eval mode), taking normalised images.
        settings: the run's :class:`Settings`.
        per_eval: perturbations per forward pass (halved on out-of-memory errors, and kept halved).
        device: where the model runs.
    """

    def __init__(self, model: nn.Module, settings: Settings, per_eval: int, device: Any = "cpu") -> None:
        self.model = model.eval().to(device)
        self.masked = layer_masked(self.model) if "layer" in settings.maskings else None
        self.settings, self.per_eval, self.device = settings, per_eval, torch.device(device)
        self.normalize = normalizer(settings.mean, settings.std)

    def compute(
        self,
        position: int,
        image: Tensor,
        segments: Tensor,
        label: Optional[int],
        object_mask: Optional[Tensor] = None,
    ) -> Dict[str, np.ndarray]:
        """The record of one image: its segment ids, target, label and per-masking scores (per segment; for
        occlusion, whose windows do not follow segments, the per-pixel map). ``object_mask`` is not used."""
        x = self.normalize(image[None].to(self.device))
        ids = segments[None, None].to(self.device)
        with torch.no_grad():
            predicted = int(self.model(x).argmax(1))
        target = predicted if self.settings.target is None else self.settings.target
        record = {
            "segments": segments.numpy().astype(np.int32),
            "target": np.int64(target),
            "predicted": np.int64(predicted),
            "label": np.int64(-1 if label is None else label),
        }
        for masking in self.settings.maskings:
            attribution = self._attribute(x, ids, target, masking, position)
            if self.settings.method == "occlusion":
                record[f"map_{masking}"] = attribution[0].mean(0).cpu().numpy().astype(np.float32)
            else:
                record[f"scores_{masking}"] = segment_scores(attribution, ids[:, 0])[0].numpy().astype(np.float32)
        return record

    def _attribute(self, x: Tensor, ids: Tensor, target: int, masking: str, position: int) -> Tensor:
        black = self.normalize(torch.zeros(1, x.shape[1], 1, 1, device=x.device))
        baseline = {"black": black, "grey": 0.0, "layer": LayerMask()}[masking]
        forward = self.masked if masking == "layer" else self.model
        settings = self.settings

        def run(per_eval: int) -> Tensor:
            torch.manual_seed(settings.seed * 1_000_003 + position)  # the same samples for every masking
            return captum_attribution(settings.method, forward, x, ids, target, baseline, settings.samples, per_eval)

        def halved(per_eval: int) -> None:
            self.per_eval = per_eval
            print(f"out of memory: perturbations_per_eval halved to {per_eval}", file=sys.stderr)

        return with_halving(run, self.per_eval, halved).detach()


def per_eval_for_budget(model: nn.Module, settings: Settings, budget_bytes: int, device: Any = "cpu") -> int:
    """Perturbations per forward pass that fit a memory budget: the budget over one perturbed sample's peak
    memory in the layer-masked model (measured on CUDA; estimated from the activations' sizes on CPU), between 1
    and 256."""
    masked = layer_masked(model.eval().to(device))
    x = torch.zeros(2, 3, settings.size, settings.size, device=device)
    mask = torch.ones(2, 1, settings.size, settings.size, device=device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            masked(x, mask)
        per_sample = (torch.cuda.max_memory_allocated(device) - start) / 2
    else:
        per_sample = _activation_bytes(masked, x, mask) / 2
    return int(max(1, min(256, budget_bytes // max(per_sample, 1))))


def _activation_bytes(model: nn.Module, *inputs: Tensor) -> float:
    """The bytes of every tensor the forward pass allocates (an upper bound of its peak, which frees some)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        model(*inputs)
    return float(sum(max(event.self_cpu_memory_usage, 0) for event in profiler.events()))
