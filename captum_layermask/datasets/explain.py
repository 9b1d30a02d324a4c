"""One image's explanation under each masker, as a dataset run computes it (both engines call this).

The perturbation samples are seeded per image (``seed`` and the image's position), and are the same for every
masker, so that maskers differ only in what happens to removed segments; a run gives the same results
whichever engine, worker or attempt computes an image.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..core.convert import layer_masked
from ..evaluation.attribution_metrics import segment_scores
from ..evaluation.explanations import EXPLANATION_MASKERS, METHODS, captum_attribution, captum_baseline
from ..evaluation.normalization import IMAGENET_MEAN, IMAGENET_STD, normalizer
from ..evaluation.seeding import image_seed
from ..evaluation.segmentation import get_segmenter
from .engine import DatasetResults, EngineOptions, run_dataset
from .sources import ImagesSpec
from .store import ResultStore


@dataclass(frozen=True)
class Settings:
    """What a run computes for each image (everything but the model and the images)."""

    method: str = "lime"
    maskers: Tuple[str, ...] = ("layer", "grey")
    segments: str = "slic"
    size: int = 224
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    target: Optional[int] = None
    samples: int = 500
    seed: int = 0

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}.")
        unknown = sorted(set(self.maskers) - set(EXPLANATION_MASKERS))
        if unknown or not self.maskers:
            raise ValueError(
                f"maskers must be a non-empty subset of {', '.join(EXPLANATION_MASKERS)}, got {self.maskers}."
            )
        get_segmenter(self.segments)
        if self.samples < 1 or self.size < 1:
            raise ValueError("samples and size must be positive.")


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
        self.masked = layer_masked(self.model) if "layer" in settings.maskers else None
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
        """The record of one image: its segment ids, target, label and per-masker scores (per segment; for
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
        for masker in self.settings.maskers:
            attribution = self._attribute(x, ids, target, masker, position)
            if self.settings.method == "occlusion":
                record[f"map_{masker}"] = attribution[0].mean(0).cpu().numpy().astype(np.float32)
            else:
                record[f"scores_{masker}"] = segment_scores(attribution, ids[:, 0])[0].numpy().astype(np.float32)
        return record

    def _attribute(self, x: Tensor, ids: Tensor, target: int, masker: str, position: int) -> Tensor:
        baseline = captum_baseline(masker, self.settings.mean, self.settings.std)
        baseline = baseline.to(x.device) if isinstance(baseline, Tensor) else baseline
        forward = self.masked if masker == "layer" else self.model
        settings = self.settings

        def run(per_eval: int) -> Tensor:
            torch.manual_seed(image_seed(settings.seed, position))  # the same samples for every masker
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


@dataclass
class DatasetExplanations(DatasetResults):
    """The results of :func:`explain_dataset`, read from its output folder."""

    def record(self, key: str) -> Dict[str, np.ndarray]:
        """One image's record: ``segments`` ``(H, W)``, ``target``, ``predicted``, ``label`` (-1 if none) and,
        per masker, ``scores_<masker>`` ``(S,)`` (or ``map_<masker>`` ``(H, W)`` for occlusion)."""
        return ResultStore.reader(self.out).read(self.keys.index(key))

    def attribution(self, key: str, masker: str) -> torch.Tensor:
        """The per-pixel attribution map ``(H, W)``, rebuilt exactly from the segments and their scores."""
        record = self.record(key)
        if f"map_{masker}" in record:
            return torch.from_numpy(record[f"map_{masker}"])
        return torch.from_numpy(record[f"scores_{masker}"][record["segments"]])


def explain_dataset(
    model: nn.Module,
    images: ImagesSpec,
    out: Union[str, Path],
    *,
    method: str = "lime",
    maskers: Sequence[str] = ("layer", "grey"),
    segments: str = "slic",
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    target: Optional[int] = None,
    samples: int = 500,
    perturbations_per_eval: Optional[int] = None,
    memory_budget: Optional[int] = None,
    seed: int = 0,
    engine: str = "local",
    address: Optional[str] = None,
    workers: Optional[int] = None,
    num_gpus: float = 0.0,
    threads: Optional[int] = None,
    show_progress: bool = True,
) -> DatasetExplanations:
    """Explains every image of a dataset under each masker, writing each image's result as it completes.

    Each image is explained as ``layermask explain`` explains one (Captum's Lime, KernelShap, FeatureAblation or
    Occlusion; ``LayerMask()`` on the layer-masked model for ``"layer"``, a constant baseline on the plain model
    for ``"black"``/``"grey"``), with samples seeded by ``seed`` and the image's position. Results are per-segment
    scores (the segments and scores give the attribution map exactly). A run interrupted at any point and
    started again with the same arguments computes only the missing images, and its output is the same as an
    uninterrupted run's; other arguments against the same ``out`` are refused.

    Args:
        model (nn.Module): the plain classifier, taking images normalised with ``mean``/``std``.
        images: an image folder (``<folder>/<class>/<image>``, labels from the sorted class names, or a flat
            folder), a list of image files, or a ``torch.utils.data.Dataset`` of ``(3, H, W)`` images in [0, 1]
            (or ``(image, label)`` pairs).
        out: the output folder (see :mod:`captum_layermask.datasets.store`).
        method: ``"lime"``, ``"kernelshap"``, ``"ablation"`` or ``"occlusion"``.
        maskers: any of ``"layer"``, ``"grey"``, ``"black"``.
        segments: ``"slic"``, ``"quickshift"`` or ``"patches"`` (16x16).
        size: files are center-cropped and resized to ``size x size``.
        target: the class to explain (default: each image's predicted class).
        samples: Lime/KernelShap samples per image (the paper: 500).
        perturbations_per_eval: samples per forward pass; by default chosen from ``memory_budget``. Halved
            (and kept halved) after an out-of-memory error instead of failing the image.
        memory_budget: bytes one forward pass may use (default: 2 GiB).
        engine: ``"local"`` (this process) or ``"ray"`` (Ray Data: CPU stages read and segment, model actors
            explain; ``pip install captum-layermask[ray]``).
        address: an existing Ray cluster (``"auto"``, ``"ray://host:10001"``); default: a local Ray instance.
        workers: model actors for the Ray engine (default: one per CPU, or per GPU with ``num_gpus``).
        num_gpus: GPUs per model actor (Ray engine); the local engine uses CUDA when available.
        threads: torch threads per worker (default: torch's); equal thread counts give bitwise-equal results
            across engines.
        show_progress: one progress bar over the images.

    Returns:
        :class:`DatasetExplanations`.

    Raises:
        OutputMismatchError: if ``out`` holds a run with other arguments, or other files.
    """
    settings = Settings(method, tuple(maskers), segments, size, tuple(mean), tuple(std), target, samples, seed)
    settings.check()
    device = "cuda" if torch.cuda.is_available() and engine == "local" else "cpu"
    per_eval = perturbations_per_eval or per_eval_for_budget(model, settings, memory_budget or 2 * 2**30, device)
    source, errors = run_dataset(
        functools.partial(ImageExplainer, model, settings, per_eval),
        model,
        images,
        out,
        settings,
        EngineOptions(engine, address, workers, num_gpus, threads, show_progress),
        "explaining",
    )
    return DatasetExplanations(Path(out), source.keys, errors)
