"""Writing results so that no reader ever sees half of one: a temporary name beside the target, then a rename.

A write killed at any point leaves the target as it was (and a ``.partial-*`` entry beside it, which
:mod:`~captum_layermask.datasets.store` removes when it opens its folder again).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PARTIAL_PREFIX = ".partial-"
"""The name prefix of staged files and folders."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


@contextmanager
def staged(target: Union[str, Path], *, folder: bool = False, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``target`` that becomes ``target`` when the block succeeds, and is removed if it
    fails.

    Args:
        target: the file (or folder) to write.
        folder (bool): stage a folder (an existing ``target`` folder is replaced whole) rather than a file.
        suffix (str): the staged file's suffix (some writers choose the format by it).

    Yields:
        The staged path: an empty file, or an empty folder. It gets an ordinary mode (the umask applied) before it
        is renamed, so the result is not private as temporary files are.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        staging = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=target.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=suffix, dir=target.parent)
        os.close(handle)
        staging = Path(name)
    try:
        yield staging
        os.chmod(staging, (0o777 if folder else 0o666) & ~_umask())
        if folder and target.is_dir():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        _remove(staging)
