"""Matplotlib figures of the diagnostics and the evaluation, in the style of the paper's figures.

Each function returns a ``matplotlib.figure.Figure``; save it with ``fig.savefig(path)``. Maskers keep the
same colour in every figure: black fill in black, grey fill in grey, layer masking in green.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

from .attribution_metrics import LimeMetrics
from .diagnostics import SizeCurve
from .maskers import masker_title
from .removal import RemovalCurve, ShapeBias

COLOURS = {"black": "#222222", "grey": "#9a9a9a", "layer": "#2a9d3c", "blur": "#3b6fb6", "mean": "#c77d1a"}
METRIC_TITLES = {"accuracy": "accuracy", "entropy": "class entropy (nats)", "unchanged": "unchanged predictions"}


def _pyplot():
    import matplotlib.pyplot as plt  # the user's backend: the command line selects Agg, the library never does

    return plt


def _style(masker: str, index: int) -> Dict[str, str]:
    return {"color": COLOURS.get(masker, f"C{index}"), "label": masker_title(masker)}


def plot_removal_curves(
    curves: Sequence[RemovalCurve],
    metrics: Sequence[str] = ("accuracy", "entropy", "unchanged"),
    title: Optional[str] = None,
):
    """Paper Fig. 4: each metric against the fraction of segments removed, one line per curve, AUC in the legend.

    Args:
        curves: :class:`RemovalCurve` results, e.g. one per masker for one segmenter and order.
        metrics: which of ``"accuracy"``, ``"entropy"``, ``"unchanged"`` to draw.
        title (str, optional): the figure's title (default: segmenter and order of the first curve).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for index, curve in enumerate(curves):
            style = _style(curve.masker, index)
            style["label"] += f" (AUC {curve.auc[metric]:.3f})"
            axis.plot(curve.fractions, getattr(curve, metric), marker="o", markersize=3, **style)
        axis.set_xlabel("fraction of segments removed")
        axis.set_title(METRIC_TITLES[metric])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if curves:
        fig.suptitle(title or f"{curves[0].segmenter} segments removed, {curves[0].order.replace('_', ' ')} order")
    fig.tight_layout()
    return fig


def plot_shape_bias(results: Sequence[ShapeBias], class_names: Optional[Sequence[str]] = None):
    """Paper Fig. 6: per class and on average, accuracy with the object removed (dark) and with the broken mask
    removed (light), the difference printed on the bars.

    Args:
        results: one :class:`ShapeBias` per masker.
        class_names: names of the class indices (default: the indices).
    """
    plt = _pyplot()
    classes = sorted({label for result in results for label in result.per_class})
    groups = ["average"] + [
        class_names[c] if class_names is not None and c < len(class_names) else str(c) for c in classes
    ]
    fig, axis = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) * max(1, len(results)) / 2), 3.8))
    width = 0.8 / max(1, len(results))
    for index, result in enumerate(results):
        pairs = [(result.object_accuracy, result.broken_accuracy)] + [result.per_class[c][:2] for c in classes]
        style = _style(result.masker, index)
        for group, (object_accuracy, broken_accuracy) in enumerate(pairs):
            x = group + (index - (len(results) - 1) / 2) * width
            axis.bar(x, broken_accuracy, width * 0.95, color=style["color"], alpha=0.35)
            axis.bar(
                x, object_accuracy, width * 0.95, color=style["color"], label=style["label"] if group == 0 else None
            )
            axis.text(
                x,
                max(object_accuracy, broken_accuracy) + 0.02,
                f"{broken_accuracy - object_accuracy:+.2f}",
                ha="center",
                fontsize=7,
            )
    axis.set_xticks(range(len(groups)), groups)
    axis.set_ylim(0, 1.15)
    axis.set_ylabel("accuracy")
    axis.set_title("object removed (dark) vs broken mask removed (light)")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def plot_lime_metrics(results: Mapping[str, LimeMetrics], title: Optional[str] = None):
    """Paper Table 2 as bars: top-k ablation accuracy (lower is better), alignment score and top-k Jaccard
    (higher is better), one bar per masker."""
    plt = _pyplot()
    metrics = (
        ("topk_ablation_accuracy", "top-{k} ablation accuracy (lower is better)"),
        ("alignment_score", "alignment score"),
        ("topk_jaccard", "top-{k} Jaccard"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for axis, (metric, label) in zip(axes, metrics):
        for index, (name, result) in enumerate(results.items()):
            value = getattr(result, metric)
            axis.bar(index, value, color=_style(name, index)["color"])
            axis.text(index, value, f"{value:.3f}", ha="center", va="bottom", fontsize=8)
        axis.set_xticks(range(len(results)), [_style(name, i)["label"] for i, name in enumerate(results)], fontsize=8)
        k = next(iter(results.values())).k if results else 0
        axis.set_title(label.format(k=k), fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_size_curves(curves: Sequence[SizeCurve], title: Optional[str] = None):
    """Supplementary Figs. 17 and 18: a diagnostic against the side of the visible square, one line per masker."""
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(4.8, 3.6))
    for index, curve in enumerate(curves):
        axis.plot(curve.sizes, curve.values, marker="o", markersize=3, **_style(curve.masker, index))
    axis.set_xlabel("side of the visible square (pixels)")
    axis.set_ylabel(curves[0].metric if curves else "")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    if title:
        axis.set_title(title)
    fig.tight_layout()
    return fig
