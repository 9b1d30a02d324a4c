"""``layermask view``: a local web app where removing a region shows what each fill does to the model, and
``layermask report``: a finished dataset run as one self-contained HTML page.

The web stack is an optional extra (``pip install "captum-layermask[view]"``: FastAPI and uvicorn);
:mod:`~captum_layermask.view.session` and :mod:`~captum_layermask.view.runs` need neither.
"""

from __future__ import annotations

import io
import socket
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..weights import Classifier
from .runs import read_run, write_report
from .session import ImageLibrary, ViewError, ViewSession

__all__ = ["ImageLibrary", "ViewError", "ViewSession", "demo_library", "read_run", "serve", "start", "write_report"]


def demo_library(size: int, scenes: int = 12, seed: int = 5) -> ImageLibrary:
    """The bundled demo scene and ``scenes`` more rendered from ``seed`` (one or two shapes each)."""
    import torchvision

    from ..demo import shapes
    from ..demo.model import SCENE

    library = ImageLibrary(size)
    library.add("demo_scene.png", SCENE.read_bytes())
    if scenes == 0:
        return library
    rendered = shapes.segmentation_scenes(max(scenes, 2), torch.Generator().manual_seed(seed))
    for index, image in enumerate(rendered.images[:scenes]):
        buffer = io.BytesIO()
        torchvision.utils.save_image(image, buffer, format="png")
        names = [shapes.CLASSES[int(label)] for label in rendered.labels[index].unique()]
        library.add(f"scene{index:02d}_{'_'.join(names)}.png", buffer.getvalue())
    return library


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at the moment."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _server(model: Classifier, library: ImageLibrary, runs: Sequence[Path], host: str, port: int, task: str) -> Any:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as error:
        raise ViewError(
            f"layermask view needs the [view] extra ({error.name} is missing): pip install 'captum-layermask[view]'."
        ) from None
    from .dense import session_for

    app = create_app(session_for(model, library, task), runs)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))


def start(
    model: Classifier,
    library: ImageLibrary,
    runs: Sequence[Path] = (),
    host: str = "127.0.0.1",
    port: Optional[int] = None,
    task: str = "classification",
) -> Any:
    """Starts the app in a background thread (for tests and notebooks); returns the server, whose ``url``
    attribute is set and whose ``should_exit = True`` stops it."""
    port = port or free_port(host)
    server = _server(model, library, runs, host, port, task)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        threading.Event().wait(0.05)
    server.url = f"http://{host}:{port}/"
    return server


def serve(
    model: Classifier,
    library: ImageLibrary,
    runs: Sequence[Path] = (),
    host: str = "127.0.0.1",
    port: int = 8765,
    open_browser: bool = True,
    task: str = "classification",
) -> None:
    """Runs the app until interrupted (``layermask view``), opening it in the default browser."""
    import webbrowser

    server = _server(model, library, runs, host, port, task)
    url = f"http://{host}:{port}/"
    print(f"layermask view: {url} (Ctrl+C stops it)")
    if open_browser:
        threading.Timer(1.0, webbrowser.open, (url,)).start()
    server.run()
