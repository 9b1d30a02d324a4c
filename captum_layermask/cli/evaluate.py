"""``layermask evaluate``: missingness bias of a model under several maskers, written as tables and figures."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from ..evaluation.normalization import normalizer
from ..evaluation.report import EvaluationData, evaluate
from ..weights import Classifier
from .io import CommandError, image_folder, read_image, read_object_mask, staged_output

DESCRIPTION = (
    "Measures how much each masking method distorts the model (paper section 4): removal curves of accuracy, class "
    "entropy and unchanged predictions with their AUC, shape bias, and LIME's top-k ablation accuracy, alignment "
    "score and top-k Jaccard. Writes results.md, results.csv and figures. With no arguments it evaluates the bundled "
    "demo model on held-out demo scenes, offline."
)


def load_evaluation_data(
    classifier: Classifier,
    images: Optional[Path],
    object_masks: Optional[Path],
    *,
    demo: bool,
    limit: Optional[int],
    size: Optional[int],
    data_seed: int,
) -> EvaluationData:
    """The images of ``images`` (or held-out demo scenes), their labels and optional object masks."""
    mean, std, classes = classifier.mean, classifier.std, classifier.classes
    if images is None:
        if not demo:
            raise CommandError(
                "--images is needed with a torchvision model (the bundled scenes are for the demo model)."
            )
        from ..demo import shapes

        scenes = shapes.render(limit or 64, torch.Generator().manual_seed(data_seed), objects=1)
        return EvaluationData(
            shapes.normalize(scenes.images), scenes.labels[:, 0], scenes.object_masks[:, 0], mean, std, classes
        )
    files = image_folder(images)
    if limit and limit < len(files):
        chosen = torch.randperm(len(files), generator=torch.Generator().manual_seed(data_seed))[:limit]
        files = [files[i] for i in sorted(chosen.tolist())]
    side = size or classifier.size
    pixels = torch.cat([read_image(path, side) for path, _ in files])
    labels = torch.tensor([label for _, label in files])
    masks = None
    if object_masks is not None:
        masks = torch.stack(
            [read_object_mask(object_masks / path.parent.name / f"{path.stem}.png", side) for path, _ in files]
        )
    return EvaluationData(normalizer(mean, std)(pixels), labels, masks, mean, std, classes)


def evaluate_command(
    classifier: Classifier,
    data: EvaluationData,
    out: Path,
    *,
    maskers: Sequence[str],
    segmenters: Sequence[str],
    fractions: int,
    lime_images: int,
    diagnostic_images: int,
    samples: int,
    top_k: Optional[int],
    batch_size: int,
    seed: int,
    residual: str = "intersection",
) -> Path:
    """Runs :func:`~captum_layermask.evaluation.evaluate` and writes ``results.md``, ``results.csv`` and figures."""
    with torch.no_grad():
        width = classifier.model(data.images[:1]).shape[1]
    if int(data.labels.max()) >= width:
        raise CommandError(
            f"labels go up to {int(data.labels.max())}, but the model has {width} classes: check the class folders or --num-classes."
        )
    points = [i / (fractions - 1) for i in range(fractions)]
    report = evaluate(
        classifier.model,
        data,
        maskers=maskers,
        segmenters=segmenters,
        fractions=points,
        lime_images=lime_images,
        diagnostic_images=diagnostic_images,
        n_samples=samples,
        k=top_k,
        batch_size=batch_size,
        seed=seed,
        residual=residual,
    )
    with staged_output(out, "evaluate") as staging:
        (staging / "results.md").write_text(report.to_markdown())
        report.to_csv(staging / "results.csv")
        report.save_figures(staging, classifier.classes)
    print(report.to_markdown())
    print(f"wrote {out}/results.md, results.csv and figures")
    return out
