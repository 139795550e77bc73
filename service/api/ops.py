"""Operations routes: liveness, readiness, model metadata and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from service.api.routes import ErrorBody
from service.runtime.registry import ModelEntry, Registry


class ModelInfo(BaseModel):
    name: str
    state: str = Field(description="ready, loading or failed.")
    reason: str | None = Field(None, description="Why the model is not ready.")
    platform: str = "pytorch"
    device: str
    version: str | None = Field(
        None, description="The version answering by default (X-Model-Version names the one that answered each request)."
    )
    versions: list[str] = Field(
        [], description="Versions loaded in this process; POST /{model}/versions/{v} calls one."
    )
    split: dict[str, int] = Field({}, description="The weighted split between versions in force (a canary), if any.")
    created_at: str | None = None
    git_commit: str | None = Field(None, description="The training code's commit (for callers with a key).")
    git_tree: str | None = Field(None, description="Whether the training code had uncommitted changes (idem).")
    quick: bool = Field(False, description="A --quick artifact: trained on a data slice as a smoke test.")
    metrics: dict[str, Any] = {}
    metrics_method: str | None = None
    report: str = Field(description="The training report of the version answering by default (HTML; ?format=json).")
    hyperparameters: dict[str, Any] = Field({}, description="For callers with a key (or SERVE_PUBLIC_MODEL_DETAILS).")
    libraries: dict[str, str] = Field({}, description="Library versions of training (idem).")
    batching: dict[str, Any] = {}
    workers: int = Field(1, description="Worker processes serving it, each with its own batcher (SERVE_WORKERS).")
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]


class Readiness(BaseModel):
    status: str = Field(description="'ready' when every model is loaded.")
    models: dict[str, str] = Field(description="Each model's state, with the reason when it failed.")
    notes: dict[str, str] = Field(
        {},
        description="Per model, newer versions on disk not made the default (--quick, or failed the quality gate).",
    )


def ops_router(registry: Registry) -> APIRouter:
    """Operations routes. /healthz is always open (liveness probes send no key); the rest need a key when keys
    are set, unless SERVE_PUBLIC_OPS (``app.gate``)."""
    router = APIRouter(tags=["operations"])
    # The schemas are fixed once the app is built: generate them once, not on every /models call.
    schemas = {
        name: (
            dict(e.Input.model_json_schema(), examples=[e.predictor.example]),
            e.predictor.Output.model_json_schema(),
        )
        for name, e in registry.entries.items()
    }

    def info(entry: ModelEntry, request: Request) -> ModelInfo:
        """What a client needs (schemas, version, quality); the build details (library versions, the training
        commit, hyperparameters) only for a caller with a key, or for all with SERVE_PUBLIC_MODEL_DETAILS."""
        m, settings = entry.manifest, registry.settings
        detailed = m if m is not None and (settings.public_model_details or request.state.authenticated) else None
        return ModelInfo(
            name=entry.name,
            state=entry.state,
            reason=entry.reason,
            device=str(registry.device),
            version=m.version if m else None,
            created_at=m.created_at if m else None,
            quick=bool(m and m.quick),
            versions=entry.ready_versions(),
            split=entry.split,
            git_commit=detailed.git_commit if detailed else None,
            git_tree=detailed.git_tree if detailed else None,
            metrics=m.metrics if m else {},
            metrics_method=m.metrics_method if m else None,
            report=f"/models/{entry.name}/report",
            hyperparameters=detailed.hyperparameters if detailed else {},
            libraries=detailed.libraries if detailed else {},
            batching=dict(
                entry.batcher.policy.model_dump(), threads=entry.batcher.threads, continuous=entry.batcher.continuous
            )
            if entry.batcher
            else registry.settings.policy(entry.name).model_dump(),
            input_schema=schemas[entry.name][0],
            output_schema=schemas[entry.name][1],
            workers=settings.workers or 1,
        )

    @router.get("/healthz", summary="Liveness: the process is up", operation_id="healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)  # probes that send HEAD

    @router.get(
        "/readyz",
        summary="Readiness: every model is loaded",
        response_model=Readiness,
        operation_id="readyz",
        responses={503: {"model": Readiness, "description": "At least one model is not loaded."}},
    )
    async def readyz():
        states = {
            name: e.state if e.state == "ready" else f"{e.state}: {e.reason}" for name, e in registry.entries.items()
        }
        ready = registry.ready()
        notes = {name: note for name, e in registry.entries.items() if (note := e.held_back_note())}
        return JSONResponse(
            Readiness(status="ready" if ready else "not ready", models=states, notes=notes).model_dump(),
            status_code=200 if ready else 503,
        )

    @router.get(
        "/models", summary="Metadata of every model", response_model=list[ModelInfo], operation_id="list_models"
    )
    async def models(request: Request) -> list[ModelInfo]:
        return [info(e, request) for e in registry.entries.values()]

    @router.get(
        "/models/{name}",
        summary="Metadata of one model",
        response_model=ModelInfo,
        operation_id="get_model",
        responses={404: {"model": ErrorBody, "description": "No model has that name."}},
    )
    async def model(name: str, request: Request) -> ModelInfo:
        return info(registry.entry(name), request)

    @router.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        operation_id="metrics",
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}},
    )
    async def metrics(request: Request) -> Response:
        metrics_ = request.app.state.metrics
        for name, entry in registry.entries.items():
            metrics_.queue_depth.labels(name).set(entry.queue_depth)
        text, media_type = metrics_.exposition()
        return Response(text, media_type=media_type)

    return router
