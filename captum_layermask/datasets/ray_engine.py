"""The Ray engine of :func:`~captum_layermask.datasets.explain_dataset`: Ray Data, not a scheduler of our own.

The pending images' positions become a Ray dataset; a CPU stage (``map``) reads and segments each image (SLIC and
quickshift are CPU-bound); a pool of model actors (``map_batches`` with a callable class, the model loaded once
per actor, ``num_gpus`` each when there are GPUs) explains them and writes each result file itself, as it is
produced. Ray retries the tasks of a worker or node that dies; since a result file is written atomically under
the image's position, a retried image is written once, whole. The output folder must be on storage every node
sees (a shared filesystem on a real cluster).
"""

from __future__ import annotations

import socket
import warnings
from typing import Any, Dict, Optional

import numpy as np
import torch

from .pipeline import finish, image_segmenter, prepare
from .sources import ImageSource
from .store import ResultStore


def _prepare_row(row: Dict[str, Any], source: ImageSource, size: int, segments: str) -> Dict[str, Any]:
    """CPU stage: reads and segments one image."""
    position = int(row["position"])
    prepared = prepare(source, size, image_segmenter(segments), position)
    if "error" in prepared:
        return {
            "position": position,
            "fingerprint": prepared["fingerprint"],
            "error": prepared["error"],
            "image": None,
            "segments": None,
            "label": -1,
            "object_mask": None,
        }
    label, object_mask = prepared["label"], prepared["object_mask"]
    return {
        "position": position,
        "fingerprint": prepared["fingerprint"],
        "error": "",
        "image": prepared["image"].numpy(),
        "segments": prepared["segments"].numpy(),
        "label": -1 if label is None else label,
        "object_mask": None if object_mask is None else object_mask.numpy(),
    }


class _Explain:
    """Model actor: the worker (and its model) is built once; each batch's images are computed and written."""

    def __init__(self, worker: Any, out: str, threads: Optional[int]) -> None:
        if threads:
            torch.set_num_threads(threads)
        import ray

        if isinstance(worker, ray.ObjectRef):
            worker = ray.get(worker)
        self.worker = worker("cuda" if torch.cuda.is_available() else "cpu")
        self.store = ResultStore.reader(out)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        for i, position in enumerate(batch["position"]):
            error = str(batch["error"][i])
            if error:
                prepared: Dict[str, Any] = {"error": error}
            else:
                label, object_mask = int(batch["label"][i]), batch["object_mask"][i]
                prepared = {
                    "image": torch.from_numpy(np.asarray(batch["image"][i], dtype=np.float32)),
                    "segments": torch.from_numpy(np.asarray(batch["segments"][i])),
                    "label": None if label < 0 else label,
                    "object_mask": None
                    if object_mask is None
                    else torch.from_numpy(np.asarray(object_mask, dtype=bool)),
                }
            prepared["fingerprint"] = str(batch["fingerprint"][i])
            finish(self.store, self.worker, int(position), prepared)
        return {"position": np.asarray(batch["position"])}


class ClusterUnreachableError(ConnectionError):
    """A Ray cluster address that answers nothing (or ``"auto"`` with no cluster running)."""


def _check_address(address: str, timeout: float = 5.0) -> None:
    """Fails in seconds, not minutes, for an address where no Ray cluster listens."""
    if address == "auto":
        return  # ray.init finds it, or fails at once, below
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as error:
        raise ClusterUnreachableError(
            f"no Ray cluster answers at {address!r} ({error}); start one with `ray start --head` and pass the address it "
            "prints, or leave address out to start Ray in this process."
        ) from None


def _connect(address: Optional[str]) -> bool:
    """Connects to ``address`` (or starts Ray here without one); True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if address is not None:
        _check_address(address)
    try:
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except ConnectionError as error:
        raise ClusterUnreachableError(
            f"cannot connect to a Ray cluster at {address!r} ({str(error).splitlines()[0]}); start one with "
            "`ray start --head`, or leave address out to start Ray in this process."
        ) from None
    return True


def run_ray(run: Any, address: Optional[str], workers: Optional[int], num_gpus: float) -> None:
    """Runs the pending images through Ray Data, updating ``progress`` as results arrive. Ray started here (no
    cluster given, none connected) is shut down when the run ends.

    Raises:
        ClusterUnreachableError: if no cluster answers at ``address``.
    """
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray engine needs Ray: pip install 'captum-layermask[ray]'.") from None
    if not run.pending:
        return
    started = _connect(address)
    try:
        _run_pipeline(run, workers, num_gpus)
    finally:
        if started:
            ray.shutdown()


def _run_pipeline(run: Any, workers: Optional[int], num_gpus: float) -> None:
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one overall bar, below
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")
    if workers is None:
        resources = ray.cluster_resources()
        workers = max(1, int(resources.get("GPU", 0) // num_gpus) if num_gpus else int(resources.get("CPU", 1)))
    worker_ref = ray.put(run.worker)
    pending = run.pending
    dataset = ray.data.from_items([{"position": position} for position in pending], override_num_blocks=len(pending))
    # Reading and segmenting takes a small share of an image's time (Lime runs hundreds of forward passes): its
    # tasks ask for a tenth of a CPU and the model actors for the rest, so both stages run on every core.
    dataset = dataset.map(
        _prepare_row,
        fn_kwargs={"source": run.source, "size": run.size, "segments": run.segments},
        num_cpus=0.1,
        compute=ray.data.TaskPoolStrategy(size=workers),
    )
    # Ray Data restarts the actors of a lost node and retries their tasks (its defaults for actor pools).
    dataset = dataset.map_batches(
        _Explain,
        fn_constructor_kwargs={"worker": worker_ref, "out": str(run.store.out), "threads": run.threads},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=num_gpus,
        num_cpus=0.9,
    )
    for batch in dataset.iter_batches(batch_size=1):
        run.progress.update(len(batch["position"]))
