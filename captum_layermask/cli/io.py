"""Files the command reads and writes: images, segment ids, and output folders."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from ..evaluation import images
from ..files import staged


class CommandError(Exception):
    """A user mistake on the command line: reported as one line on stderr, exit status 2."""


MANIFEST = "layermask-output.json"
"""The file that marks a folder as a ``layermask`` output and lists what the run wrote."""


def read_image(path: Path, size: int) -> Tensor:
    """An RGB image file as ``(1, 3, size, size)`` in [0, 1] (:func:`~captum_layermask.evaluation.images.read_image`).

    Raises:
        CommandError: if the file cannot be read.
    """
    try:
        return images.read_image(path, size)
    except images.UnreadableImageError as error:
        raise CommandError(str(error)) from None


def read_segments(path: Path, height: int, width: int) -> Tensor:
    """Segment ids ``(H, W)`` from a ``.npy`` file of non-negative integers.

    Raises:
        CommandError: if the file cannot be read, is not an integer array of the image's size, or holds negative
            ids.
    """
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot read segments {path}: {error}") from None
    if array.dtype.kind not in "iu":
        raise CommandError(
            f"segments in {path} are {array.dtype}; give integer segment ids (e.g. np.int64), one per pixel."
        )
    if array.shape != (height, width):
        raise CommandError(f"segments in {path} have shape {array.shape}, but the image is {height}x{width}.")
    if array.size and array.min() < 0:
        raise CommandError(f"segments in {path} hold negative ids; segment ids must be 0 or more.")
    return torch.from_numpy(array.astype(np.int64))


def check_output_folder(out: Path) -> None:
    """Refuses, before any work, an ``--out`` that is a file or a folder holding files of anything but an earlier
    run of this command (which the new run replaces whole)."""
    if out.exists() and not out.is_dir():
        raise CommandError(
            f"--out {out} is a file; give a folder (it is created, or replaced if it holds an earlier layermask output)."
        )
    if out.is_dir():
        present = {entry.name for entry in out.iterdir()}
        if not present:
            return
        try:
            listed = set(json.loads((out / MANIFEST).read_text())["files"]) | {MANIFEST}
        except (OSError, ValueError, KeyError, TypeError):
            raise CommandError(f"--out {out} is a folder that holds other files; give a new or empty folder.") from None
        if not present <= listed:
            raise CommandError(
                f"--out {out} holds files that an earlier layermask run did not write ({', '.join(sorted(present - listed))}); give a new or empty folder."
            )
    parent = out.parent if out.parent != Path("") else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise CommandError(f"cannot write to {parent}: permission denied.")


@contextmanager
def staged_output(out: Path, command: str) -> Iterator[Path]:
    """A staging folder beside ``out`` that becomes ``out`` only if the block succeeds.

    An earlier output in ``out`` (see :func:`check_output_folder`) is replaced as a whole, so a folder never mixes
    two runs; on failure nothing changes.
    """
    check_output_folder(out)
    with staged(out, folder=True) as staging:
        yield staging
        files = sorted(entry.name for entry in staging.iterdir())
        (staging / MANIFEST).write_text(json.dumps({"command": command, "files": files}, indent=1) + "\n")
