"""Missingness bias of a segmentation model, all at once: mean IoU removal curves and where the explanation of a
region lies, under each masker, as tables and figures (``layermask evaluate --task segmentation``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from torch import Tensor, nn

from ._common import ResultRow
from .dense import DENSE_FRACTIONS, IoUCurve, RegionMass, region_attribution_mass, segmentation_removal_curve
from .maskers import get_masker, masker_title
from .report import _markdown_table
from .segmentation import SegmenterSpec

ORDER_TITLES = {"random": "random", "most_salient": "objects first", "least_salient": "background first"}


@dataclass
class SegmentationReport:
    """The results of :func:`evaluate_segmentation`.

    Attributes:
        curves: one :class:`~captum_layermask.evaluation.dense.IoUCurve` per order and masker.
        masses: one :class:`~captum_layermask.evaluation.dense.RegionMass` per masker.
        images, explained: how many images the curves and the explanations used.
    """

    curves: List[IoUCurve] = field(default_factory=list)
    masses: List[RegionMass] = field(default_factory=list)
    images: int = 0
    explained: int = 0

    def rows(self) -> List[ResultRow]:
        """Every result as a flat row (``results.csv``)."""
        return [row for result in (*self.curves, *self.masses) for row in result.rows()]

    def markdown(self) -> str:
        """The tables of ``results.md``."""
        orders = list(dict.fromkeys(c.order for c in self.curves))
        maskers = list(dict.fromkeys(c.masker for c in self.curves))
        by_key = {(c.order, c.masker): c for c in self.curves}
        removal = _markdown_table(
            f"**Mean IoU removal curves** ({self.images} images, 16x16 patches): area under mean IoU on the visible "
            "pixels against the fraction of patches removed, 0 to 0.9 (higher is better).",
            ["AUC", *(ORDER_TITLES.get(o, o) for o in orders)],
            [[masker_title(m), *(f"{by_key[(o, m)].auc:.3f}" for o in orders)] for m in maskers],
        )
        parts = [removal]
        if self.masses:
            parts.append(
                _markdown_table(
                    f"**Where a region's explanation lies** ({self.explained} images, the object's class over the "
                    f"object, {self.masses[0].method} over 16x16 patches): share of the positive attribution on the "
                    "object's own pixels (the rest lies on its context).",
                    ["masker", "share on the region"],
                    [[masker_title(m.masker), f"{m.mean:.3f}"] for m in self.masses],
                )
            )
        return "\n\n".join(parts) + "\n"

    def figure(self):
        """Mean IoU against the fraction removed, one panel per order, one line per masker (AUC in the legend)."""
        import matplotlib.pyplot as plt

        from .plots import _style

        orders = list(dict.fromkeys(c.order for c in self.curves))
        fig, axes = plt.subplots(1, len(orders), figsize=(4.4 * len(orders), 3.6), squeeze=False)
        for axis, order in zip(axes[0], orders):
            for index, curve in enumerate(c for c in self.curves if c.order == order):
                style = _style(curve.masker, index)
                style["label"] += f" (AUC {curve.auc:.3f})"
                axis.plot(curve.fractions, curve.mean_iou, marker="o", markersize=3, **style)
            axis.set_xlabel("fraction of 16x16 patches removed")
            axis.set_ylabel("mean IoU on visible pixels")
            axis.set_title(f"{ORDER_TITLES.get(order, order)} removal")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
        fig.tight_layout()
        return fig

    def save(self, folder: Path) -> List[Path]:
        """Writes ``results.md``, ``results.csv`` and ``segmentation_removal.png`` into ``folder``."""
        import csv

        import matplotlib.pyplot as plt

        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.md").write_text(self.markdown())
        with (folder / "results.csv").open("w", newline="") as file:
            rows = self.rows()
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        figure = self.figure()
        figure.savefig(folder / "segmentation_removal.png", dpi=110, bbox_inches="tight")
        plt.close(figure)
        return [folder / name for name in ("results.md", "results.csv", "segmentation_removal.png")]


def evaluate_segmentation(
    model: nn.Module,
    images: Tensor,
    pixel_labels: Tensor,
    regions: Tensor,
    targets: Sequence[int],
    *,
    maskers: Sequence[str] = ("black", "grey", "layer"),
    orders: Sequence[str] = ("random", "least_salient"),
    background: int = 0,
    segmenter: SegmenterSpec = "patches",
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    output: Optional[Any] = None,
    explained: Optional[int] = None,
    method: str = "ablation",
    batch_size: int = 32,
    show_progress: bool = True,
) -> SegmentationReport:
    """Mean IoU removal curves (random order, and background first: patches with the fewest object pixels go
    first, so the objects stay visible while their context goes) and the share of each region's explanation on
    the region, under each masker. Objects first is available (``"most_salient"``) but says little: once the
    objects are gone, mean IoU is that of the background and of whatever else is predicted on it.

    Args:
        model (nn.Module): the plain segmentation model (eval mode).
        images (Tensor): ``(N, C, H, W)`` inputs normalised with ``mean`` and ``std``.
        pixel_labels (Tensor): ``(N, H, W)`` true class of every pixel.
        regions (Tensor): ``(N, H, W)`` bool, the region explained in each image (e.g. its object).
        targets: the class explained over each region.
        maskers: ``"black"``, ``"grey"``, ``"layer"`` (the ones Captum's baselines express).
        explained (int, optional): explain only the first images (default: all).
    """
    saliency = (pixel_labels != background).float()
    report = SegmentationReport(images=len(images))
    for order in orders:
        for masker in maskers:
            report.curves.append(
                segmentation_removal_curve(
                    model, images, pixel_labels, segmenter, order, get_masker(masker, mean, std), DENSE_FRACTIONS,
                    saliency=saliency, output=output, batch_size=batch_size, show_progress=show_progress,
                )
            )  # fmt: skip
    count = len(images) if explained is None else min(explained, len(images))
    report.explained = count
    for masker in maskers:
        report.masses.append(
            region_attribution_mass(
                model, images[:count], regions[:count], targets[:count], masker,
                method=method, segmenter=segmenter, mean=mean, std=std, output=output,
            )
        )  # fmt: skip
    return report
