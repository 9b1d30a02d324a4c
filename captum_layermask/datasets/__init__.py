"""Explanations of whole datasets: one API, two engines (this process, or a Ray cluster), resumable output.

>>> from captum_layermask.datasets import explain_dataset
>>> results = explain_dataset(model, "val/", "lime-out/", method="lime", maskers=("layer", "grey"))
>>> results.attribution(results.keys[0], "layer")  # (H, W), exact from the segments and their scores
>>> evaluate_dataset(model, "val/", "removal-out/", maskers=("layer", "grey")).table()  # removal-curve AUCs
"""

from .engine import ENGINES
from .evaluate import DatasetEvaluation, EvaluationSettings, evaluate_dataset
from .explain import DatasetExplanations, Settings, explain_dataset, with_halving
from .sources import ImageSource, image_source
from .store import OutputMismatchError, ResultStore

__all__ = [
    "ENGINES",
    "DatasetEvaluation",
    "DatasetExplanations",
    "EvaluationSettings",
    "ImageSource",
    "OutputMismatchError",
    "ResultStore",
    "Settings",
    "evaluate_dataset",
    "explain_dataset",
    "image_source",
    "with_halving",
]
