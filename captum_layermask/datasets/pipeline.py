"""One image through a dataset run, as both engines run it: read and segment it (:func:`prepare`, the CPU-bound
part), then compute its record with a worker and write it (:func:`finish`)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Protocol

import numpy as np
from torch import Tensor

from ..evaluation.images import UnreadableImageError
from ..evaluation.segmentation import get_segmenter, segment_images
from .sources import ImageSource
from .store import ResultStore


class ImageWorker(Protocol):
    """What a run computes per image (:class:`~captum_layermask.datasets.explain.ImageExplainer`,
    :class:`~captum_layermask.datasets.evaluate.ImageEvaluator`): built once per process or Ray actor."""

    def compute(
        self, position: int, image: Tensor, segments: Tensor, label: Any, object_mask: Optional[Tensor]
    ) -> Dict[str, np.ndarray]:
        """The record of one image ``(3, H, W)`` in [0, 1], with its segment ids ``(H, W)`` and its label (a class
        index, a label map ``(H, W)`` for a segmentation, or None)."""


def image_segmenter(name: str) -> Any:
    """The segmenter of a run, for images in [0, 1]."""
    return get_segmenter(name, mean=(0, 0, 0), std=(1, 1, 1))


def prepare(source: ImageSource, size: int, segmenter: Any, position: int) -> Dict[str, Any]:
    """Reads and segments one image (the CPU-bound part): ``{"image", "segments", "label", "object_mask",
    "fingerprint"}`` or ``{"error", "fingerprint"}``."""
    fingerprint = source.fingerprint(position) if source.files is not None else None  # before reading the file
    try:
        loaded = source.load(position, size)
    except UnreadableImageError as error:
        return {"error": str(error), "fingerprint": fingerprint or source.fingerprint(position)}
    image, label, object_mask = loaded
    ids = segment_images(image[None], segmenter)[0]
    fingerprint = fingerprint or source.fingerprint(position, loaded)
    return {"image": image, "segments": ids, "label": label, "object_mask": object_mask, "fingerprint": fingerprint}


def finish(store: ResultStore, worker: ImageWorker, position: int, prepared: Dict[str, Any]) -> None:
    """Computes a prepared image's record with ``worker`` and writes it (or records why it could not be read)."""
    if "error" in prepared:
        store.write_failure(position, prepared["error"], prepared["fingerprint"])
        return
    record = worker.compute(
        position, prepared["image"], prepared["segments"], prepared["label"], prepared.get("object_mask")
    )
    store.write(position, record, prepared["fingerprint"])
