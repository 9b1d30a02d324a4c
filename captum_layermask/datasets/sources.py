"""Where a dataset run's images come from: an image folder, a list of files, or a ``torch.utils.data.Dataset``.

Every image has a stable **key** (its path relative to the folder, the file path as given, or ``"{index:08d}"``
for a dataset), which names its result file, so a restarted run knows what is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..evaluation.images import read_image

ImagesSpec = Union[str, Path, Sequence[Union[str, Path]], "torch.utils.data.Dataset"]


@dataclass(frozen=True)
class ImageSource:
    """The images of a run, by position.

    Attributes:
        keys: one stable name per image.
        files: the image files (None for a dataset).
        labels: the class index of each image where the source has one (an image folder, a dataset yielding
            ``(image, label)``), else None.
        dataset: the ``Dataset`` (None for files).
    """

    keys: List[str]
    files: Optional[List[Path]]
    labels: Optional[List[int]]
    dataset: Any = None

    def load(self, index: int, size: int) -> Tuple[Tensor, Optional[int]]:
        """Image ``index`` as ``(3, size, size)`` in [0, 1] (center crop, then resize) and its label.

        Raises:
            UnreadableImageError: if the file cannot be decoded.
        """
        if self.files is None:
            item = self.dataset[index]
            image, label = item if isinstance(item, (tuple, list)) else (item, None)
            image = torch.as_tensor(image, dtype=torch.float32)
            if image.ndim != 3:
                raise ValueError(f"dataset item {index} is not a (C, H, W) image but has shape {tuple(image.shape)}.")
            return image, None if label is None else int(label)
        image = read_image(self.files[index], size)[0]
        return image, None if self.labels is None else self.labels[index]


def image_source(images: ImagesSpec) -> ImageSource:
    """An :class:`ImageSource` from an ImageFolder-layout folder (``<folder>/<class>/<image>``; labels are the
    sorted class subfolders), a folder of images without classes, a list of image files, or a ``Dataset``."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if isinstance(images, torch.utils.data.Dataset):
        return ImageSource([f"{index:08d}" for index in range(len(images))], None, None, images)  # type: ignore[arg-type]
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder; give an image folder, a list of files or a Dataset.")
        classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
        if classes:
            pairs = [
                (path, label)
                for label, name in enumerate(classes)
                for path in sorted((folder / name).iterdir())
                if path.suffix.lower() in IMG_EXTENSIONS
            ]
        else:
            pairs = [(path, None) for path in sorted(folder.iterdir()) if path.suffix.lower() in IMG_EXTENSIONS]
        if not pairs:
            raise FileNotFoundError(f"{folder} holds no images (<folder>/<class>/<image> or <folder>/<image>).")
        files = [path for path, _ in pairs]
        labels = [label for _, label in pairs] if classes else None
        return ImageSource([path.relative_to(folder).as_posix() for path in files], files, labels)
    files = [Path(path) for path in images]
    if not files:
        raise ValueError("the list of images is empty.")
    keys = [path.as_posix() for path in files]
    if len(set(keys)) != len(keys):
        raise ValueError("the list of images names a file twice.")
    return ImageSource(keys, files, None)
