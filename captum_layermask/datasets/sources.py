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

from ..evaluation.images import read_image, read_object_mask

ImagesSpec = Union[str, Path, Sequence[Union[str, Path]], "torch.utils.data.Dataset", "ImageSource"]


@dataclass(frozen=True)
class ImageSource:
    """The images of a run, by position.

    Attributes:
        keys: one stable name per image.
        files: the image files (None for a dataset).
        labels: the class index of each image where the source has one (an image folder, a dataset yielding
            ``(image, label)``), else None.
        dataset: the ``Dataset`` (None for files).
        object_masks: one object mask file per image (an image folder with ``object_masks``), else None.
    """

    keys: List[str]
    files: Optional[List[Path]]
    labels: Optional[List[int]]
    dataset: Any = None
    object_masks: Optional[List[Path]] = None

    def subset(self, positions: Sequence[int]) -> ImageSource:
        """The images at ``positions`` (their keys unchanged)."""

        def pick(values: Optional[List[Any]]) -> Optional[List[Any]]:
            return None if values is None else [values[p] for p in positions]

        if self.files is None:
            dataset = torch.utils.data.Subset(self.dataset, list(positions))
            return ImageSource(pick(self.keys), None, None, dataset)  # type: ignore[arg-type]
        return ImageSource(pick(self.keys), pick(self.files), pick(self.labels), None, pick(self.object_masks))  # type: ignore[arg-type]

    def load(self, index: int, size: int) -> Tuple[Tensor, Optional[int], Optional[Tensor]]:
        """Image ``index`` as ``(3, size, size)`` in [0, 1] (center crop, then resize), its label and its object
        mask ``(size, size)`` bool (cropped alike), each None where the source has none.

        Raises:
            UnreadableImageError: if the image or its mask cannot be decoded.
        """
        if self.files is None:
            return _dataset_item(self.dataset[index], index)
        image = read_image(self.files[index], size)[0]
        label = None if self.labels is None else self.labels[index]
        mask = None if self.object_masks is None else read_object_mask(self.object_masks[index], size)
        return image, label, mask


def _dataset_item(item: Any, index: int) -> Tuple[Tensor, Optional[int], Optional[Tensor]]:
    """A dataset's ``image``, ``(image, label)`` or ``(image, label, object_mask)`` as those three."""
    parts = list(item) if isinstance(item, (tuple, list)) else [item]
    if not 1 <= len(parts) <= 3:
        raise ValueError(
            f"dataset item {index} has {len(parts)} parts; give image, (image, label) or (image, label, object_mask)."
        )
    image, label, mask = (parts + [None, None])[:3]
    image = torch.as_tensor(image, dtype=torch.float32)
    if image.ndim != 3:
        raise ValueError(f"dataset item {index} is not a (C, H, W) image but has shape {tuple(image.shape)}.")
    if mask is not None:
        mask = torch.as_tensor(mask).bool()
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise ValueError(
                f"dataset item {index} has an object mask of shape {tuple(mask.shape)} for an image of {tuple(image.shape[-2:])}; give (H, W)."
            )
    return image, None if label is None else int(label), mask


def image_source(images: ImagesSpec, object_masks: Optional[Union[str, Path]] = None) -> ImageSource:
    """An :class:`ImageSource` from an ImageFolder-layout folder (``<folder>/<class>/<image>``; labels are the
    sorted class subfolders), a folder of images without classes, a list of image files, or a ``Dataset``.

    ``object_masks`` (with an image folder): a folder laid out like it, ``<masks>/<class>/<image name>.png``,
    non-zero on the labelled object.

    Raises:
        FileNotFoundError: for a missing folder, a folder without images, or an image without its object mask.
    """
    if isinstance(images, ImageSource):
        return images
    if object_masks is not None:
        if not isinstance(images, (str, Path)):
            raise ValueError("object_masks go with an image folder; a Dataset yields (image, label, object_mask).")
        source = image_source(images)
        masks = [Path(object_masks) / Path(key).with_suffix(".png") for key in source.keys]
        missing = next((path for path in masks if not path.exists()), None)
        if missing is not None:
            raise FileNotFoundError(f"no object mask {missing}: give <masks>/<class>/<image name>.png for every image.")
        return ImageSource(source.keys, source.files, source.labels, object_masks=masks)
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
