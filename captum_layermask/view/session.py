"""What ``layermask view`` computes, without the web: images, their segments, predictions under each masking with
some segments removed, and Lime/KernelShap maps. The web app (:mod:`captum_layermask.view.app`) only moves these
results to the browser."""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..core.convert import layer_masked
from ..core.errors import LayerMaskError
from ..evaluation.attribution_metrics import segment_scores
from ..evaluation.explanations import attributions_per_masker, captum_baseline
from ..evaluation.maskers import get_masker
from ..evaluation.normalization import normalizer
from ..evaluation.segmentation import get_segmenter, segment_images
from ..weights import Classifier

MASKINGS = ("layer", "grey", "black", "blur")
"""The maskings compared side by side: layer masking and three fills."""
EXPLAINED = ("layer", "grey", "black")
"""The maskings Lime and KernelShap explain under (Captum's baselines express these)."""
SEGMENTERS = ("patches", "slic", "quickshift")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MAX_UPLOAD_BYTES = 8 * 2**20
MAX_UPLOAD_PIXELS = 4096 * 4096


class ViewError(LayerMaskError, ValueError):
    """A request the view cannot serve (an unknown image, a bad upload); its message is shown to the user."""


@dataclass
class ImageLibrary:
    """The images the view offers: those of a folder (listed once, by name, never by a path from a request) and
    uploads kept in memory. Every image is ``(3, size, size)`` in ``[0, 1]``."""

    size: int
    images: Dict[str, Tensor] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_folder(cls, folder: Path, size: int, limit: int = 200) -> ImageLibrary:
        library = cls(size)
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        for path in files:
            with open(path, "rb") as file:
                library.add(path.relative_to(folder).as_posix(), file.read())
        return library

    def add(self, name: str, data: bytes) -> str:
        """Decodes ``data`` as an image (nothing else is ever decoded) and stores it under a fresh id.

        Raises:
            ViewError: for data over the size limit or that is not an image.
        """
        from PIL import Image, UnidentifiedImageError

        if len(data) > MAX_UPLOAD_BYTES:
            raise ViewError(f"the image is {len(data) / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB.")
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > MAX_UPLOAD_PIXELS:
                    raise ViewError(f"the image is {image.width}x{image.height} pixels; the limit is 4096x4096.")
                rgb = image.convert("RGB").resize((self.size, self.size))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            raise ViewError(f"'{name}' is not an image that PIL can read (PNG, JPEG, BMP, WebP).") from None
        tensor = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255).permute(2, 0, 1)
        with self.lock:
            key = f"{len(self.images)}:{Path(name).name}"
            self.images[key] = tensor
        return key

    def get(self, key: str) -> Tensor:
        if key not in self.images:
            raise ViewError(f"no image '{key}'; pick one from the list or upload one.")
        return self.images[key]


def png(pixels: np.ndarray) -> bytes:
    """An ``(H, W, 3)`` array in ``[0, 1]`` as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def heatmap(values: np.ndarray) -> np.ndarray:
    """Signed values ``(H, W)`` as colours: red for, blue against, white at 0 (symmetric scale)."""
    import matplotlib

    limit = float(np.abs(values).max()) or 1.0
    return matplotlib.colormaps["RdBu_r"]((values / limit + 1) / 2)[..., :3]


class ViewSession:
    """A classifier with the maskings it is compared under (subclasses: a segmentation model, a detector).

    Args:
        model: the model and its normalisation (:mod:`captum_layermask.weights`).
        library: the images.
    """

    task = "classification"

    def __init__(self, model: Classifier, library: ImageLibrary) -> None:
        self.model, self.library = model, library
        self.normalize = normalizer(model.mean, model.std)
        self.masked = layer_masked(model.model)
        self.maskers = {name: get_masker(name, model.mean, model.std) for name in MASKINGS}
        self.lock = threading.Lock()  # one model call at a time: torch's own threads do the parallel work
        self._segments: Dict[Tuple[str, str], np.ndarray] = {}

    def segments(self, key: str, segmenter: str) -> np.ndarray:
        """Segment ids ``(H, W)`` of an image (computed once per image and segmenter)."""
        if segmenter not in SEGMENTERS:
            raise ViewError(f"unknown segmenter '{segmenter}'; use one of {', '.join(SEGMENTERS)}.")
        if (key, segmenter) not in self._segments:
            image = self.library.get(key)[None]
            ids = segment_images(image, get_segmenter(segmenter, mean=(0, 0, 0), std=(1, 1, 1)))
            self._segments[key, segmenter] = ids[0].numpy().astype(np.int32)
        return self._segments[key, segmenter]

    def keep_mask(self, key: str, segmenter: str, removed: Sequence[int]) -> Tuple[Tensor, np.ndarray]:
        ids = self.segments(key, segmenter)
        keep = ~np.isin(ids, np.asarray(list(removed), dtype=np.int64))
        return torch.from_numpy(keep)[None, None], ids

    def predict(self, key: str, segmenter: str, removed: Sequence[int], top: int = 5) -> Dict[str, Dict]:
        """Under each masking with ``removed`` segments removed: what the model says (``top``: pairs of a name and
        a number) and the image it shows (the input as the model sees it, removed pixels white for layer
        masking: the model does not see them; with the model's output drawn on it for dense models)."""
        image = self.library.get(key)
        keep, _ = self.keep_mask(key, segmenter, removed)
        x = self.normalize(image[None])
        with self.lock, torch.no_grad():
            return {name: self.describe(name, x, keep, self._seen(name, x, keep, image), top) for name in MASKINGS}

    def forward(self, name: str) -> Callable[[Tensor, Tensor], Any]:
        """``forward(x, keep)`` under one masking."""
        if name == "layer":
            return lambda x, keep: self.masked(x, mask=keep.float())
        return self.maskers[name].bind(self.model.model)

    def describe(self, name: str, x: Tensor, keep: Tensor, seen: np.ndarray, top: int) -> Dict[str, Any]:
        """The top classes and their probabilities, and the image as the model sees it."""
        probabilities = self.forward(name)(x, keep).softmax(1)[0]
        values, indices = probabilities.topk(min(top, len(probabilities)))
        return {"top": [[self.class_name(int(i)), float(v)] for v, i in zip(values, indices)], "image": png(seen)}

    def _seen(self, name: str, x: Tensor, keep: Tensor, image: Tensor) -> np.ndarray:
        if name == "layer":
            shown = torch.where(keep[0], image, 1.0)
        else:
            filled = torch.where(keep, x, self.maskers[name].fill_values(x, keep.float()))[0]
            mean = torch.tensor(self.model.mean).view(3, 1, 1)
            std = torch.tensor(self.model.std).view(3, 1, 1)
            shown = filled * std + mean
        return shown.permute(1, 2, 0).clamp(0, 1).numpy()

    def class_name(self, index: int) -> str:
        classes = self.model.classes
        return classes[index] if classes is not None and index < len(classes) else str(index)

    def choose(self, key: str, x: int, y: int) -> Dict[str, Any]:
        """What to explain, chosen by a click at pixel ``(x, y)`` (dense models; a classifier explains its top
        class)."""
        raise ViewError("a classifier explains its top class; choosing by clicking is for segmentation and detection.")

    def explained(self, image: Tensor, x: Tensor, target: Optional[Dict[str, Any]]) -> Tuple[Any, Any, str]:
        """``(scores, target, description)``: how to turn a model into Captum's scores, Captum's target, and what is
        explained. A classifier: its logits and the plain model's top class."""
        with torch.no_grad():
            index = int(self.model.model(x).argmax(1))
        return None, index, self.class_name(index)

    def baseline(self, name: str) -> Any:
        return captum_baseline(name, self.model.mean, self.model.std)

    def explain(
        self, key: str, segmenter: str, method: str, samples: int, target: Optional[Dict[str, Any]] = None
    ) -> Dict[str, Any]:
        """Lime or KernelShap under each masking, with the same samples: per masking the map as an image and the
        score of each segment."""
        if method not in ("lime", "kernelshap"):
            raise ViewError(f"unknown method '{method}'; use lime or kernelshap.")
        if not 10 <= samples <= 2000:
            raise ViewError(f"samples must be between 10 and 2000, got {samples}.")
        image = self.library.get(key)
        ids = torch.from_numpy(self.segments(key, segmenter))[None, None].long()
        x = self.normalize(image[None])
        with self.lock:
            scores, captum_target, description = self.explained(image, x, target)
            attributions = attributions_per_masker(
                self.model.model,
                self.masked,
                x,
                ids,
                captum_target,
                maskers=EXPLAINED,
                baselines={name: self.baseline(name) for name in EXPLAINED},
                method=method,
                samples=samples,
                per_eval=16,
                seed=0,
                scores=scores,
            )
        results = {}
        for name, attribution in attributions.items():
            values = segment_scores(attribution, ids[:, 0])[0]
            results[name] = {"image": png(heatmap(values[ids[0, 0]].numpy())), "scores": values.tolist()}
        return {"target": description, "maps": results}
