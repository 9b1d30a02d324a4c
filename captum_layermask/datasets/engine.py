"""A dataset run, whichever engine computes it: the images not yet finished in the output folder go through
:mod:`~captum_layermask.datasets.pipeline` in this process (the local engine) or on a Ray cluster
(:mod:`~captum_layermask.datasets.ray_engine`); the front doors are
:func:`~captum_layermask.datasets.explain_dataset` and :func:`~captum_layermask.datasets.evaluate_dataset`."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .pipeline import ImageWorker, finish, image_segmenter, prepare
from .sources import ImageSource, ImagesSpec, image_source
from .store import ResultStore

ENGINES = ("local", "ray")


@dataclass
class DatasetResults:
    """What a dataset run leaves: its output folder, the images' keys in input order, and ``errors``
    (``{key: message}`` for images that could not be read, skipped)."""

    out: Path
    keys: List[str]
    errors: Dict[str, str]

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class EngineOptions:
    """Where a run computes: ``engine``, and for Ray the cluster ``address``, actors and GPUs per actor."""

    engine: str = "local"
    address: Optional[str] = None
    workers: Optional[int] = None
    num_gpus: float = 0.0
    threads: Optional[int] = None
    show_progress: bool = True


@dataclass
class Run:
    """What an engine needs: how to build a worker, the images, where results go and what is left to do."""

    worker: Callable[[str], ImageWorker]  # device -> the worker (picklable, for Ray's actors)
    source: ImageSource
    size: int
    segments: str
    store: ResultStore
    pending: List[int]
    threads: Optional[int]
    progress: Any


def _model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's class and state: a different model against an existing output is refused."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_dataset(
    worker: Callable[[str], ImageWorker],
    model: nn.Module,
    images: ImagesSpec,
    out: Union[str, Path],
    settings: Any,
    options: EngineOptions,
    description: str,
) -> Tuple[ImageSource, Dict[str, str]]:
    """Runs ``worker(device)`` on every image not yet finished in ``out`` with the chosen engine, then writes the
    index; returns the source and ``{key: error}`` of the images that could not be read."""
    if options.engine not in ENGINES:
        raise ValueError(f"unknown engine {options.engine!r}; use 'local' or 'ray'.")
    if options.address and options.engine != "ray":
        raise ValueError(f"address={options.address!r} names a Ray cluster: pass engine='ray' with it.")
    source = image_source(images)
    _check_outside(Path(out), source)
    arguments = {
        "kind": description,
        **{key: list(value) if isinstance(value, tuple) else value for key, value in asdict(settings).items()},
        "model": _model_fingerprint(model),
        "images": hashlib.sha256(json.dumps(source.keys).encode()).hexdigest(),
        "object_masks": source.object_masks is not None,
    }
    store = ResultStore(Path(out), arguments)
    finished = _unchanged(store, source)
    pending = [position for position in range(len(source.keys)) if position not in finished]
    progress = _progress(len(source.keys), len(source.keys) - len(pending), options.show_progress, description)
    run = Run(worker, source, settings.size, settings.segments, store, pending, options.threads, progress)
    try:
        if options.engine == "local":
            _run_local(run, "cuda" if torch.cuda.is_available() else "cpu")
        else:
            from .ray_engine import run_ray

            run_ray(run, options.address, options.workers, options.num_gpus)
    finally:
        progress.close()
    index = store.write_index(source.keys)
    errors = {entry["key"]: entry["error"] for entry in index["images"] if "error" in entry}
    for key, message in errors.items():
        print(f"skipped {key}: {message}", file=sys.stderr)
    return source, errors


def _check_outside(out: Path, source: ImageSource) -> None:
    """Refuses an output folder inside the folder of the images or of their object masks (a later listing of
    that folder would take the results for images, or for a class)."""
    for folder in source.folders:
        if out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents:
            raise ValueError(f"the output folder {out} is inside the image folder {folder}; give a folder outside it.")


def _unchanged(store: ResultStore, source: ImageSource) -> set:
    """The finished positions whose image is the one their result was computed from; the results of images
    changed since (another file under the same name, another dataset item) are removed, to be computed again."""
    finished = store.finished()
    changed = [position for position in sorted(finished) if store.fingerprint(position) != source.fingerprint(position)]
    for position in changed:
        store.discard(position)
    if changed:
        print(
            f"{len(changed)} image(s) changed since their results were written: computing them again", file=sys.stderr
        )
    return finished - set(changed)


def _progress(total: int, done: int, show: bool, description: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="image", desc=description, disable=not show, dynamic_ncols=True)


def _run_local(run: Run, device: str) -> None:
    previous = torch.get_num_threads()
    if run.threads:
        torch.set_num_threads(run.threads)
    try:
        worker, segmenter = run.worker(device), image_segmenter(run.segments)
        for position in run.pending:
            finish(run.store, worker, position, prepare(run.source, run.size, segmenter, position))
            run.progress.update(1)
    finally:
        torch.set_num_threads(previous)
