"""A finished dataset run as the view shows it (``explain_dataset`` / ``evaluate_dataset`` / ``layermask evaluate``
output folders): per image the maps of each masking, the run's figures and tables, its arguments; and the same
as one self-contained HTML page (``layermask report``)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from .session import heatmap, png

MAX_GALLERY = 120


def _maps(record: Dict[str, np.ndarray]) -> Dict[str, bytes]:
    maps = {}
    for name, values in record.items():
        if name.startswith("scores_") and "segments" in record:
            maps[name.removeprefix("scores_")] = png(heatmap(values[record["segments"]]))
        elif name.startswith("map_"):
            maps[name.removeprefix("map_")] = png(heatmap(values))
    return maps


def read_run(folder: Path) -> Dict[str, Any]:
    """What a run folder holds: ``arguments`` (``run.json``), ``images`` (per image its key, target and maps per
    masking as PNG bytes, at most ``MAX_GALLERY``), ``figures`` (name -> PNG bytes) and ``tables`` (name ->
    markdown text). Only files inside ``folder`` are read, and ``.npz`` files without pickles.

    Raises:
        FileNotFoundError: if ``folder`` holds no run.
    """
    folder = Path(folder)
    arguments = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    index = json.loads((folder / "index.json").read_text()) if (folder / "index.json").is_file() else {}
    keys = [entry.get("key", "") for entry in index.get("images", [])]
    images: List[Dict[str, Any]] = []
    for position, path in enumerate(sorted((folder / "images").glob("*.npz"))[:MAX_GALLERY]):
        with np.load(path, allow_pickle=False) as data:
            record = {name: data[name] for name in data.files if name != "fingerprint"}
        number = int(path.stem) if path.stem.isdigit() else position
        key = keys[number] if number < len(keys) else path.stem
        target = record.get("target")
        images.append({"key": str(key), "target": None if target is None else int(target), "maps": _maps(record)})
    figures = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))[:40]}
    tables = {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*.md"))[:20]}
    if not (arguments or images or figures or tables):
        raise FileNotFoundError(f"{folder} holds no run (no run.json, images/*.npz, figures or tables).")
    return {"name": folder.name, "arguments": arguments, "images": images, "figures": figures, "tables": tables}


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def markdown_tables(text: str) -> str:
    """Markdown with pipe tables as HTML: tables become ``<table>``, headings ``<h3>``, other lines paragraphs."""
    out: List[str] = []
    rows: List[List[str]] = []

    def flush() -> None:
        if rows:
            head, *body = [row for row in rows if not set("".join(row)) <= set("-: ")]
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
            out.append("</table>")
            rows.clear()

    for line in text.splitlines():
        if line.strip().startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        flush()
        if line.startswith("#"):
            out.append(f"<h3>{html.escape(line.lstrip('#').strip())}</h3>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)


def run_html(run: Dict[str, Any]) -> str:
    """The body of a run's page: its arguments, tables, figures and gallery (images inlined)."""
    parts = [f"<h2>{html.escape(run['name'])}</h2>"]
    if run["arguments"]:
        parts.append(f"<pre class='arguments'>{html.escape(json.dumps(run['arguments'], indent=1))}</pre>")
    for name, text in run["tables"].items():
        parts.append(f"<section class='table'><h3>{html.escape(name)}</h3>{markdown_tables(text)}</section>")
    for name, data in run["figures"].items():
        parts.append(
            f"<figure><img src='{_data_url(data)}' alt='{html.escape(name)}'><figcaption>{html.escape(name)}</figcaption></figure>"
        )
    if run["images"]:
        maskings = sorted({m for image in run["images"] for m in image["maps"]})
        header = "".join(f"<th>{html.escape(m)}</th>" for m in maskings)
        parts.append(f"<table class='gallery'><tr><th>image</th><th>target</th>{header}</tr>")
        for image in run["images"]:
            cells = "".join(
                f"<td><img src='{_data_url(image['maps'][m])}' alt='{html.escape(m)}'></td>"
                if m in image["maps"]
                else "<td></td>"
                for m in maskings
            )
            target = "" if image["target"] is None else image["target"]
            parts.append(f"<tr><td>{html.escape(image['key'])}</td><td>{target}</td>{cells}</tr>")
        parts.append("</table>")
    return "\n".join(parts)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
.gallery img { width: 96px; height: 96px; image-rendering: pixelated; }
figure img { max-width: 720px; }
pre.arguments { background: #f5f5f5; padding: 0.6em; max-height: 12em; overflow: auto; }
"""


def write_report(folder: Path, out: Path) -> Path:
    """Writes a run's page as one self-contained HTML file (every image inlined, no script)."""
    run = read_run(folder)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>layermask report: {html.escape(run['name'])}</title><style>{STYLE}</style></head>"
        f"<body><h1>layermask report</h1>{run_html(run)}</body></html>\n"
    )
    out = Path(out)
    out.write_text(page)
    return out
