"""The ``layermask view`` web app: a small FastAPI application and one static page (no build step, no
framework on the page). Every route reads what it serves from the session and the run folders given at start-up,
by index or by the id the server gave; no path from a request reaches the file system, and uploads are decoded
as images only (:class:`~captum_layermask.view.session.ImageLibrary`)."""

import base64
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from fastapi import FastAPI, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from .runs import read_run, run_html
from .session import EXPLAINED, MASKINGS, MAX_UPLOAD_BYTES, SEGMENTERS, ViewError, ViewSession, png

PAGE = Path(__file__).with_name("index.html")


class Segmentation(BaseModel):
    """A request about one image's segments."""

    key: str
    segmenter: str = "patches"


class Removal(Segmentation):
    """Predictions with some segments removed."""

    removed: List[int] = []


class Explanation(Segmentation):
    """Lime or KernelShap under each masking, of a target chosen by a click (dense models) or the top class."""

    method: str = "lime"
    samples: int = 200
    target: Optional[Dict[str, Any]] = None


class Click(BaseModel):
    """A click on the image at pixel ``(x, y)`` of the model's input."""

    key: str
    x: int
    y: int


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def create_app(session: ViewSession, runs: Sequence[Path] = (), title: str = "layermask view") -> FastAPI:
    """The FastAPI application of a view session and the run folders it can open."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    run_folders = [Path(folder) for folder in runs]

    @app.middleware("http")
    async def limit_uploads(request: Request, call_next: Any) -> Any:
        """Refuses an upload larger than the limit before its body is read (and spooled to disk)."""
        if request.url.path == "/api/upload":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit() or int(length) > MAX_UPLOAD_BYTES + 2**16:
                limit = MAX_UPLOAD_BYTES // 2**20
                return JSONResponse({"error": f"uploads must state their size and stay under {limit} MB."}, 413)
        return await call_next(request)

    @app.exception_handler(ViewError)
    async def refuse(request: Request, error: ViewError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=400)

    @app.exception_handler(Exception)
    async def fail(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": f"{type(error).__name__}: {error}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text().replace("{{title}}", title)

    @app.get("/api/info")
    def info() -> Dict[str, Any]:
        return {
            "title": title,
            "task": session.task,
            "images": list(session.library.images),
            "segmenters": list(SEGMENTERS),
            "maskings": list(MASKINGS),
            "explained": list(EXPLAINED),
            "runs": [folder.name for folder in run_folders],
        }

    @app.get("/api/image")
    def image(key: str) -> Response:
        pixels = session.library.get(key).permute(1, 2, 0).numpy()
        return Response(png(pixels), media_type="image/png")

    @app.post("/api/upload")
    async def upload(file: UploadFile) -> Dict[str, str]:
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        return {"key": session.library.add(file.filename or "upload", data)}

    @app.post("/api/segments")
    def segments(request: Segmentation) -> Dict[str, Any]:
        ids = session.segments(request.key, request.segmenter)
        return {"height": ids.shape[0], "width": ids.shape[1], "ids": ids.flatten().tolist()}

    @app.post("/api/predict")
    def predict(request: Removal) -> Dict[str, Any]:
        results = session.predict(request.key, request.segmenter, request.removed)
        return {name: {"top": r["top"], "image": _data_url(r["image"])} for name, r in results.items()}

    @app.post("/api/explain")
    def explain(request: Explanation) -> Dict[str, Any]:
        results = session.explain(request.key, request.segmenter, request.method, request.samples, request.target)
        maps = {name: {"image": _data_url(r["image"]), "scores": r["scores"]} for name, r in results["maps"].items()}
        return {"target": results["target"], "maps": maps}

    @app.post("/api/choose")
    def choose(request: Click) -> Dict[str, Any]:
        return session.choose(request.key, request.x, request.y)

    @app.get("/api/runs/{index}", response_class=HTMLResponse)
    def run(index: int) -> str:
        if not 0 <= index < len(run_folders):
            raise ViewError(f"no run {index}; the view was started with {len(run_folders)} run folder(s).")
        try:
            return run_html(read_run(run_folders[index]))
        except FileNotFoundError as error:
            raise ViewError(str(error)) from None

    return app
