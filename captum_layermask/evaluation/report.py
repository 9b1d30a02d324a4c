"""One evaluation of a model under several maskers: removal curves, shape bias and LIME metrics, written as a
Markdown table, a CSV file and figures. ``layermask evaluate`` runs it; it works the same from Python.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from torch import Tensor, nn

from ._common import ResultRow, result_row
from .attribution_metrics import LimeMetrics, lime_metrics, top_k_for
from .diagnostics import SizeCurve, linearity, magnitude_curve, output_collapse
from .maskers import Masker, get_masker, masker_title
from .normalization import IMAGENET_MEAN, IMAGENET_STD
from .removal import DEFAULT_FRACTIONS, RemovalCurve, ShapeBias, removal_curve, shape_bias
from .segmentation import get_segmenter, segment_images


@dataclass
class EvaluationData:
    """Images to evaluate on.

    Attributes:
        images: ``(N, C, H, W)`` model inputs (normalised).
        labels: ``(N,)`` class indices.
        object_masks: ``(N, H, W)`` bool, True on the labelled object, or None (then no shape bias, no LIME
            alignment or Jaccard, and no saliency orders).
        mean, std: the normalisation of ``images`` (for black fill and for SLIC/quickshift).
        class_names: names of the class indices, or None.
    """

    images: Tensor
    labels: Tensor
    object_masks: Optional[Tensor] = None
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    class_names: Optional[Sequence[str]] = None


@dataclass
class EvaluationReport:
    """What :func:`evaluate` measured."""

    removal: List[RemovalCurve] = field(default_factory=list)
    shape: List[ShapeBias] = field(default_factory=list)
    lime: Dict[str, Dict[str, LimeMetrics]] = field(default_factory=dict)  # segmenter -> masker -> metrics
    linearity: Dict[str, Dict[int, float]] = field(default_factory=dict)  # masker -> patch size -> score
    collapse: List[SizeCurve] = field(default_factory=list)
    magnitude: List[SizeCurve] = field(default_factory=list)
    images: int = 0
    lime_images: int = 0
    diagnostic_images: int = 0

    def rows(self) -> List[ResultRow]:
        """The results as flat rows: section, segmenter, order, masker, metric, value (each result type gives its
        own)."""
        rows = [row for curve in self.removal for row in curve.rows()]
        rows += [row for result in self.shape for row in result.rows()]
        rows += [row for segmenter, results in self.lime.items() for r in results.values() for row in r.rows(segmenter)]
        rows += [
            result_row("linearity", masker, "cosine similarity", score, f"{patch}px patches")
            for masker, scores in self.linearity.items()
            for patch, score in scores.items()
        ]
        rows += [row for curve in self.collapse for row in curve.rows("output collapse")]
        rows += [row for curve in self.magnitude for row in curve.rows("feature magnitude")]
        return rows

    def to_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=["section", "segmenter", "order", "masker", "metric", "value"])
            writer.writeheader()
            for row in self.rows():
                writer.writerow({**row, "value": f"{row['value']:.4f}"})

    def to_markdown(self) -> str:
        parts = []
        if self.removal:
            parts.append(self._removal_table())
        if self.shape:
            parts.append(
                _markdown_table(
                    f"**Shape bias** ({self.shape[0].count} images classified correctly unmasked): accuracy with the object removed, with the broken mask removed, and the difference (higher: less reliance on the mask's shape).",
                    ["masker", "object removed", "broken mask removed", "difference"],
                    [
                        [
                            masker_title(r.masker),
                            f"{r.object_accuracy:.3f}",
                            f"{r.broken_accuracy:.3f}",
                            f"{r.difference:+.3f}",
                        ]
                        for r in self.shape
                    ],
                )
            )
        if self.lime:
            parts.append(self._lime_table())
        if self.linearity:
            patches = list(next(iter(self.linearity.values())))
            parts.append(
                _markdown_table(
                    f"**Linearity in masking** ({self.diagnostic_images} images): cosine similarity of the features and the sum of the features of each patch alone (higher: more linear).",
                    ["masker", *(f"{p}px patches" for p in patches)],
                    [[masker_title(m), *(f"{scores[p]:.3f}" for p in patches)] for m, scores in self.linearity.items()],
                )
            )
        if self.collapse:
            parts.append(
                _markdown_table(
                    f"**Output collapse** ({self.diagnostic_images} images, all pairs): change of the pairwise cosine similarity of features when the images shrink to n x n (closer to 0 is better).",
                    ["masker", *(f"n={n}" for n in self.collapse[0].sizes)],
                    [[masker_title(c.masker), *(f"{v:+.3f}" for v in c.values)] for c in self.collapse],
                )
            )
        return "\n\n".join(parts) + "\n"

    def _removal_table(self) -> str:
        columns = list(dict.fromkeys((c.segmenter, c.order) for c in self.removal))
        maskers = list(dict.fromkeys(c.masker for c in self.removal))
        by_key = {(c.segmenter, c.order, c.masker): c for c in self.removal}
        rows = []
        for metric in ("accuracy", "entropy", "unchanged"):
            for masker in maskers:
                values = [by_key.get((s, o, masker)) for s, o in columns]
                cells = [f"{v.auc[metric]:.3f}" if v is not None else "" for v in values]
                rows.append([f"{metric}: {masker_title(masker)}", *cells])
        return _markdown_table(
            f"**Removal curves** ({self.images} images): area under each metric against the fraction of segments removed (higher is better).",
            ["AUC", *(f"{s}, {o.replace('_', ' ')}" for s, o in columns)],
            rows,
        )

    def _lime_table(self) -> str:
        segmenters = list(self.lime)
        maskers = list(dict.fromkeys(m for results in self.lime.values() for m in results))
        ks = {s: next(iter(results.values())).k for s, results in self.lime.items()}
        names = (
            ("topk_ablation_accuracy", "top-k ablation accuracy (lower is better)"),
            ("alignment_score", "alignment score"),
            ("topk_jaccard", "top-k Jaccard"),
        )
        rows = [
            [
                f"{label}: {masker_title(masker)}",
                *(f"{getattr(self.lime[s][masker], metric):.3f}" if masker in self.lime[s] else "" for s in segmenters),
            ]
            for metric, label in names
            for masker in maskers
        ]
        return _markdown_table(
            f"**LIME metrics** ({self.lime_images} images, true class explained): top-k ablation accuracy (grey removal; lower is better), alignment score and top-k Jaccard with the object mask (higher is better).",
            ["metric", *(f"{s} (k={ks[s]})" for s in segmenters)],
            rows,
        )

    def save_figures(self, folder: Path, class_names: Optional[Sequence[str]] = None) -> List[Path]:
        """Writes ``removal_<segmenter>_<order>.png``, ``shape_bias.png`` and ``lime_<segmenter>.png``."""
        import matplotlib.pyplot as plt

        from .plots import plot_lime_metrics, plot_removal_curves, plot_shape_bias, plot_size_curves

        figures = {}
        for segmenter, order in dict.fromkeys((c.segmenter, c.order) for c in self.removal):
            curves = [c for c in self.removal if (c.segmenter, c.order) == (segmenter, order)]
            figures[f"removal_{segmenter}_{order}.png"] = plot_removal_curves(curves)
        if self.shape:
            figures["shape_bias.png"] = plot_shape_bias(self.shape, class_names)
        for segmenter, results in self.lime.items():
            figures[f"lime_{segmenter}.png"] = plot_lime_metrics(results, title=f"LIME with {segmenter} segments")
        if self.collapse:
            figures["output_collapse.png"] = plot_size_curves(self.collapse, "output collapse: E[c_n - c]")
        if self.magnitude:
            figures["feature_magnitude.png"] = plot_size_curves(self.magnitude, "mean feature norm, n x n visible")
        paths = []
        for name, figure in figures.items():
            figure.savefig(folder / name, dpi=110, bbox_inches="tight")
            plt.close(figure)
            paths.append(folder / name)
        return paths


def _masker_for(name: str, data: EvaluationData, residual: str) -> Masker:
    return get_masker(name, data.mean, data.std, residual)


def default_top_k(segments: Tensor) -> int:
    """A tenth of the median number of segments per image (the paper's top-20 of 196 patches), at least 1."""
    counts = segments.flatten(1).amax(1).double() + 1
    return top_k_for(float(counts.median()))


def evaluate(
    model: nn.Module,
    data: EvaluationData,
    *,
    maskers: Sequence[str] = ("black", "grey", "layer"),
    segmenters: Sequence[str] = ("patches",),
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    lime_images: int = 32,
    diagnostic_images: int = 16,
    n_samples: int = 500,
    k: Optional[int] = None,
    batch_size: int = 64,
    seed: int = 0,
    residual: str = "intersection",
    show_progress: bool = True,
) -> EvaluationReport:
    """Runs the removal curves (random order, and most/least salient first with the object masks as saliency),
    the shape bias and the LIME metrics (on the first ``lime_images`` images) under each masker.

    Args:
        model (nn.Module): the classifier, in eval mode.
        data (EvaluationData): images, labels, optional object masks and the normalisation.
        maskers: names among ``black``, ``grey``, ``layer``, ``blur``, ``mean``.
        segmenters: names among ``patches``, ``slic``, ``quickshift``.
        fractions, batch_size, seed, show_progress: see :func:`~captum_layermask.evaluation.removal_curve`.
        lime_images (int): images explained with LIME (0: no LIME metrics).
        diagnostic_images (int): images for linearity (patches of 1/2, 1/4 and 1/8 of the side), output
            collapse and feature magnitude (0: no diagnostics).
        n_samples (int): LIME's samples per image.
        k (int, optional): segments taken by the top-k metrics; by default a tenth of the median number of
            segments per image, the paper's proportion (20 of 196).
        residual (str): the residual rule of layer masking, ``"intersection"`` (the paper's) or ``"union"``
            (see :func:`~captum_layermask.layer_masked`).

    Returns:
        An :class:`EvaluationReport`.
    """
    report = EvaluationReport(images=len(data.images))
    masks = data.object_masks
    orders = ("random",) if masks is None else ("random", "most_salient", "least_salient")
    common = dict(batch_size=batch_size, show_progress=show_progress)
    for segmenter_name in segmenters:
        segments = segment_images(data.images, get_segmenter(segmenter_name, data.mean, data.std))
        for order in orders:
            for name in maskers:
                curve = removal_curve(
                    model,
                    data.images,
                    data.labels,
                    segments,
                    order,
                    _masker_for(name, data, residual),
                    fractions,
                    saliency=None if masks is None else masks.float(),
                    seed=seed,
                    **common,
                )
                curve.segmenter = segmenter_name
                report.removal.append(curve)
        if masks is not None and lime_images > 0:
            chosen = slice(0, min(lime_images, len(data.images)))
            report.lime_images = chosen.stop
            top = k or default_top_k(segments)
            results = lime_metrics(
                model,
                data.images[chosen],
                data.labels[chosen],
                masks[chosen],
                segments[chosen],
                [_masker_for(name, data, residual) for name in maskers],
                k=top,
                n_samples=n_samples,
                ablation_masker="grey",
                seed=seed,
                **common,
            )
            report.lime[segmenter_name] = results
    if masks is not None:
        report.shape = [
            shape_bias(model, data.images, data.labels, masks, _masker_for(name, data, residual), **common)
            for name in maskers
        ]
    if diagnostic_images > 0:
        diagnose(
            report,
            model,
            data.images[:diagnostic_images],
            [_masker_for(name, data, residual) for name in maskers],
            **common,
        )
    return report


def diagnose(
    report: EvaluationReport,
    model: nn.Module,
    images: Tensor,
    maskers: Sequence[Masker],
    *,
    batch_size: int = 64,
    show_progress: bool = True,
) -> None:
    """Adds to ``report`` the linearity (patches of 1/2, 1/4 and 1/8 of the side), output collapse and feature
    magnitude of ``images`` ``(N, C, H, W)`` under each masker (supplementary section 7)."""
    common = dict(batch_size=batch_size, show_progress=show_progress)
    side = min(images.shape[-2:])
    patches, sizes = [side // 2, side // 4, side // 8], [side // 8, side // 4, side // 2, 3 * side // 4, side]
    report.diagnostic_images = len(images)
    for masker in maskers:
        report.linearity[masker.name] = {p: linearity(model, images, p, masker, **common) for p in patches}
        if len(images) > 1:
            report.collapse.append(output_collapse(model, images, sizes, masker, **common))
        report.magnitude.append(magnitude_curve(model, images, sizes, masker, **common))


def _markdown_table(caption: str, header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A caption, a blank line and a Markdown table with the given header and rows of cells."""
    lines = [caption, "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
