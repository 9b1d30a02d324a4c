"""Evaluation of a segmentation dataset, per image first, the tables at the end (``evaluate_dataset(...,
task="segmentation")``).

Each image's record holds, under every masker, its confusion matrices on the pixels that stay visible as its
segments are removed (random order, seeded by ``seed`` and its position, and background first), and, for the
first ``explained`` images, the share of a region's explanation that lies on the region (the region: the pixels
of the class its label map gives most pixels, background apart). The mean IoU curves come from the confusion
matrices summed over all records (:meth:`DatasetSegmentationEvaluation.report`): the numbers of
:func:`~captum_layermask.evaluation.dense_report.evaluate_segmentation` on the same images and regions, except
that each image's random order is seeded by its position.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..core.convert import layer_masked
from ..evaluation.dense import DENSE_FRACTIONS, RegionMass, curve_from_confusions, region_share, removal_confusions
from ..evaluation.dense_report import SegmentationReport
from ..evaluation.explanations import captum_baseline
from ..evaluation.maskers import get_masker
from ..evaluation.normalization import IMAGENET_MEAN, IMAGENET_STD, normalizer
from ..evaluation.removal import check_fractions, removal_order
from ..evaluation.seeding import image_seed
from ..evaluation.segmentation import get_segmenter
from .engine import DatasetResults, run_dataset
from .sources import image_source
from .store import ResultStore

SEGMENTATION_ORDERS = ("random", "least_salient")
"""Random removal, and background first (segments ranked by their share of object pixels, fewest first)."""


@dataclass(frozen=True)
class SegmentationSettings:
    """What a segmentation evaluation run computes for each image."""

    maskers: Tuple[str, ...] = ("layer", "grey", "black")
    segments: str = "patches"
    fractions: Tuple[float, ...] = tuple(DENSE_FRACTIONS)
    size: int = 224
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    seed: int = 0
    explained: int = 32
    method: str = "ablation"
    samples: int = 200
    output: Optional[str] = None
    background: int = 0

    def check(self) -> None:
        for masker in self.maskers:
            if masker not in ("layer", "grey", "black"):
                raise ValueError(f"a segmentation evaluation takes the maskers layer, grey and black, got {masker!r}.")
        get_segmenter(self.segments)
        check_fractions(self.fractions)


class SegmentationEvaluator:
    """One worker of a segmentation evaluation run: the model bound to each masker once, then one image at a time.

    Args:
        model: the plain segmentation model (eval mode), taking normalised images.
        settings: the run's :class:`SegmentationSettings`.
        per_eval: masked images per forward pass.
        device: where the model runs.
    """

    def __init__(self, model: nn.Module, settings: SegmentationSettings, per_eval: int, device: Any = "cpu") -> None:
        self.model = model.eval().to(device)
        self.settings, self.per_eval, self.device = settings, per_eval, torch.device(device)
        self.normalize = normalizer(settings.mean, settings.std)
        self.forwards = {
            name: get_masker(name, settings.mean, settings.std).bind(self.model) for name in settings.maskers
        }
        self.masked = layer_masked(self.model)

    def compute(
        self, position: int, image: Tensor, segments: Tensor, labels: Any, object_mask: Optional[Tensor] = None
    ) -> Dict[str, np.ndarray]:
        """The record of one image: ``confusion_<order>_<masker>`` ``(F, C, C)`` per order and masker, and for
        the first ``explained`` images ``target`` and ``share_<masker>``."""
        if not isinstance(labels, Tensor) or labels.shape != image.shape[-2:]:
            raise ValueError(
                "a segmentation evaluation needs a label map per image: a Dataset of (image, labels (H, W))."
            )
        x = self.normalize(image[None].to(self.device))
        labels = labels.long()
        objects = (labels != self.settings.background).float()
        orders = {
            "random": removal_order(segments[None], "random", seed=image_seed(self.settings.seed, position))[0],
            "least_salient": removal_order(segments[None], "least_salient", objects[None])[0],
        }
        record: Dict[str, np.ndarray] = {}
        for name, forward in self.forwards.items():
            for order, removed in orders.items():
                counts = removal_confusions(
                    forward, x, labels, segments, removed, self.settings.fractions,
                    output=self.settings.output, per_eval=self.per_eval,
                )  # fmt: skip
                record[f"confusion_{order}_{name}"] = counts.numpy()
        if position < self.settings.explained:
            record.update(self._shares(position, x, labels, segments, classes=counts.shape[-1]))
        return record

    def _shares(
        self, position: int, x: Tensor, labels: Tensor, segments: Tensor, classes: int
    ) -> Dict[str, np.ndarray]:
        """The explained class (the one of the model's classes, background apart, with most pixels; labels outside
        them, VOC's 255, never) and each masker's share on its pixels; nothing for an image without one."""
        counts = torch.bincount(labels[(labels >= 0) & (labels < classes)], minlength=classes)
        counts[self.settings.background] = 0
        if int(counts.max()) == 0:
            return {}
        target = int(counts.argmax())
        shares: Dict[str, np.ndarray] = {"target": np.int64(target)}
        for name in self.settings.maskers:
            torch.manual_seed(image_seed(self.settings.seed, position))
            forward = self.masked if name == "layer" else self.model
            baseline = captum_baseline(name, self.settings.mean, self.settings.std)
            shares[f"share_{name}"] = np.float64(
                region_share(
                    forward, x, (labels == target).to(self.device), target, segments.to(self.device), baseline,
                    method=self.settings.method, output=self.settings.output, samples=self.settings.samples,
                    per_eval=self.per_eval,
                )
            )  # fmt: skip
        return shares


@dataclass
class DatasetSegmentationEvaluation(DatasetResults):
    """The results of ``evaluate_dataset(..., task="segmentation")``: per-image records in ``out``, the tables
    computed from all of them."""

    settings: SegmentationSettings

    def records(self) -> List[Dict[str, np.ndarray]]:
        store = ResultStore.reader(self.out)
        return [store.read(position) for position, key in enumerate(self.keys) if key not in self.errors]

    def report(self) -> SegmentationReport:
        """Mean IoU curves from the confusion matrices summed over every image read, and the region shares.

        Raises:
            ValueError: if no image of the run could be read.
        """
        records = self.records()
        if not records:
            raise ValueError(f"none of the {len(self.keys)} image(s) of the run could be read; check the images.")
        report = SegmentationReport(images=len(records))
        classes = max(r[f"confusion_random_{self.settings.maskers[0]}"].shape[-1] for r in records)
        for order in SEGMENTATION_ORDERS:
            for name in self.settings.maskers:
                total = torch.zeros(len(self.settings.fractions), classes, classes, dtype=torch.long)
                for record in records:
                    counts = torch.from_numpy(record[f"confusion_{order}_{name}"])
                    total[:, : counts.shape[1], : counts.shape[2]] += counts
                report.curves.append(
                    curve_from_confusions(total, self.settings.fractions, name, order, self.settings.segments)
                )
        explained = [r for r in records if "target" in r]
        report.explained = len(explained)
        if explained:
            for name in self.settings.maskers:
                shares = torch.tensor([float(r[f"share_{name}"]) for r in explained], dtype=torch.float64)
                report.masses.append(RegionMass(name, self.settings.method, shares))
        return report


def evaluate_segmentation_dataset(
    model: nn.Module,
    images: Any,
    out: Any,
    *,
    settings: SegmentationSettings,
    batch_size: int,
    options: Any,
    label_maps: Any = None,
) -> DatasetSegmentationEvaluation:
    """The run behind ``evaluate_dataset(..., task="segmentation")``: images from a ``Dataset`` of
    ``(image, labels)`` (labels ``(H, W)`` class indices), or an image folder with ``label_maps``
    (``<labels>/<image name>.png``), resumable, in either engine."""
    settings.check()
    source, errors = run_dataset(
        functools.partial(SegmentationEvaluator, model, settings, batch_size),
        model,
        image_source(images, label_maps=label_maps) if label_maps is not None else images,
        out,
        settings,
        options,
        "evaluating segmentation",
    )
    return DatasetSegmentationEvaluation(Path(out), source.keys, errors, settings)
