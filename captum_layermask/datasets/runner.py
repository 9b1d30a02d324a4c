"""``explain_dataset``: explanations of a whole image set, in-process or on a Ray cluster, resumable."""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..evaluation.images import UnreadableImageError
from ..evaluation.normalization import IMAGENET_MEAN, IMAGENET_STD
from ..evaluation.segmentation import get_segmenter, segment_images
from .explain import ImageExplainer, Settings, per_eval_for_budget
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


@dataclass
class DatasetExplanations(DatasetResults):
    """The results of :func:`explain_dataset`, read from its output folder."""

    def record(self, key: str) -> Dict[str, np.ndarray]:
        """One image's record: ``segments`` ``(H, W)``, ``target``, ``predicted``, ``label`` (-1 if none) and,
        per masking, ``scores_<masking>`` ``(S,)`` (or ``map_<masking>`` ``(H, W)`` for occlusion)."""
        return ResultStore.reader(self.out).read(self.keys.index(key))

    def attribution(self, key: str, masking: str) -> torch.Tensor:
        """The per-pixel attribution map ``(H, W)``, rebuilt exactly from the segments and their scores."""
        record = self.record(key)
        if f"map_{masking}" in record:
            return torch.from_numpy(record[f"map_{masking}"])
        return torch.from_numpy(record[f"scores_{masking}"][record["segments"]])


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

    worker: Callable[[str], Any]  # device -> an ImageExplainer/ImageEvaluator (picklable, for Ray's actors)
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


def explain_dataset(
    model: nn.Module,
    images: ImagesSpec,
    out: Union[str, Path],
    *,
    method: str = "lime",
    maskings: Sequence[str] = ("layer", "grey"),
    segments: str = "slic",
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    target: Optional[int] = None,
    samples: int = 500,
    perturbations_per_eval: Optional[int] = None,
    memory_budget: Optional[int] = None,
    seed: int = 0,
    engine: str = "local",
    address: Optional[str] = None,
    workers: Optional[int] = None,
    num_gpus: float = 0.0,
    threads: Optional[int] = None,
    show_progress: bool = True,
) -> DatasetExplanations:
    """Explains every image of a dataset under each masking, writing each image's result as it completes.

    Each image is explained as ``layermask explain`` explains one (Captum's Lime, KernelShap, FeatureAblation or
    Occlusion; ``LayerMask()`` on the layer-masked model for ``"layer"``, a constant baseline on the plain model
    for ``"black"``/``"grey"``), with samples seeded by ``seed`` and the image's position. Results are per-segment
    scores (the segments and scores give the attribution map exactly). A run interrupted at any point and
    started again with the same arguments computes only the missing images, and its output is the same as an
    uninterrupted run's; other arguments against the same ``out`` are refused.

    Args:
        model (nn.Module): the plain classifier, taking images normalised with ``mean``/``std``.
        images: an image folder (``<folder>/<class>/<image>``, labels from the sorted class names, or a flat
            folder), a list of image files, or a ``torch.utils.data.Dataset`` of ``(3, H, W)`` images in [0, 1]
            (or ``(image, label)`` pairs).
        out: the output folder (see :mod:`captum_layermask.datasets.store`).
        method: ``"lime"``, ``"kernelshap"``, ``"ablation"`` or ``"occlusion"``.
        maskings: any of ``"layer"``, ``"grey"``, ``"black"``.
        segments: ``"slic"``, ``"quickshift"`` or ``"patches"`` (16x16).
        size: files are center-cropped and resized to ``size x size``.
        target: the class to explain (default: each image's predicted class).
        samples: Lime/KernelShap samples per image (the paper: 500).
        perturbations_per_eval: samples per forward pass; by default chosen from ``memory_budget``. Halved
            (and kept halved) after an out-of-memory error instead of failing the image.
        memory_budget: bytes one forward pass may use (default: 2 GiB).
        engine: ``"local"`` (this process) or ``"ray"`` (Ray Data: CPU stages read and segment, model actors
            explain; ``pip install captum-layermask[ray]``).
        address: an existing Ray cluster (``"auto"``, ``"ray://host:10001"``); default: a local Ray instance.
        workers: model actors for the Ray engine (default: one per CPU, or per GPU with ``num_gpus``).
        num_gpus: GPUs per model actor (Ray engine); the local engine uses CUDA when available.
        threads: torch threads per worker (default: torch's); equal thread counts give bitwise-equal results
            across engines.
        show_progress: one progress bar over the images.

    Returns:
        :class:`DatasetExplanations`.

    Raises:
        OutputMismatchError: if ``out`` holds a run with other arguments, or other files.
    """
    settings = Settings(method, tuple(maskings), segments, size, tuple(mean), tuple(std), target, samples, seed)
    settings.check()
    device = "cuda" if torch.cuda.is_available() and engine == "local" else "cpu"
    per_eval = perturbations_per_eval or per_eval_for_budget(model, settings, memory_budget or 2 * 2**30, device)
    source, errors = run_dataset(
        functools.partial(ImageExplainer, model, settings, per_eval),
        model,
        images,
        out,
        settings,
        EngineOptions(engine, address, workers, num_gpus, threads, show_progress),
        "explaining",
    )
    return DatasetExplanations(Path(out), source.keys, errors)


def image_segmenter(name: str) -> Any:
    """The segmenter of a run, for images in [0, 1]."""
    return get_segmenter(name, mean=(0, 0, 0), std=(1, 1, 1))


def run_dataset(
    worker: Callable[[str], Any],
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


def prepare(source: ImageSource, size: int, segmenter: Any, position: int) -> Dict[str, Any]:
    """Reads and segments one image (the CPU-bound part): ``{"image", "segments", "label", "object_mask",
    "fingerprint"}`` or ``{"error", "fingerprint"}``."""
    fingerprint = source.fingerprint(position) if source.files is not None else None  # before reading the file
    try:
        loaded = source.load(position, size)
    except UnreadableImageError as error:
        return {"error": str(error), "fingerprint": fingerprint or source.fingerprint(position)}
    image, label, object_mask = loaded
    ids = segment_images(image[None], segmenter)[0]
    fingerprint = fingerprint or source.fingerprint(position, loaded)
    return {"image": image, "segments": ids, "label": label, "object_mask": object_mask, "fingerprint": fingerprint}


def finish(store: ResultStore, worker: Any, position: int, prepared: Dict[str, Any]) -> None:
    """Computes a prepared image's record with ``worker`` and writes it (or records why it could not be read)."""
    if "error" in prepared:
        store.write_failure(position, prepared["error"], prepared["fingerprint"])
        return
    record = worker.compute(
        position, prepared["image"], prepared["segments"], prepared["label"], prepared.get("object_mask")
    )
    store.write(position, record, prepared["fingerprint"])


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
