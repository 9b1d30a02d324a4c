"""Where a dataset run's images come from: an image folder, a list of files, or a ``torch.utils.data.Dataset``.

Every image has a stable **key** (its path relative to the folder, the file path as given, or ``"{index:08d}"``
for a dataset), which names its result file, so a restarted run knows what is done.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..evaluation.images import IMAGE_EXTENSIONS, image_size, read_image, read_label_map, read_object_mask

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
        folders: the folders the images (and object masks) are read from, which a run's output must not be in.
        label_maps: one label map file per image (an image folder with ``label_maps``: a segmentation), else None.
    """

    keys: List[str]
    files: Optional[List[Path]]
    labels: Optional[List[int]]
    dataset: Any = None
    object_masks: Optional[List[Path]] = None
    folders: Tuple[Path, ...] = ()
    label_maps: Optional[List[Path]] = None

    def subset(self, positions: Sequence[int]) -> ImageSource:
        """The images at ``positions`` (their keys unchanged)."""

        def pick(values: Optional[List[Any]]) -> Optional[List[Any]]:
            return None if values is None else [values[p] for p in positions]

        if self.files is None:
            dataset = torch.utils.data.Subset(self.dataset, list(positions))
            return ImageSource(pick(self.keys), None, None, dataset)  # type: ignore[arg-type]
        return ImageSource(
            pick(self.keys),  # type: ignore[arg-type]
            pick(self.files),
            pick(self.labels),
            None,
            pick(self.object_masks),
            self.folders,
            pick(self.label_maps),
        )

    def fingerprint(self, index: int, loaded: Optional[Tuple[Tensor, Optional[int], Optional[Tensor]]] = None) -> str:
        """What image ``index``'s result is computed from, as a string that changes when it does: a file's size
        and modification time (and its object mask's), or a hash of a dataset item's values (``loaded``, the
        item as :meth:`load` returned it, saves reading it again)."""
        if self.files is not None:
            paths = [self.files[index]] + [
                extra[index] for extra in (self.object_masks, self.label_maps) if extra is not None
            ]
            try:
                return ";".join(f"{stat.st_size}:{stat.st_mtime_ns}" for stat in (path.stat() for path in paths))
            except OSError:
                return "missing"
        image, label, mask = loaded if loaded is not None else self.load(index, 0)
        digest = hashlib.sha256(str((tuple(image.shape), label if not torch.is_tensor(label) else "map")).encode())
        digest.update(image.contiguous().numpy().tobytes())
        if torch.is_tensor(label):
            digest.update(label.contiguous().numpy().tobytes())
        if mask is not None:
            digest.update(mask.contiguous().numpy().tobytes())
        return digest.hexdigest()

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
        if self.label_maps is not None:
            label = read_label_map(self.label_maps[index], size)
        mask = None if self.object_masks is None else read_object_mask(self.object_masks[index], size)
        return image, label, mask


def _dataset_item(item: Any, index: int) -> Tuple[Tensor, Optional[int], Optional[Tensor]]:
    """A dataset's ``image``, ``(image, label)`` or ``(image, label, object_mask)`` as those three, the image as
    float32 in [0, 1] (uint8 values are divided by 255, as ``ToTensor`` does).

    Raises:
        ValueError: for an item of another form, an image of another integer type, or float values outside [0, 1]
            (e.g. an image normalised already, or 0..255 floats).
    """
    parts = list(item) if isinstance(item, (tuple, list)) else [item]
    if not 1 <= len(parts) <= 3:
        raise ValueError(
            f"dataset item {index} has {len(parts)} parts; give image, (image, label) or (image, label, object_mask)."
        )
    image, label, mask = (parts + [None, None])[:3]
    image = torch.as_tensor(image)
    if image.dtype == torch.uint8:
        image = image.float() / 255
    elif not image.is_floating_point():
        raise ValueError(
            f"dataset item {index} is an image of {image.dtype}; give float values in [0, 1] or uint8 values 0..255."
        )
    image = image.float()
    if image.ndim != 3:
        raise ValueError(f"dataset item {index} is not a (C, H, W) image but has shape {tuple(image.shape)}.")
    if image.numel() and not (0.0 <= float(image.min()) and float(image.max()) <= 1.0):
        raise ValueError(
            f"dataset item {index} has values in [{float(image.min()):g}, {float(image.max()):g}]; give images in "
            "[0, 1] (e.g. transforms.ToTensor(), without Normalize: the run normalises with mean and std)."
        )
    if mask is not None:
        mask = torch.as_tensor(mask).bool()
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise ValueError(
                f"dataset item {index} has an object mask of shape {tuple(mask.shape)} for an image of {tuple(image.shape[-2:])}; give (H, W)."
            )
    if label is not None and torch.is_tensor(label) and label.ndim == 2:  # a label map (segmentation)
        if tuple(label.shape) != tuple(image.shape[-2:]):
            raise ValueError(
                f"dataset item {index} has a label map of shape {tuple(label.shape)} for an image of {tuple(image.shape[-2:])}."
            )
        return image, label.long(), mask
    return image, None if label is None else int(label), mask


def _imagenet_synsets() -> Dict[str, int]:
    """ImageNet-1k's synset ids (``n01440764``, ...) with torchvision's class index of each (their sorted order)."""
    names = (Path(__file__).parent / "imagenet_synsets.txt").read_text().split()
    return {name: index for index, name in enumerate(names)}


def class_labels(classes: Sequence[str]) -> List[int]:
    """The label of each class folder: ImageNet-1k's class index when every folder is an ImageNet-1k synset id
    (so that a subset such as ImageNette gets torchvision's indices), else the position in sorted order."""
    synsets = _imagenet_synsets()
    if all(name in synsets for name in classes):
        return [synsets[name] for name in classes]
    return list(range(len(classes)))


def _folder_images(folder: Path) -> List[Path]:
    """The image files of a folder, sorted; other files (but hidden ones) are left out with a warning."""
    entries = sorted(entry for entry in folder.iterdir() if entry.is_file() and not entry.name.startswith("."))
    images = [entry for entry in entries if entry.suffix.lower() in IMAGE_EXTENSIONS]
    others = [entry.name for entry in entries if entry.suffix.lower() not in IMAGE_EXTENSIONS]
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        warnings.warn(
            f"{len(others)} file(s) in {folder} are not images ({', '.join(IMAGE_EXTENSIONS)}) and are left out: {shown}",
            stacklevel=3,
        )
    return images


def _with_object_masks(source: ImageSource, object_masks: Path) -> ImageSource:
    """``source`` with the object mask of each image, each checked before any work: present, one per image, and
    of the image's size."""
    masks = _per_image_files(source, object_masks, "object mask")
    return ImageSource(source.keys, source.files, source.labels, None, masks, (*source.folders, object_masks))


def _per_image_files(source: ImageSource, folder: Path, what: str) -> List[Path]:
    """``<folder>/<image key>.png`` for each image of a folder source, checked: present, one per image, and of
    its image's size."""
    masks = [folder / Path(key).with_suffix(".png") for key in source.keys]
    owners: Dict[Path, str] = {}
    for key, path in zip(source.keys, masks):
        if path in owners:
            raise ValueError(
                f"images {owners[path]} and {key} would share the {what} {path}; give images of one class "
                "distinct names apart from their suffix."
            )
        owners[path] = key
        if not path.exists():
            raise FileNotFoundError(f"no {what} {path}: give <folder>/<class>/<image name>.png for every image.")
    for file, path in zip(source.files or [], masks):
        image, mask = image_size(file), image_size(path)
        if image is not None and mask is not None and image != mask:
            raise ValueError(
                f"{what} {path} is {mask[1]}x{mask[0]} (width x height) but its image {file} is "
                f"{image[1]}x{image[0]}; give each at its image's size."
            )
    return masks


def image_source(
    images: ImagesSpec,
    object_masks: Optional[Union[str, Path]] = None,
    label_maps: Optional[Union[str, Path]] = None,
) -> ImageSource:
    """An :class:`ImageSource` from an ImageFolder-layout folder (``<folder>/<class>/<image>``; labels are the
    class subfolders' positions in sorted order, or ImageNet-1k's class indices when every subfolder is an
    ImageNet-1k synset id), a folder of images without classes, a list of image files, or a ``Dataset``.
    Files that are not images are left out with a warning.

    ``object_masks`` (with an image folder): a folder laid out like it, ``<masks>/<class>/<image name>.png``,
    non-zero on the labelled object, each of its image's size. ``label_maps`` (for a segmentation): laid out
    alike, ``<labels>/<image name>.png`` with one class index per pixel (Pascal VOC's ``SegmentationClass``).

    Raises:
        FileNotFoundError: for a missing folder, a folder without images, or an image without its object mask.
        ValueError: for an object mask of another size than its image, or two images sharing one mask.
    """
    if isinstance(images, ImageSource):
        return images
    if label_maps is not None:
        if not isinstance(images, (str, Path)) or object_masks is not None:
            raise ValueError("label_maps go with an image folder (no object masks); a Dataset yields (image, labels).")
        source = image_source(images)
        maps = _per_image_files(source, Path(label_maps), "label map")
        return ImageSource(source.keys, source.files, None, None, None, (*source.folders, Path(label_maps)), maps)
    if object_masks is not None:
        if not isinstance(images, (str, Path)):
            raise ValueError("object_masks go with an image folder; a Dataset yields (image, label, object_mask).")
        return _with_object_masks(image_source(images), Path(object_masks))
    if isinstance(images, torch.utils.data.Dataset):
        return ImageSource([f"{index:08d}" for index in range(len(images))], None, None, images)  # type: ignore[arg-type]
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder; give an image folder, a list of files or a Dataset.")
        classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
        if classes:
            labels = class_labels(classes)
            pairs = [(path, label) for name, label in zip(classes, labels) for path in _folder_images(folder / name)]
        else:
            pairs = [(path, None) for path in _folder_images(folder)]
        if not pairs:
            raise FileNotFoundError(f"{folder} holds no images (<folder>/<class>/<image> or <folder>/<image>).")
        files = [path for path, _ in pairs]
        keys = [path.relative_to(folder).as_posix() for path in files]
        return ImageSource(keys, files, [label for _, label in pairs] if classes else None, folders=(folder,))  # type: ignore[misc]
    files = [Path(path) for path in images]
    if not files:
        raise ValueError("the list of images is empty.")
    keys = [path.as_posix() for path in files]
    if len(set(keys)) != len(keys):
        raise ValueError("the list of images names a file twice.")
    return ImageSource(keys, files, None)
