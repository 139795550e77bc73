"""Each model's training report: ``GET /models/{name}/report`` (an HTML page, or JSON) and the PNGs it shows.

The report is that of the version serving by default, read from its verified manifest; every image is read
from the artifact folder and checked against the manifest's sha256 before it is sent. It shows what
``/models/{name}`` shows to every caller (metrics, how they were measured, the quality gate) and sits under
the same key rule: ``/models`` and everything below it are operations paths (``service.app.OPS_PATHS``).
"""

from html import escape
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from service.api.routes import VERSION_HEADER, ErrorBody
from service.artifacts import Artifact, ArtifactError, QualityGate
from service.errors import ModelUnavailableError, NotFoundError, ServiceError
from service.runtime.registry import Registry

# The page runs nothing and loads nothing but its own images.
CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"
STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:75em}table{border-collapse:collapse;margin:.3em 0}"
    "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}img{max-width:100%}"
)
# The images' URL does not name the version, and the default version can change: caches keep an image
# but ask again each time (ETag: the manifest's sha256, so an unchanged image costs a 304).
IMAGE_CACHE = "private, no-cache"


class Report(BaseModel):
    name: str
    version: str = Field(description="The version serving by default, whose report this is.")
    created_at: str
    quick: bool = Field(description="A --quick artifact: trained on a data slice as a smoke test.")
    metrics_method: str
    metrics: dict[str, Any]
    gate: QualityGate | None = Field(description="Training's quality gate; null: trained before quality gates.")
    images: dict[str, str] = Field(description="Each PNG of the artifact: its file name and URL path.")


def images(artifact: Artifact) -> list[str]:
    return sorted(name for name in artifact.manifest.files if name.endswith(".png"))


def cell(value: Any) -> str:
    """A metric as HTML: a dict of like rows (CV candidates) as one grid, another dict as a nested table, a
    list as its items, anything else as escaped text."""
    rows = list(value.values()) if isinstance(value, dict) else []
    if rows and all(isinstance(r, dict) and r and not any(isinstance(v, dict) for v in r.values()) for r in rows):
        columns = list(dict.fromkeys(k for r in rows for k in r))
        head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
        body = "".join(
            f"<tr><th>{escape(str(k))}</th>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in columns) + "</tr>"
            for k, r in value.items()
        )
        return f"<table><tr><th></th>{head}</tr>{body}</table>"
    if isinstance(value, dict):
        pairs = "".join(f"<tr><th>{escape(str(k))}</th><td>{cell(v)}</td></tr>" for k, v in value.items())
        return f"<table>{pairs}</table>"
    if isinstance(value, list):
        return ", ".join(cell(v) for v in value)
    return escape(str(value))


def gate_html(report: Report) -> str:
    gate = report.gate
    if gate is None:
        return f"<p>Version {escape(report.version)} was trained before quality gates: there is no verdict.</p>"
    better = "higher" if gate.higher_is_better else "lower"
    rows: list[tuple[str, Any]] = [("this version", gate.score)]
    rows += [(f"baseline: {name}", score) for name, score in gate.baselines.items()]
    rows.append(("floor", gate.floor))
    if gate.committed:
        rows.append((f"committed version {gate.committed.get('version')}", gate.committed.get("score")))
    verdict = "passed" if gate.passed else "failed: " + "; ".join(gate.reasons)
    if gate.forced:
        verdict += " (published anyway with --force)"
    body = "".join(f"<tr><th>{escape(label)}</th><td>{cell(score)}</td></tr>" for label, score in rows)
    return (
        f"<table><tr><th>{escape(gate.metric)} ({better} is better)</th><th>score</th></tr>{body}"
        f"<tr><th>verdict</th><td>{escape(verdict)}</td></tr></table>"
    )


def page(report: Report) -> str:
    title = escape(f"{report.name} {report.version}: training report")
    figures = "".join(  # relative links: right behind a proxy that serves the app under a prefix too
        f'<figure><img src="report/{escape(quote(name, safe=""))}" alt="{escape(name)}">'
        f"<figcaption>{escape(name)}</figcaption></figure>"
        for name in report.images
    )
    quick = "yes: trained on a data slice as a smoke test, not for serving" if report.quick else "no"
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{STYLE}</style></head><body><h1>{title}</h1>"
        f"<table><tr><th>model</th><td>{escape(report.name)}</td></tr>"
        f"<tr><th>version</th><td>{escape(report.version)}</td></tr>"
        f"<tr><th>created at</th><td>{escape(report.created_at)}</td></tr>"
        f"<tr><th>quick</th><td>{quick}</td></tr></table>"
        f"<h2>Metrics</h2><p>{escape(report.metrics_method)}</p>{cell(report.metrics)}"
        f"<h2>Quality gate</h2>{gate_html(report)}"
        f"<h2>Figures</h2>{figures or '<p>This version has no figures.</p>'}"
        f'<p><a href="report?format=json">This report as JSON</a></p></body></html>'
    )


def reports_router(registry: Registry) -> APIRouter:
    router = APIRouter(tags=["operations"])
    # Examples in the schema: the served models, and a figure every training script draws (so that generated
    # requests, schemathesis's among them, reach an image and not only 404s). Local types, so this module
    # does without `from __future__ import annotations` (FastAPI resolves string annotations in the module).
    Name = Annotated[str, Path(description="A served model's name.", examples=list(registry.entries))]
    File = Annotated[str, Path(description="A PNG the manifest lists.", examples=["learning_curves.png"])]

    def serving(name: str) -> Artifact:
        """The artifact of the version serving by default: 404 for an unknown model, 503 when none serves."""
        entry = registry.entry(name)
        if entry.artifact is None:
            raise ModelUnavailableError(f"model '{entry.name}' is not available: {entry.reason or entry.state}")
        return entry.artifact

    @router.get(
        "/models/{name}/report",
        summary="The training report of a model's serving version",
        description="An HTML page (metrics, quality gate, the training figures); `?format=json` gives the same "
        "content as JSON. It is the report of the version serving by default (named in X-Model-Version).",
        response_model=Report,
        operation_id="get_model_report",
        responses={
            200: {"content": {"text/html": {"schema": {"type": "string"}}}},
            404: {"model": ErrorBody, "description": "No model has that name."},
            503: {"model": ErrorBody, "description": "The model is not serving (the reason says why)."},
        },
    )
    async def report(
        name: Name,
        response: Response,
        format: Literal["html", "json"] = Query("html", description="html (the default) or json."),
    ) -> Any:
        artifact = serving(name)
        m = artifact.manifest
        content = Report(
            **m.model_dump(include={"name", "version", "created_at", "quick", "metrics_method", "metrics", "gate"}),
            images={file: f"/models/{name}/report/{quote(file, safe='')}" for file in images(artifact)},
        )
        response.headers[VERSION_HEADER] = m.version
        if format == "json":
            return content
        return HTMLResponse(page(content), headers={"Content-Security-Policy": CSP, VERSION_HEADER: m.version})

    @router.get(
        "/models/{name}/report/{file}",
        summary="One figure of a model's training report (PNG)",
        description="A PNG that the serving version's manifest lists, checked against its sha256 before it is sent.",
        response_class=Response,
        operation_id="get_model_report_file",
        responses={
            200: {"content": {"image/png": {}}, "description": "The image."},
            304: {"description": "Not modified (If-None-Match named its ETag)."},
            404: {"model": ErrorBody, "description": "No model, or no image of that name (the message lists them)."},
            503: {"model": ErrorBody, "description": "The model is not serving, or the file fails its check."},
        },
    )
    def report_file(name: Name, file: File, request: Request) -> Response:  # sync: FastAPI reads on a thread
        artifact = serving(name)
        m = artifact.manifest
        if file not in images(artifact):
            raise NotFoundError(
                f"'{file[:100]}' is not an image of {m.name} version {m.version}; "
                f"its images: {', '.join(images(artifact)) or 'none'}"
            )
        headers = {"Cache-Control": IMAGE_CACHE, "ETag": f'"{m.files[file]}"', VERSION_HEADER: m.version}
        if request.headers.get("if-none-match") == headers["ETag"]:
            return Response(status_code=304, headers=headers)
        try:
            data = artifact.read(file)  # refuses bytes that do not match the manifest's sha256
        except ArtifactError as exc:
            # 503, not 409: nothing in the request conflicts with anything (409 asks the client to resolve a
            # conflict it caused); the server cannot serve an intact copy until the artifact is restored.
            # The message names files relative to the artifacts folder, never a server path.
            raise ServiceError(f"cannot send {file}: {exc}", status=503) from None
        return Response(data, media_type="image/png", headers=headers)

    return router
