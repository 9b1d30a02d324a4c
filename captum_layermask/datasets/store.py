"""A dataset run's output folder: one small file per image, written atomically as it completes.

``out/run.json`` holds the run's arguments; ``out/images/<position>.npz`` one image's result (its segment ids,
target, label, per masker the per-segment scores, and ``fingerprint``: what it was computed from);
``out/images/<position>.error.json`` an image that could not be read (the message and the fingerprint). Each file
is written to a temporary name (``.partial-*``) and renamed, so a run killed at any moment leaves only whole files,
and any number of workers on any node can write without coordinating; temporary files left by a killed run are
removed when the folder is opened again. A restarted run skips the images whose file has the image's present
fingerprint; ``out/index.json`` is written when every image has one. Why not one Parquet file: Parquet cannot be
appended to atomically, and a file per image makes "done" a question of existence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

import numpy as np

from ..files import PARTIAL_PREFIX, staged

RUN_FILE = "run.json"
INDEX_FILE = "index.json"


class OutputMismatchError(ValueError):
    """An output folder that holds a run with other arguments (or something else entirely)."""


def _atomic_write(path: Path, write: Any) -> None:
    with staged(path) as staging:
        write(str(staging))


class ResultStore:
    """The output folder of one run (see the module's description).

    Args:
        out: the folder; created if missing.
        arguments: what determines the results (JSON-serialisable). A folder holding a run with other
            arguments is refused with :class:`OutputMismatchError`.
    """

    def __init__(self, out: Path, arguments: Dict[str, Any]) -> None:
        self.out = Path(out)
        self.images = self.out / "images"
        run_file = self.out / RUN_FILE
        if self.out.exists() and not self.out.is_dir():
            raise OutputMismatchError(f"{self.out} is a file; give a folder for the results.")
        self._remove_partial_files()
        if run_file.exists():
            earlier = json.loads(run_file.read_text())
            changed = sorted(key for key in set(earlier) | set(arguments) if earlier.get(key) != arguments.get(key))
            if changed:
                raise OutputMismatchError(
                    f"{self.out} holds a run with other arguments ({', '.join(changed)} differ); give a new output "
                    "folder, or the same arguments to finish that run."
                )
        elif self.out.is_dir() and any(entry.name != "images" or any(entry.iterdir()) for entry in self.out.iterdir()):
            raise OutputMismatchError(f"{self.out} holds other files; give a new or empty folder for the results.")
        self.out.mkdir(parents=True, exist_ok=True)
        if not run_file.exists():
            _atomic_write(run_file, lambda path: Path(path).write_text(json.dumps(arguments, indent=1) + "\n"))
        self.images.mkdir(exist_ok=True)

    def _remove_partial_files(self) -> None:
        """Removes the temporary files of writes that a killed run left unfinished."""
        for folder in (self.out, self.images):
            if folder.is_dir():
                for entry in folder.glob(PARTIAL_PREFIX + "*"):
                    entry.unlink(missing_ok=True)

    @classmethod
    def reader(cls, out: Path) -> ResultStore:
        """The store of an existing output folder, for reading only."""
        store = cls.__new__(cls)
        store.out, store.images = Path(out), Path(out) / "images"
        return store

    def result_path(self, position: int) -> Path:
        return self.images / f"{position:06d}.npz"

    def error_path(self, position: int) -> Path:
        return self.images / f"{position:06d}.error.json"

    def finished(self) -> Set[int]:
        """Positions that have a result or a recorded failure."""
        names = (entry.name for entry in self.images.iterdir() if not entry.name.startswith("."))
        return {int(name.split(".")[0]) for name in names}

    def fingerprint(self, position: int) -> Optional[str]:
        """The fingerprint of the image that a finished position's file was computed from."""
        if self.error_path(position).exists():
            return json.loads(self.error_path(position).read_text()).get("fingerprint")
        with np.load(self.result_path(position), allow_pickle=False) as data:
            return str(data["fingerprint"]) if "fingerprint" in data.files else None

    def discard(self, position: int) -> None:
        """Removes a position's result or failure (its image changed since)."""
        self.result_path(position).unlink(missing_ok=True)
        self.error_path(position).unlink(missing_ok=True)

    def write(self, position: int, record: Dict[str, np.ndarray], fingerprint: str) -> None:
        def save(path: str) -> None:
            with open(path, "wb") as file:
                np.savez(file, **record, fingerprint=np.str_(fingerprint))

        _atomic_write(self.result_path(position), save)
        self.error_path(position).unlink(missing_ok=True)

    def write_failure(self, position: int, message: str, fingerprint: str) -> None:
        text = json.dumps({"error": message, "fingerprint": fingerprint}) + "\n"
        _atomic_write(self.error_path(position), lambda path: Path(path).write_text(text))
        self.result_path(position).unlink(missing_ok=True)

    def read(self, position: int) -> Dict[str, np.ndarray]:
        """A result's arrays (without its fingerprint)."""
        with np.load(self.result_path(position), allow_pickle=False) as data:
            return {name: data[name] for name in data.files if name != "fingerprint"}

    def write_index(self, keys: List[str]) -> Dict[str, Any]:
        """``index.json``: each image's key and file, or its error; written once every image is finished."""
        entries = []
        for position, key in enumerate(keys):
            if self.result_path(position).exists():
                entries.append({"key": key, "file": f"images/{self.result_path(position).name}"})
            else:
                entries.append({"key": key, "error": json.loads(self.error_path(position).read_text())["error"]})
        index = {"images": entries}
        _atomic_write(self.out / INDEX_FILE, lambda path: Path(path).write_text(json.dumps(index, indent=1) + "\n"))
        return index
