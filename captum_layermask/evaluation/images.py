"""Image files as model inputs: decoding at the file's own bit depth, center crop to a square, resizing."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded."""


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
"""The file suffixes read as images (torchvision's ``IMG_EXTENSIONS`` and GIF, read at its first frame)."""


def pixels(path: Path, size: Optional[int] = None) -> np.ndarray:
    """An image file as ``(H, W, 3)`` float64 in [0, 1], at its own bit depth (8 or 16 bits per channel, or 32-bit
    float images whose values lie in [0, 1]).

    A JPEG larger than needed is decoded at reduced scale (PIL's draft mode, a power-of-two DCT scaling) when
    ``size`` is given: both sides stay at least ``size``, so that a center crop resized to ``size`` loses nothing,
    and a 36-megapixel photo is never held whole in memory.

    Raises:
        UnreadableImageError: if the file cannot be decoded, is a decompression bomb (PIL's pixel limit), or is a
            float image outside [0, 1].
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as file:
            if size is not None and file.format == "JPEG":
                file.draft("RGB", (size, size))
            if file.mode == "F":
                values = np.asarray(file, dtype=np.float64)
                low, high = float(np.nanmin(values)), float(np.nanmax(values))
                if not (0.0 <= low and high <= 1.0):
                    raise ValueError(f"it is a float image with values in [{low:g}, {high:g}]; give values in [0, 1]")
                return np.repeat(values[..., None], 3, axis=2)
            if file.mode.startswith("I"):  # 16-bit grey (PNG, TIFF): PIL's RGB conversion would clip it at 255
                grey = np.asarray(file, dtype=np.float64) / 65535.0
                return np.repeat(grey[..., None], 3, axis=2).clip(0, 1)
            return np.asarray(file.convert("RGB"), dtype=np.float64) / 255.0
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(f"cannot read image {path}: {error}") from None


def image_size(path: Path) -> Optional[Tuple[int, int]]:
    """``(height, width)`` from an image file's header, without decoding it; None if the header cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as file:
            width, height = file.size
    except Exception:  # an unreadable image is recorded as such when it is read
        return None
    return height, width


def center_square(image: Tensor, size: int, mode: str) -> Tensor:
    """Center crop ``(N, C, H, W)`` to a square, then resize to ``size``."""
    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = round((height - side) / 2), round((width - side) / 2)  # torchvision's center_crop offsets
    image = image[..., top : top + side, left : left + side]
    if mode == "nearest":
        return F.interpolate(image, size=(size, size), mode="nearest")
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def read_image(path: Path, size: int) -> Tensor:
    """An RGB image file as ``(1, 3, size, size)`` in [0, 1] (center crop to a square, then resize)."""
    image = torch.from_numpy(pixels(path, size)).permute(2, 0, 1)[None].float()
    return center_square(image, size, "bilinear")


def read_object_mask(path: Path, size: int) -> Tensor:
    """An object mask image (non-zero on the object) as ``(size, size)`` bool, cropped like :func:`read_image`.

    Raises:
        FileNotFoundError: if there is no such file.
        UnreadableImageError: if it cannot be decoded.
    """
    if not path.exists():
        raise FileNotFoundError(f"no object mask {path}: give <masks>/<class>/<image name>.png for every image.")
    mask = torch.from_numpy(pixels(path).max(2) > 0)
    return center_square(mask[None, None].float(), size, "nearest")[0, 0] > 0


def read_label_map(path: Path, size: int) -> Tensor:
    """A label map (one class index per pixel: a PNG in palette mode ``P``, as Pascal VOC's, or grey ``L``/``I``)
    as ``(size, size)`` int64, cropped like :func:`read_image` and resized by nearest neighbour.

    Raises:
        FileNotFoundError: if there is no such file.
        UnreadableImageError: if it cannot be decoded or holds colours rather than class indices.
    """
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise FileNotFoundError(f"no label map {path}: give <labels>/<image name>.png for every image.")
    try:
        with Image.open(path) as file:
            if file.mode not in ("P", "L", "I", "I;16"):
                raise ValueError(f"its mode is {file.mode}; a label map holds one class index per pixel (P, L or I)")
            labels = torch.from_numpy(np.asarray(file, dtype=np.int64).copy())
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(f"cannot read label map {path}: {error}") from None
    return center_square(labels[None, None].double(), size, "nearest")[0, 0].long()
