"""The view for dense models: a segmentation model (the prediction drawn per masking, a region explained) and a
detector (the detections drawn per masking, one detection explained), each chosen by a click."""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..core.model import select_output
from ..evaluation.detection import FILLS, detect
from ..evaluation.maskers import BlurFill, ConstantFill
from ..integrations.captum import LayerMask
from ..integrations.detection import DetectionScores
from ..integrations.segmentation import RegionScores
from .session import ImageLibrary, ViewError, ViewSession, png


def palette(labels: np.ndarray) -> np.ndarray:
    """A colour per class index (matplotlib's tab10, repeated)."""
    import matplotlib

    colours = np.array(matplotlib.colormaps["tab10"].colors)
    return colours[labels % len(colours)]


class SegmentationViewSession(ViewSession):
    """A segmentation model: per masking the predicted classes drawn over the image (output cells that no visible
    pixel reaches white under layer masking) and each class's share of the visible output; a click on the plain
    prediction chooses the class whose pixels are the region explained (:class:`~captum_layermask.RegionScores`)."""

    task = "segmentation"

    def logits(self, name: str, x: Tensor, keep: Tensor) -> Tuple[Tensor, Tensor]:
        """``(C, H, W)`` logits and the ``(H, W)`` output mask under one masking."""
        part = self.model.output
        if name == "layer":
            output, visible = self.masked(x, mask=keep.float(), return_mask=True)
            logits, visible = select_output(output, part)[0], select_output(visible, part)[0, 0]
        else:
            logits = select_output(self.forward(name)(x, keep), part)[0]
            visible = torch.ones((), dtype=torch.bool)
        return logits, visible.expand(logits.shape[-2:])

    def describe(self, name: str, x: Tensor, keep: Tensor, seen: np.ndarray, top: int) -> Dict[str, Any]:
        logits, visible = self.logits(name, x, keep)
        labels = logits.argmax(0).numpy()
        shown = 0.45 * seen + 0.55 * palette(labels)
        shown[~visible.numpy()] = 1.0
        counts = np.bincount(labels[visible.numpy()], minlength=logits.shape[0])
        order = np.argsort(-counts)[:top]
        total = max(int(counts.sum()), 1)
        return {"top": [[self.class_name(int(c)), counts[c] / total] for c in order if counts[c]], "image": png(shown)}

    def plain_labels(self, key: str) -> Tensor:
        x = self.normalize(self.library.get(key)[None])
        with torch.no_grad():
            return select_output(self.model.model(x), self.model.output)[0].argmax(0)

    def choose(self, key: str, x: int, y: int) -> Dict[str, Any]:
        with self.lock:
            labels = self.plain_labels(key)
        if not (0 <= y < labels.shape[0] and 0 <= x < labels.shape[1]):
            raise ViewError(f"({x}, {y}) is outside the image.")
        label = int(labels[y, x])
        if label == self.model.background:
            raise ViewError("that pixel is predicted as the background; click an object to explain its class.")
        return {"class": label, "description": f"'{self.class_name(label)}' over {int((labels == label).sum())} pixels"}

    def explained(self, image: Tensor, x: Tensor, target: Optional[Dict[str, Any]]) -> Tuple[Any, Any, str]:
        with torch.no_grad():
            labels = select_output(self.model.model(x), self.model.output)[0].argmax(0)
        if target is None:
            counts = torch.bincount(labels.flatten(), minlength=int(labels.max()) + 1)
            if self.model.background is not None and self.model.background < len(counts):
                counts[self.model.background] = 0
            label = int(counts.argmax())
        else:
            label = int(target["class"])
        region = labels == label
        scores = functools.partial(RegionScores, region=region, output=self.model.output)
        return scores, label, f"'{self.class_name(label)}' over {int(region.sum())} pixels"


class DetectionViewSession(ViewSession):
    """A detector (``[0, 1]`` input): per masking its detections drawn on the image as it sees it (the same rule
    for every masking: boxes at least half visible); a click chooses the detection explained
    (:class:`~captum_layermask.DetectionScores`)."""

    task = "detection"

    def __init__(self, model: Any, library: ImageLibrary) -> None:
        super().__init__(model, library)
        self.maskers = {"grey": ConstantFill(FILLS["grey"], "grey"), "black": ConstantFill(FILLS["black"], "black")}
        self.maskers["blur"] = BlurFill()

    def describe(self, name: str, x: Tensor, keep: Tensor, seen: np.ndarray, top: int) -> Dict[str, Any]:
        from PIL import Image, ImageDraw

        found = detect(self.model.model, x, keep.float(), name, masked=self.masked)[0]
        picture = Image.fromarray((seen * 255).astype(np.uint8))
        draw = ImageDraw.Draw(picture)
        for box, label in zip(found["boxes"].tolist(), found["labels"].tolist()):
            colour = tuple(int(255 * c) for c in palette(np.array([label]))[0])
            draw.rectangle(box, outline=colour, width=2)
        listed = [[self.class_name(int(label)), float(score)] for label, score in zip(found["labels"], found["scores"])]
        return {"top": listed[:top], "image": png(np.asarray(picture, dtype=np.float32) / 255)}

    def plain_detections(self, key: str) -> Dict[str, Tensor]:
        with torch.no_grad():
            return self.model.model([self.library.get(key)])[0]

    def choose(self, key: str, x: int, y: int) -> Dict[str, Any]:
        with self.lock:
            found = self.plain_detections(key)
        boxes = found["boxes"]
        inside = (boxes[:, 0] <= x) & (x <= boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 3])
        if not bool(inside.any()):
            raise ViewError("no detection's box holds that pixel; click inside a box to explain that detection.")
        best = int(torch.nonzero(inside)[found["scores"][inside].argmax()])
        return self._detection(found, best)

    def _detection(self, found: Dict[str, Tensor], index: int) -> Dict[str, Any]:
        box, label = [round(float(v), 1) for v in found["boxes"][index]], int(found["labels"][index])
        score = float(found["scores"][index])
        description = f"the '{self.class_name(label)}' detection (score {score:.2f}) at {box}"
        return {"box": box, "label": label, "description": description}

    def explained(self, image: Tensor, x: Tensor, target: Optional[Dict[str, Any]]) -> Tuple[Any, Any, str]:
        if target is None:
            with torch.no_grad():
                found = self.model.model([image])[0]
            if len(found["scores"]) == 0:
                raise ViewError("the detector finds nothing in this image; there is no detection to explain.")
            target = self._detection(found, int(found["scores"].argmax()))
        scores = functools.partial(DetectionScores, box=target["box"], label=int(target["label"]))
        return scores, None, target["description"]

    def baseline(self, name: str) -> Any:
        return LayerMask() if name == "layer" else FILLS[name]


def session_for(model: Any, library: ImageLibrary, task: str = "classification") -> ViewSession:
    """The view session of a model for its task."""
    sessions = {"classification": ViewSession, "segmentation": SegmentationViewSession}
    sessions["detection"] = DetectionViewSession
    if task not in sessions:
        raise ViewError(f"unknown task '{task}'; use classification, segmentation or detection.")
    return sessions[task](model, library)
