"""HTTP routes: each model's routes (single, batch, and its upload and stream routes), plus health, readiness,
metadata and metrics."""

import json
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Body, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, StrictBool, create_model

from service.models.base import InputError, Upload, UploadRoute
from service.registry import ModelEntry, Registry


class ErrorBody(BaseModel):
    detail: str = Field(description="What went wrong and what to send instead.")


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "The body could not be read as JSON (e.g. not UTF-8)."},
    401: {"model": ErrorBody, "description": "API keys are configured and none (or a wrong one) was sent."},
    413: {"model": ErrorBody, "description": "The request body is larger than the configured limit."},
    503: {"model": ErrorBody, "description": "The model is not loaded, or its queue is full (see Retry-After)."},
    504: {"model": ErrorBody, "description": "The prediction took longer than the request timeout."},
}


def has_valid_key(request: Request) -> bool:
    """Whether the request carries one of the configured keys (X-API-Key or Bearer)."""
    keys: list[str] = request.app.state.settings.api_keys
    supplied = request.headers.get("x-api-key", "")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if not supplied and scheme.lower() == "bearer":
        supplied = token.strip()
    # compare against every key, always, so timing does not reveal which prefix matched
    matches = [secrets.compare_digest(supplied.encode(), key.encode()) for key in keys]
    return bool(supplied) and any(matches)


async def require_api_key(request: Request) -> None:  # async: a sync dependency costs a thread hop per request
    """Allow the request if no keys are configured, or if it carries one (X-API-Key or Bearer)."""
    if request.app.state.settings.api_keys and not has_valid_key(request):
        raise HTTPException(401, "missing or invalid API key: send it in the X-API-Key header or as "
                                 "'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"})


def model_router(entry: ModelEntry, max_instances: int, guards: list, noop_route: bool = False) -> APIRouter:
    """Every route of one model, all through its batcher: ``POST /{name}`` for one instance,
    ``POST /{name}/batch`` for many, and where the model declares them an upload route and a stream route.

    ``guards`` are the route dependencies (the API-key check when keys are configured).
    """
    predictor, name, folder = entry.predictor, entry.name, entry.model.folder
    Input, Output = entry.Input, predictor.Output
    example = Body(examples=[predictor.example])
    BatchInput = create_model(f"{Input.__name__}Batch", instances=(list[Input], Field(
        min_length=1, max_length=max_instances, description=f"1 to {max_instances} instances, answered in order.")))
    BatchOutput = create_model(f"{Output.__name__}Batch", predictions=(list[Output], Field(
        description="One prediction per instance, in the order sent.")))
    # A streaming model's single route also takes "stream"; its batch and /stream routes do not need it.
    One = create_model(f"{Input.__name__}OrStream", __base__=Input, stream=(StrictBool, Field(False, description=(
        f"If true, answer Server-Sent Events like POST /{name}/stream.")))) if predictor.stream_event else Input
    router = APIRouter(tags=[name], dependencies=guards, responses=ERRORS)

    async def submit(items: list, request: Request, batch: bool = False) -> list:
        """The outputs, in order. An item that failed raises: one request's error as it is; in a batch, every
        InputError together as one 422 naming each instance, like a validation error of the body."""
        meta: dict[str, int] = {}
        outputs = await entry.batcher_or_raise().submit(items, meta)
        request.state.batch_size = meta.get("batch_size")
        failed = [(i, out) for i, out in enumerate(outputs) if isinstance(out, Exception)]
        if not failed:
            return outputs
        if batch and all(isinstance(out, InputError) for _, out in failed):
            raise RequestValidationError([{"loc": ["body", "instances", i, *out.loc[1:]], "msg": str(out),
                                           "type": "value_error"} for i, out in failed])
        raise failed[0][1]

    async def predict_one(item: Annotated[One, example], request: Request) -> Output:  # type: ignore[valid-type]
        if getattr(item, "stream", False):
            return open_stream(entry, item)
        return (await submit([item], request))[0]

    async def predict_batch(body: BatchInput, request: Request) -> BatchOutput:  # type: ignore[valid-type]
        return BatchOutput(predictions=await submit(body.instances, request, batch=True))

    sse = {200: {"content": {"text/event-stream": {}}}} if predictor.stream_event else {}
    router.add_api_route(f"/{name}", predict_one, methods=["POST"], response_model=Output, summary=predictor.summary,
                         description=predictor.description, responses=sse, operation_id=f"predict_{folder}")
    router.add_api_route(f"/{name}/batch", predict_batch, methods=["POST"], response_model=BatchOutput,
                         summary=f"{predictor.summary} (many at once)",
                         description="The same model for a list of instances, in one request.",
                         operation_id=f"predict_{folder}_batch")
    if predictor.stream_event:  # Server-Sent Events, computed on the model's worker but outside its queue
        async def predict_stream(item: Annotated[Input, example]) -> StreamingResponse:  # type: ignore[valid-type]
            return open_stream(entry, item)
        router.add_api_route(f"/{name}/stream", predict_stream, methods=["POST"], response_class=StreamingResponse,
                             responses=sse, summary=f"{predictor.summary}, streamed as Server-Sent Events",
                             description=f"Same body as POST /{name} (same as sending \"stream\": true).",
                             operation_id=f"predict_{folder}_stream")
    if predictor.upload:
        add_upload_route(router, entry, predictor.upload, submit)
    if noop_route:  # the framework's ceiling: same schema and validation, no model
        async def noop(item: Input) -> dict[str, bool]:  # type: ignore[valid-type]
            return {"valid": True}
        router.add_api_route(f"/{name}/noop", noop, methods=["POST"], include_in_schema=False)
    return router


def open_stream(entry: ModelEntry, item: Any) -> StreamingResponse:
    """Server-Sent Events: one ``stream_event`` event per piece the model yields, then one named after the
    model with the whole answer (the same JSON as the single route's)."""
    batcher = entry.batcher_or_raise()  # 503 while the model is not loaded, like the other routes
    pieces = entry.predictor.stream(item)  # checks the input first: a bad one is a 422, not a broken stream
    event = entry.predictor.stream_event

    async def relay():  # each piece is computed on the model's worker thread, between its batches
        while (piece := await batcher.call(next, pieces, None)) is not None:
            if isinstance(piece, BaseModel):
                yield f"event: {entry.name}\ndata: {piece.model_dump_json()}\n\n"
            else:
                yield f"event: {event}\ndata: {json.dumps({event: piece}, ensure_ascii=False)}\n\n"

    return StreamingResponse(relay(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def add_upload_route(router: APIRouter, entry: ModelEntry, upload: UploadRoute, submit) -> None:
    """``POST /{name}/{path}``: a multipart ``file`` plus query options. The bytes are queued as they came
    and decoded by the model on its worker thread, batched with the other requests."""
    Options, Output = upload.Options, entry.predictor.Output

    async def predict_upload(request: Request, options: Annotated[Options, Query()],  # type: ignore[valid-type]
                             file: UploadFile = File(description=upload.file_description)) -> Output:  # type: ignore[valid-type]
        return (await submit([Upload(await file.read(), options)], request))[0]

    validation_errors = {"$ref": "#/components/schemas/HTTPValidationError"}  # the body of FastAPI's own 422s
    responses: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": text} for status, text in upload.errors.items() if status != 422}
    if 422 in upload.errors:
        responses[422] = {"description": upload.errors[422], "content": {"application/json": {"schema": validation_errors}}}
    # The part's media types, so clients (and fuzzers) know the bytes must be an image, not any file.
    encoding = {"file": {"contentType": ", ".join(upload.media_types)}}
    router.add_api_route(f"/{entry.name}/{upload.path}", predict_upload, methods=["POST"], response_model=Output,
                         summary=upload.summary, description=upload.description, responses=responses,
                         operation_id=f"predict_{entry.model.folder}_{upload.path}",
                         openapi_extra={"requestBody": {"content": {"multipart/form-data": {"encoding": encoding}}}})


class ModelInfo(BaseModel):
    name: str
    state: str = Field(description="ready, loading or failed.")
    reason: str | None = Field(None, description="Why the model is not ready.")
    platform: str = "pytorch"
    device: str
    version: str | None = None
    created_at: str | None = None
    git_commit: str | None = Field(None, description="The training code's commit (for callers with a key).")
    git_tree: str | None = Field(None, description="Whether the training code had uncommitted changes (idem).")
    quick: bool = Field(False, description="A --quick artifact: trained on a data slice as a smoke test.")
    metrics: dict[str, Any] = {}
    metrics_method: str | None = None
    hyperparameters: dict[str, Any] = Field({}, description="For callers with a key (or SERVE_PUBLIC_MODEL_DETAILS).")
    libraries: dict[str, str] = Field({}, description="Library versions of training (idem).")
    batching: dict[str, Any] = {}
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]


class Readiness(BaseModel):
    status: str = Field(description="'ready' when every model is loaded.")
    models: dict[str, str] = Field(description="Each model's state, with the reason when it failed.")


def ops_router(registry: Registry, guarded: list) -> APIRouter:
    """Operations routes. /healthz is always open (liveness probes send no key); the rest take ``guarded``."""
    router = APIRouter(tags=["operations"])
    # The schemas are fixed once the app is built: generate them once, not on every /models call.
    schemas = {name: (dict(e.Input.model_json_schema(), examples=[e.predictor.example]),
                      e.predictor.Output.model_json_schema()) for name, e in registry.entries.items()}

    def info(entry: ModelEntry, request: Request) -> ModelInfo:
        """What a client needs (schemas, version, quality); the build details (library versions, the training
        commit, hyperparameters) only for a caller with a key, or for all with SERVE_PUBLIC_MODEL_DETAILS."""
        m, settings = entry.manifest, registry.settings
        detailed = m is not None and (settings.public_model_details or (settings.api_keys and has_valid_key(request)))
        return ModelInfo(
            name=entry.name, state=entry.state, reason=entry.reason, device=str(registry.device),
            version=m and m.version, created_at=m and m.created_at, quick=bool(m and m.quick),
            git_commit=m.git_commit if detailed else None, git_tree=m.git_tree if detailed else None,
            metrics=m.metrics if m else {}, metrics_method=m and m.metrics_method,
            hyperparameters=m.hyperparameters if detailed else {}, libraries=m.libraries if detailed else {},
            batching=dict(entry.batcher.policy.model_dump(), threads=entry.batcher.threads) if entry.batcher
            else registry.settings.policy(entry.name).model_dump(),
            input_schema=schemas[entry.name][0], output_schema=schemas[entry.name][1])

    @router.get("/healthz", summary="Liveness: the process is up", operation_id="healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)  # probes that send HEAD

    @router.get("/readyz", summary="Readiness: every model is loaded", response_model=Readiness, dependencies=guarded,
                operation_id="readyz",
                responses={503: {"model": Readiness, "description": "At least one model is not loaded."}})
    async def readyz():
        states = {name: e.state if e.state == "ready" else f"{e.state}: {e.reason}" for name, e in registry.entries.items()}
        ready = all(e.state == "ready" and e.batcher is not None for e in registry.entries.values())
        return JSONResponse(Readiness(status="ready" if ready else "not ready", models=states).model_dump(),
                            status_code=200 if ready else 503)

    @router.get("/models", summary="Metadata of every model", response_model=list[ModelInfo], dependencies=guarded,
                operation_id="list_models")
    async def models(request: Request) -> list[ModelInfo]:
        return [info(e, request) for e in registry.entries.values()]

    @router.get("/models/{name}", summary="Metadata of one model", response_model=ModelInfo, dependencies=guarded,
                operation_id="get_model",
                responses={404: {"model": ErrorBody, "description": "No model has that name."}})
    async def model(name: str, request: Request) -> ModelInfo:
        if name not in registry.entries:
            raise HTTPException(404, f"no model named '{name}'; known models: {', '.join(registry.entries)}")
        return info(registry.entries[name], request)

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response, dependencies=guarded,
                operation_id="metrics",
                responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}})
    async def metrics(request: Request) -> Response:
        registry_ = request.app.state.metrics
        for name, entry in registry.entries.items():
            registry_.queue_depth.labels(name).set(entry.batcher.depth if entry.batcher else 0)
        return Response(generate_latest(registry_.registry), media_type=CONTENT_TYPE_LATEST)

    return router
