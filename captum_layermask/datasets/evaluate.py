"""Removal curves over a dataset (paper section 4.1, Table 1): per-image predictions first, the curves at the end.

Each image's segments are removed in a random order seeded by ``seed`` and its position (the same order under
every masker), and the model's prediction is recorded at each fraction. Accuracy, class entropy and unchanged
predictions are dataset statistics, so they are computed from all images' predictions when the run is done:
the same as :func:`~captum_layermask.evaluation.removal_curve` on the whole set with those orders.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..evaluation._common import class_entropy
from ..evaluation.maskers import get_masker
from ..evaluation.normalization import IMAGENET_MEAN, IMAGENET_STD, normalizer
from ..evaluation.removal import DEFAULT_FRACTIONS, RemovalCurve, removal_order
from ..evaluation.segmentation import get_segmenter
from .runner import DatasetResults, EngineOptions, run_dataset
from .sources import ImagesSpec
from .store import ResultStore


@dataclass(frozen=True)
class EvaluationSettings:
    """What an evaluation run computes for each image."""

    maskers: Tuple[str, ...] = ("layer", "grey", "black")
    segments: str = "patches"
    fractions: Tuple[float, ...] = tuple(DEFAULT_FRACTIONS)
    size: int = 224
    mean: Tuple[float, ...] = (0.485, 0.456, 0.406)
    std: Tuple[float, ...] = (0.229, 0.224, 0.225)
    seed: int = 0

    def check(self) -> None:
        for masker in self.maskers:
            get_masker(masker, self.mean, self.std)
        get_segmenter(self.segments)
        fractions = self.fractions
        if (
            not fractions
            or any(not 0 <= f <= 1 for f in fractions)
            or any(a >= b for a, b in zip(fractions, fractions[1:]))
        ):
            raise ValueError(f"fractions must increase within [0, 1], got {list(fractions)}.")


class ImageEvaluator:
    """One worker of an evaluation run: the model bound to each masker once, then one image at a time.

    Args:
        model: the plain classifier (eval mode), taking normalised images.
        settings: the run's :class:`EvaluationSettings`.
        per_eval: masked images per forward pass.
        device: where the model runs.
    """

    def __init__(self, model: nn.Module, settings: EvaluationSettings, per_eval: int, device: Any = "cpu") -> None:
        self.model = model.eval().to(device)
        self.settings, self.per_eval, self.device = settings, per_eval, torch.device(device)
        self.normalize = normalizer(settings.mean, settings.std)
        self.forwards = {
            name: get_masker(name, settings.mean, settings.std).bind(self.model) for name in settings.maskers
        }

    def compute(self, position: int, image: Tensor, segments: Tensor, label: Optional[int]) -> Dict[str, np.ndarray]:
        """``label``, ``predicted`` (nothing removed), ``classes`` and per masker ``predictions_<masker>`` (one
        class per fraction)."""
        if label is None:
            raise ValueError(
                "removal curves need labels: give an image folder with class subfolders or a Dataset of (image, label)."
            )
        x = self.normalize(image[None].to(self.device))
        order = removal_order(segments[None], "random", seed=self.settings.seed * 1_000_003 + position)[0]
        kept = torch.stack([~torch.isin(segments, order[: round(f * len(order))]) for f in self.settings.fractions])
        kept = kept[:, None].to(self.device)
        with torch.no_grad():
            logits = self.model(x)
            record = {
                "label": np.int64(label),
                "predicted": np.int64(int(logits.argmax(1))),
                "classes": np.int64(logits.shape[1]),
            }
            for name, forward in self.forwards.items():
                parts = [forward(x.expand(len(part), -1, -1, -1), part).argmax(1) for part in kept.split(self.per_eval)]
                record[f"predictions_{name}"] = torch.cat(parts).cpu().numpy()
        return record


def removal_curves(records: Sequence[Dict[str, np.ndarray]], settings: EvaluationSettings) -> Dict[str, RemovalCurve]:
    """Each masker's :class:`RemovalCurve` over the images' records."""
    labels = torch.tensor([int(r["label"]) for r in records])
    clean = torch.tensor([int(r["predicted"]) for r in records])
    classes = int(max(int(r["classes"]) for r in records))
    curves = {}
    for name in settings.maskers:
        predictions = torch.from_numpy(np.stack([r[f"predictions_{name}"] for r in records]))
        columns = range(len(settings.fractions))
        curves[name] = RemovalCurve(
            fractions=list(settings.fractions),
            accuracy=[float((predictions[:, j] == labels).double().mean()) for j in columns],
            entropy=[class_entropy(predictions[:, j], classes) for j in columns],
            unchanged=[float((predictions[:, j] == clean).double().mean()) for j in columns],
            masker=name,
            order="random",
            segmenter=settings.segments,
            predictions=predictions,
        )
    return curves


def table(curves: Dict[str, RemovalCurve]) -> List[Dict[str, Any]]:
    """One row per masker: its areas under the accuracy, entropy and unchanged curves."""
    return [{"masker": name, **curve.auc} for name, curve in curves.items()]


@dataclass
class DatasetEvaluation(DatasetResults):
    """The results of :func:`evaluate_dataset`: per-image records in ``out``, curves computed from all of them
    with the run's ``settings``."""

    settings: EvaluationSettings

    def records(self) -> List[Dict[str, np.ndarray]]:
        store = ResultStore.reader(self.out)
        return [store.read(position) for position, key in enumerate(self.keys) if key not in self.errors]

    def curves(self) -> Dict[str, RemovalCurve]:
        """Each masker's removal curve over every image that was read."""
        return removal_curves(self.records(), self.settings)

    def table(self) -> List[Dict[str, Any]]:
        """One row per masker: the areas under its accuracy, entropy and unchanged curves (Table 1)."""
        return table(self.curves())


def evaluate_dataset(
    model: nn.Module,
    images: ImagesSpec,
    out: Union[str, Path],
    *,
    maskers: Sequence[str] = ("layer", "grey", "black"),
    segments: str = "patches",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    seed: int = 0,
    batch_size: int = 64,
    engine: str = "local",
    address: Optional[str] = None,
    workers: Optional[int] = None,
    num_gpus: float = 0.0,
    threads: Optional[int] = None,
    show_progress: bool = True,
) -> DatasetEvaluation:
    """Removal curves of a labelled dataset under each masker (section 4.1), resumable, in either engine.

    Per image, its segments are removed in a random order (seeded by ``seed`` and its position, the same under
    every masker) and the predictions at each fraction are written as the image completes; the curves and their
    areas come from all images at the end (:meth:`DatasetEvaluation.curves`, :meth:`DatasetEvaluation.table`).
    Inputs, output folder, resuming and engines are those of :func:`explain_dataset`.

    Args:
        model, images, out, size, mean, std, seed, engine, address, workers, num_gpus, threads, show_progress:
            as in :func:`explain_dataset` (images need labels: class subfolders, or ``(image, label)`` items).
        maskers: any of ``"layer"``, ``"grey"``, ``"black"``, ``"blur"``, ``"mean"``.
        segments: ``"patches"``, ``"slic"`` or ``"quickshift"``.
        fractions: fractions of segments removed, increasing within [0, 1].
        batch_size: masked images per forward pass.
    """
    settings = EvaluationSettings(tuple(maskers), segments, tuple(fractions), size, tuple(mean), tuple(std), seed)
    settings.check()
    source, errors = run_dataset(
        functools.partial(ImageEvaluator, model, settings, batch_size),
        model,
        images,
        out,
        settings,
        EngineOptions(engine, address, workers, num_gpus, threads, show_progress),
        "evaluating",
    )
    return DatasetEvaluation(Path(out), source.keys, errors, settings)
