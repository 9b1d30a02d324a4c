"""Evaluation of a dataset (paper section 4): per-image results first, the tables at the end.

Each image's record holds what section 4 measures of it under every masker: its predictions as its segments are
removed (random order, seeded by ``seed`` and its position; with an object mask also most and least salient
first, the object mask as saliency), its predictions with the object and with the broken mask removed (shape
bias), and, for the first ``lime_images`` images, LIME's segment scores on the true class with the top-k ablation
prediction, alignment score and top-k Jaccard. Accuracy, entropy and the other means are dataset statistics,
computed from all records when the run is done (:meth:`DatasetEvaluation.report`): the same numbers as
:func:`~captum_layermask.evaluation.evaluate` on the whole set in memory, except that the random removal order of
each image is seeded by its position.
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..evaluation.attribution_metrics import (
    LimeMetrics,
    alignment_score,
    lime_coefficients,
    top_k_for,
    top_segments_mask,
    topk_jaccard,
)
from ..evaluation.maskers import get_masker
from ..evaluation.normalization import IMAGENET_MEAN, IMAGENET_STD, normalizer
from ..evaluation.removal import (
    DEFAULT_FRACTIONS,
    ORDERS,
    RemovalCurve,
    ShapeBias,
    broken_mask,
    check_fractions,
    curve_of,
    removal_order,
    shape_bias_of,
)
from ..evaluation.report import EvaluationReport
from ..evaluation.seeding import image_seed
from ..evaluation.segmentation import get_segmenter
from .engine import DatasetResults, EngineOptions, run_dataset
from .sources import ImagesSpec, image_source
from .store import ResultStore

if TYPE_CHECKING:
    from .evaluate_segmentation import DatasetSegmentationEvaluation


@dataclass(frozen=True)
class EvaluationSettings:
    """What an evaluation run computes for each image."""

    maskers: Tuple[str, ...] = ("layer", "grey", "black")
    segments: str = "patches"
    fractions: Tuple[float, ...] = tuple(DEFAULT_FRACTIONS)
    size: int = 224
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    seed: int = 0
    lime_images: int = 32
    samples: int = 500
    top_k: Optional[int] = None
    residual: str = "intersection"

    def check(self) -> None:
        for masker in self.maskers:
            get_masker(masker, self.mean, self.std, self.residual)
        get_segmenter(self.segments)
        check_fractions(self.fractions)
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}.")

    def k_for(self, segments: int) -> int:
        """Segments taken by the top-k LIME metrics: ``top_k``, or a tenth of the image's (the paper's 20 of 196)."""
        return self.top_k or top_k_for(segments)


class ImageEvaluator:
    """One worker of an evaluation run: the model bound to each masker once, then one image at a time.

    Args:
        model: the plain classifier (eval mode), taking normalised images.
        settings: the run's :class:`EvaluationSettings`.
        per_eval: masked images per forward pass (also LIME's perturbations per forward pass).
        device: where the model runs.
    """

    def __init__(self, model: nn.Module, settings: EvaluationSettings, per_eval: int, device: Any = "cpu") -> None:
        self.model = model.eval().to(device)
        self.settings, self.per_eval, self.device = settings, per_eval, torch.device(device)
        self.normalize = normalizer(settings.mean, settings.std)
        self.forwards = {
            name: get_masker(name, settings.mean, settings.std, settings.residual).bind(self.model)
            for name in settings.maskers
        }
        self.ablation = self.forwards.get("grey") or get_masker("grey").bind(self.model)  # the paper's top-k ablation

    def compute(
        self,
        position: int,
        image: Tensor,
        segments: Tensor,
        label: Optional[int],
        object_mask: Optional[Tensor] = None,
    ) -> Dict[str, np.ndarray]:
        """The record of one image: ``label``, ``predicted`` (nothing removed), ``classes``; per masker and
        removal order ``predictions_<order>_<masker>`` (one class per fraction); with an object mask
        ``shape_<masker>`` (the predictions with the object and with the broken mask removed), and for the first
        ``lime_images`` images ``lime_segments``, ``k`` and per masker ``lime_<masker>`` (scores per segment),
        ``ablation_<masker>``, ``alignment_<masker>``, ``jaccard_<masker>``."""
        if label is None:
            raise ValueError(
                "an evaluation needs labels: give an image folder with class subfolders or a Dataset of (image, label)."
            )
        x = self.normalize(image[None].to(self.device))
        orders = {"random": removal_order(segments[None], "random", seed=image_seed(self.settings.seed, position))[0]}
        if object_mask is not None:
            for order in ORDERS[1:]:
                orders[order] = removal_order(segments[None], order, object_mask[None].float())[0]
        with torch.no_grad():
            logits = self.model(x)
        record = {
            "label": np.int64(label),
            "predicted": np.int64(int(logits.argmax(1))),
            "classes": np.int64(logits.shape[1]),
        }
        lime = object_mask is not None and position < self.settings.lime_images
        if lime:
            record["lime_segments"] = segments.numpy().astype(np.int32)
            record["k"] = np.int64(self.settings.k_for(int(segments.max()) + 1))
        for name, forward in self.forwards.items():
            for order, removed in orders.items():
                kept = torch.stack(
                    [~torch.isin(segments, removed[: round(f * len(removed))]) for f in self.settings.fractions]
                )
                record[f"predictions_{order}_{name}"] = self._predict(forward, x, kept)
            if object_mask is not None:
                record[f"shape_{name}"] = self._predict(
                    forward, x, torch.stack([~object_mask, ~broken_mask(object_mask)])
                )
            if lime:
                record.update(self._lime(name, forward, x, segments, label, object_mask, position, int(record["k"])))
        return record

    def _predict(self, forward: Any, x: Tensor, kept: Tensor) -> np.ndarray:
        """Predicted classes of ``x`` under each mask of ``kept`` ``(M, H, W)``, ``per_eval`` at a time."""
        kept = kept[:, None].to(self.device)
        with torch.no_grad():
            parts = [forward(x.expand(len(part), -1, -1, -1), part).argmax(1) for part in kept.split(self.per_eval)]
        return torch.cat(parts).cpu().numpy()

    def _lime(
        self, name: str, forward: Any, x: Tensor, segments: Tensor, label: int, mask: Tensor, position: int, k: int
    ) -> Dict[str, np.ndarray]:
        """LIME on the true class under one masker, with its three metrics (supplementary 6.2)."""
        scores = lime_coefficients(
            forward,
            x,
            label,
            segments.to(self.device),
            n_samples=self.settings.samples,
            perturbations_per_eval=self.per_eval,
            seed=image_seed(self.settings.seed, position),
        ).cpu()
        attribution, ids, objects = scores[segments][None], segments[None], mask[None]
        return {
            f"lime_{name}": scores.numpy().astype(np.float32),
            f"ablation_{name}": self._predict(self.ablation, x, ~top_segments_mask(attribution, ids, k))[0],
            f"alignment_{name}": np.float64(alignment_score(attribution, ids, objects)[0]),
            f"jaccard_{name}": np.float64(topk_jaccard(attribution, ids, objects, k)[0]),
        }


def removal_curves(
    records: Sequence[Dict[str, np.ndarray]], settings: EvaluationSettings, order: str = "random"
) -> Dict[str, RemovalCurve]:
    """Each masker's :class:`RemovalCurve` in ``order`` over the images' records."""
    labels = torch.tensor([int(r["label"]) for r in records])
    clean = torch.tensor([int(r["predicted"]) for r in records])
    classes = int(max(int(r["classes"]) for r in records))
    return {
        name: curve_of(
            torch.from_numpy(np.stack([r[f"predictions_{order}_{name}"] for r in records])),
            labels,
            clean,
            classes,
            settings.fractions,
            name,
            order,
            settings.segments,
        )
        for name in settings.maskers
    }


def shape_biases(records: Sequence[Dict[str, np.ndarray]], settings: EvaluationSettings) -> List[ShapeBias]:
    """Each masker's :class:`ShapeBias` over the records (images classified correctly unmasked, as the paper)."""
    labels = torch.tensor([int(r["label"]) for r in records])
    clean = torch.tensor([int(r["predicted"]) for r in records])
    results = []
    for name in settings.maskers:
        predictions = torch.from_numpy(np.stack([r[f"shape_{name}"] for r in records]))
        results.append(shape_bias_of(name, labels, clean, predictions[:, 0] == labels, predictions[:, 1] == labels))
    return results


def lime_results(records: Sequence[Dict[str, np.ndarray]], settings: EvaluationSettings) -> Dict[str, LimeMetrics]:
    """Each masker's :class:`LimeMetrics` (means over the records; ``k`` their median ``k``)."""
    labels = np.array([int(r["label"]) for r in records])
    k = int(statistics.median(int(r["k"]) for r in records))
    results = {}
    for name in settings.maskers:
        maps = [torch.from_numpy(r[f"lime_{name}"][r["lime_segments"]]) for r in records]
        results[name] = LimeMetrics(
            masker=name,
            k=k,
            topk_ablation_accuracy=float(np.mean(np.array([int(r[f"ablation_{name}"]) for r in records]) == labels)),
            alignment_score=float(np.mean([float(r[f"alignment_{name}"]) for r in records])),
            topk_jaccard=float(np.mean([float(r[f"jaccard_{name}"]) for r in records])),
            attributions=torch.stack(maps) if len({m.shape for m in maps}) == 1 else None,
        )
    return results


@dataclass
class DatasetEvaluation(DatasetResults):
    """The results of :func:`evaluate_dataset`: per-image records in ``out``, the tables computed from all of
    them with the run's ``settings``."""

    settings: EvaluationSettings

    def records(self) -> List[Dict[str, np.ndarray]]:
        store = ResultStore.reader(self.out)
        return [store.read(position) for position, key in enumerate(self.keys) if key not in self.errors]

    def curves(self, order: str = "random") -> Dict[str, RemovalCurve]:
        """Each masker's removal curve in ``order`` over every image that was read."""
        return removal_curves(self.records(), self.settings, order)

    def table(self) -> List[Dict[str, Any]]:
        """One row per masker: the areas under its accuracy, entropy and unchanged curves (Table 1, random order)."""
        return [{"masker": name, **curve.auc} for name, curve in self.curves().items()]

    def report(self) -> EvaluationReport:
        """Everything the records hold, as an :class:`~captum_layermask.evaluation.EvaluationReport`: removal
        curves in every order all images have, shape bias where every image has an object mask, LIME metrics
        over the images explained (no diagnostics: add them with
        :func:`~captum_layermask.evaluation.report.diagnose`).

        Raises:
            ValueError: if no image of the run could be read.
        """
        records = self.records()
        if not records:
            raise ValueError(
                f"none of the {len(self.keys)} image(s) of the run could be read ({len(self.errors)} skipped), so there "
                "is nothing to report; check the images."
            )
        report = EvaluationReport(images=len(records))
        first = self.settings.maskers[0]
        for order in ORDERS:
            if records and all(f"predictions_{order}_{first}" in r for r in records):
                report.removal.extend(removal_curves(records, self.settings, order).values())
        if records and all(f"shape_{first}" in r for r in records):
            report.shape = shape_biases(records, self.settings)
        explained = [r for r in records if "lime_segments" in r]
        if explained:
            report.lime[self.settings.segments] = lime_results(explained, self.settings)
            report.lime_images = len(explained)
        return report


def evaluate_dataset(
    model: nn.Module,
    images: ImagesSpec,
    out: Union[str, Path],
    *,
    object_masks: Optional[Union[str, Path]] = None,
    maskers: Sequence[str] = ("layer", "grey", "black"),
    segments: str = "patches",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    lime_images: int = 32,
    samples: int = 500,
    top_k: Optional[int] = None,
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    residual: str = "intersection",
    seed: int = 0,
    batch_size: int = 64,
    engine: str = "local",
    address: Optional[str] = None,
    workers: Optional[int] = None,
    num_gpus: float = 0.0,
    threads: Optional[int] = None,
    show_progress: bool = True,
    task: str = "classification",
    output: Optional[str] = None,
    label_maps: Optional[Union[str, Path]] = None,
) -> Union[DatasetEvaluation, DatasetSegmentationEvaluation]:
    """Removal curves, shape bias and LIME metrics of a labelled dataset under each masker (section 4),
    resumable, in either engine.

    Each image's results are written as it completes (see the module); the tables come from all images at the
    end (:meth:`DatasetEvaluation.report`, :meth:`DatasetEvaluation.curves`, :meth:`DatasetEvaluation.table`).
    Inputs, output folder, resuming and engines are those of :func:`explain_dataset`.

    Args:
        model, images, out, size, mean, std, seed, engine, address, workers, num_gpus, threads, show_progress:
            as in :func:`explain_dataset` (images need labels: class subfolders, or ``(image, label)`` items).
        object_masks: with an image folder, ``<masks>/<class>/<image name>.png`` (non-zero on the object); a
            ``Dataset`` yields ``(image, label, object_mask)`` instead. Enables the salient removal orders, the
            shape bias and the LIME metrics.
        maskers: any of ``"layer"``, ``"grey"``, ``"black"``, ``"blur"``, ``"mean"``.
        segments: ``"patches"``, ``"slic"`` or ``"quickshift"``.
        fractions: fractions of segments removed, increasing within [0, 1].
        lime_images: the first this many images (with object masks) are explained with LIME on their true class.
        samples: LIME's samples per image (the paper: 500).
        top_k: segments taken by the top-k LIME metrics (default: a tenth of each image's segments, the paper's
            20 of 196).
        residual: the residual rule of layer masking (see :func:`~captum_layermask.layer_masked`).
        batch_size: masked images per forward pass.
        task, label_maps, output: ``task="segmentation"``: a segmentation model on a ``Dataset`` of ``(image, labels
            (H, W))`` or a folder with ``label_maps`` (``<labels>/<name>.png``); ``output`` holds the logits
            (:mod:`.evaluate_segmentation`: mean IoU removal curves, region attribution mass).
    """
    options = EngineOptions(engine, address, workers, num_gpus, threads, show_progress)
    if task == "segmentation":
        from .evaluate_segmentation import SegmentationSettings, evaluate_segmentation_dataset

        dense = SegmentationSettings(tuple(maskers), segments, size=size, mean=tuple(mean), std=tuple(std), seed=seed,
                                     explained=lime_images, output=output)  # fmt: skip
        return evaluate_segmentation_dataset(
            model, images, out, settings=dense, batch_size=batch_size, options=options, label_maps=label_maps
        )
    settings = EvaluationSettings(
        tuple(maskers),
        segments,
        tuple(fractions),
        size,
        tuple(mean),
        tuple(std),
        seed,
        lime_images,
        samples,
        top_k,
        residual,
    )
    settings.check()
    source = image_source(images, object_masks)
    if source.files is not None and source.labels is None:
        raise ValueError("an evaluation needs labels: give an image folder with one subfolder of images per class.")
    source, errors = run_dataset(
        functools.partial(ImageEvaluator, model, settings, batch_size),
        model,
        source,
        out,
        settings,
        options,
        "evaluating",
    )
    return DatasetEvaluation(Path(out), source.keys, errors, settings)
