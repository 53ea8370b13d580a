"""Airflow UI plugin: a pipeline run's report, pictures and artifacts on its DAG-run page.

A FastAPI app mounted by the API server at /segpipe-report and an external view "Report" on every
DAG-run page of `segmentation_pipeline` (an iframe of /segpipe-report/<dag_id>/<run_id>/). The page
renders runs/<id>/report.md (its HTML is escaped: nothing from the bucket runs in the browser), shows
the pictures the run published (EDA charts, confusion matrices, best/worst panels),
draws each experiment's training curves from its log.json (loss per iteration, val mDice per
validation), and lists every object under runs/<id>/ with a link.

Authentication and authorization are Airflow's own: every route depends on
`requires_access_dag("GET", RUN)` of the configured auth manager, so a request without a valid token is
refused (401/403) and a user who may not read the DAG's runs gets 403 and no content. The run must exist
in Airflow's metadata DB for that DAG: a user of another DAG cannot reach this DAG's artifacts by
naming one of its run ids.

Airflow loads plugins from AIRFLOW__CORE__PLUGINS_FOLDER: infra/airflow_local.sh and the stack's
Airflow image point it at this folder (dags/plugins/, listed in dags/.airflowignore so the DAG processor
skips it). Airflow side only: boto3, FastAPI, markdown-it; never torch or mmseg. S3 settings come from
the connection `segpipe_s3` (else the API server's AWS_* variables), as for the stages.
"""

from __future__ import annotations

import html
import json
import mimetypes
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.models.dagrun import DagRun
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse, StreamingResponse
from jinja2 import Environment, FileSystemLoader
from markdown_it import MarkdownIt
from markupsafe import Markup

# segpipe_runners sits in the dags folder, this folder's parent (the API server does not put the dags
# folder on sys.path): one source for the run-id -> key rule, the DAG id and the S3 settings.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import segpipe_runners as runners  # noqa: E402

URL_PREFIX = "/segpipe-report"
REPORT = "report.md"  # select's report, at the run's top (tasks.store.report_key)
# Picture files shown inline; label masks, mirrors and tracking sessions are only listed.
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
NOT_PICTURES = ("labels", "work", "clearml")  # folder names (prefix match: labels_sam2 too)
# Served inline as text; everything else is a download.
TEXT_SUFFIXES = (".json", ".md", ".py", ".txt", ".jsonl", ".log")

app = FastAPI(title="segmentation_pipeline run report", docs_url=None, redoc_url=None, openapi_url=None)
ReadRuns = Depends(requires_access_dag("GET", DagAccessEntity.RUN))


@dataclass(frozen=True)
class Artifact:
    key: str  # relative to runs/<id>/
    size: int

    @property
    def parts(self) -> tuple[str, ...]:
        return PurePosixPath(self.key).parts

    @property
    def is_picture(self) -> bool:
        folders = self.parts[:-1]
        return self.key.lower().endswith(PICTURE_SUFFIXES) and not any(
            folder.startswith(NOT_PICTURES) for folder in folders
        )


def _check_run(session: Any, dag_id: str, run_id: str) -> None:
    if dag_id != runners.DAG_ID:
        raise HTTPException(404, f"the run report is for {runners.DAG_ID} runs only")
    exists = session.query(DagRun.id).filter(DagRun.dag_id == dag_id, DagRun.run_id == run_id).first()
    if exists is None:
        raise HTTPException(404, f"no run {run_id!r} of {dag_id}")


def _safe_key(key: str) -> str:
    parts = PurePosixPath(key).parts
    if not key or key.startswith("/") or any(part in ("..", ".") for part in parts):
        raise HTTPException(400, f"invalid artifact key {key!r}")
    return key


# ---------------------------------------------------------------- training curves (SVG from log.json)


def log_series(text: str) -> dict[str, list[tuple[float, float]]]:
    """mmengine's scalar log (one JSON object per line): train loss per iteration, val mDice per step."""
    series: dict[str, list[tuple[float, float]]] = {"loss": [], "mDice": []}
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int | float):
            continue
        for name in series:
            if isinstance(record.get(name), int | float):
                series[name].append((float(record["step"]), float(record[name])))
    return series


def svg_chart(title: str, points: list[tuple[float, float]], x_label: str) -> str:
    """A small line chart as inline SVG (numbers only: no text from the log reaches the markup)."""
    title = html.escape(title)
    width, height, pad = 360, 200, 36
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def at(x: float, y: float) -> str:
        px = pad + (x - x0) / (x1 - x0) * (width - 2 * pad)
        py = height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)
        return f"{px:.1f},{py:.1f}"

    coords = [at(x, y) for x, y in points]
    dots = "".join(f'<circle cx="{c.split(",")[0]}" cy="{c.split(",")[1]}" r="2"/>' for c in coords)
    return (
        f'<svg class="curve" role="img" aria-label="{title}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><title>{title}</title>'
        f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" '
        'fill="none" stroke="#ccc"/>'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{" ".join(coords)}"/>'
        f'<g fill="#1f77b4">{dots}</g>'
        f'<text x="{width / 2}" y="16" text-anchor="middle">{title}</text>'
        f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle" font-size="11">{x_label}</text>'
        f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end" font-size="11">{y1:.3g}</text>'
        f'<text x="{pad - 4}" y="{height - pad}" text-anchor="end" font-size="11">{y0:.3g}</text>'
        f'<text x="{pad}" y="{height - pad + 14}" font-size="11">{x0:g}</text>'
        f'<text x="{width - pad}" y="{height - pad + 14}" text-anchor="end" font-size="11">{x1:g}</text>'
        "</svg>"
    )


# ---------------------------------------------------------------- the page


@dataclass
class Section:
    title: str
    pictures: list[str]
    curves: list[str]


def sections(store: runners.RunObjects, artifacts: list[Artifact]) -> Iterator[Section]:
    """EDA and relabel pictures, then one section per experiment: curves, then its evaluation's."""
    by_stage: dict[tuple[str, ...], list[Artifact]] = {}
    for artifact in artifacts:
        stage = artifact.parts[:2] if artifact.parts[0] in ("train", "eval") else artifact.parts[:1]
        by_stage.setdefault(stage, []).append(artifact)
    for stage in ("eda", "relabel"):
        pictures = [a.key for a in by_stage.get((stage,), []) if a.is_picture]
        if pictures:
            yield Section(stage.upper() if stage == "eda" else stage.capitalize(), pictures, [])
    found = {stage[1] for stage in by_stage if len(stage) == 2}
    experiments = [name for name in runners.EXPERIMENTS if name in found]
    for experiment in experiments:
        trained = by_stage.get(("train", experiment), [])
        pictures = [a.key for a in trained if a.is_picture]
        curves = []
        log = f"train/{experiment}/log.json"
        if not pictures and any(a.key == log for a in trained):
            series = log_series((store.read(log) or b"").decode(errors="replace"))
            if series["loss"]:
                curves.append(svg_chart(f"{experiment} train loss", series["loss"], "iteration"))
            if series["mDice"]:
                curves.append(svg_chart(f"{experiment} val mDice", series["mDice"], "validation step"))
        pictures += [a.key for a in by_stage.get(("eval", experiment), []) if a.is_picture]
        if pictures or curves:
            yield Section(f"Experiment {experiment}", pictures, curves)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# The page's template beside this file (autoescaped: keys and text from the bucket stay text).
PAGE = Environment(loader=FileSystemLoader(Path(__file__).parent), autoescape=True).get_template(
    "segpipe_report.html"
)


def _folders(artifacts: list[Artifact]) -> list[tuple[str, list[Artifact]]]:
    grouped: dict[str, list[Artifact]] = {}
    for artifact in artifacts:
        folder = str(PurePosixPath(artifact.key).parent)
        grouped.setdefault("" if folder == "." else folder, []).append(artifact)
    return sorted(grouped.items())


# Report HTML: markdown with tables; raw HTML in the markdown is escaped, never rendered.
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")
# The page loads only its own images; no script at all.
PAGE_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'self'"


@app.get("/{dag_id}/{run_id}/", response_class=HTMLResponse, dependencies=[ReadRuns])
def run_report(dag_id: str, run_id: str, session: SessionDep) -> HTMLResponse:
    _check_run(session, dag_id, run_id)
    store = runners.RunObjects(run_id)
    artifacts = [Artifact(key, size) for key, size in store.list()]
    text = store.read(REPORT)
    report = _MARKDOWN.render(text.decode(errors="replace")) if text is not None else None
    console = os.environ.get("SEGPIPE_S3_CONSOLE_URL")
    page = PAGE.render(
        run_id=run_id,
        bucket=store.bucket,
        prefix=store.prefix,
        console=f"{console.rstrip('/')}/browser/{store.bucket}/{store.prefix}" if console else None,
        report=Markup(report) if report else None,
        sections=[
            Section(s.title, s.pictures, [Markup(c) for c in s.curves]) for s in sections(store, artifacts)
        ],
        artifacts=artifacts,
        folders=_folders(artifacts),
        size=_size,
    )
    return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP})


@app.get("/{dag_id}/{run_id}/artifacts/{key:path}", dependencies=[ReadRuns])
def artifact(dag_id: str, run_id: str, key: str, session: SessionDep) -> StreamingResponse:
    _check_run(session, dag_id, run_id)
    obj = runners.RunObjects(run_id).open(_safe_key(key))
    if obj is None:
        raise HTTPException(404, f"no artifact {key!r} in this run")
    name = PurePosixPath(key).name
    if key.lower().endswith(PICTURE_SUFFIXES):
        media, disposition = mimetypes.guess_type(name)[0] or "application/octet-stream", "inline"
    elif key.lower().endswith(TEXT_SUFFIXES):
        media, disposition = "text/plain; charset=utf-8", "inline"
    else:
        media, disposition = "application/octet-stream", "attachment"
    headers = {
        "Content-Disposition": f'{disposition}; filename="{name}"',
        "Content-Length": str(obj["ContentLength"]),
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
    }
    return StreamingResponse(obj["Body"].iter_chunks(1024 * 1024), media_type=media, headers=headers)


class SegpipeReportPlugin(AirflowPlugin):
    name = "segpipe_report"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "segmentation_pipeline run report"}]
    external_views = [
        {
            "name": "Report",
            # Relative (no leading slash): resolved against the UI's base URL.
            "href": f"{URL_PREFIX.lstrip('/')}/{{DAG_ID}}/{{RUN_ID}}/",
            "destination": "dag_run",
            "url_route": "segpipe-report",
        }
    ]
