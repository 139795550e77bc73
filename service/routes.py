"""HTTP routes: each model's routes (single, batch, and its upload and stream routes), plus health, readiness,
metadata and metrics."""

import asyncio
import inspect
import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body, File, HTTPException, Path, Query, Request, UploadFile
from fastapi.routing import APIRoute
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, StrictBool, TypeAdapter, ValidationError, create_model

from service.models.base import InputError, Upload, UploadRoute
from service.batching import QueueFullError
from service.artifacts import VERSION_NAME
from service.registry import ModelEntry, ModelVersion, Registry
from service.settings import Settings


VERSION_HEADER = "X-Model-Version"  # on every model answer: the version that produced it
VersionName = Annotated[str, Path(pattern=f"^{VERSION_NAME.pattern}$", description="A loaded version's name.")]


class ErrorBody(BaseModel):
    detail: str = Field(description="What went wrong and what to send instead.")


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "The body could not be read as JSON (e.g. not UTF-8)."},
    401: {"model": ErrorBody, "description": "API keys are configured and none (or a wrong one) was sent."},
    413: {"model": ErrorBody, "description": "The request body is larger than the configured limit."},
    503: {"model": ErrorBody, "description": "The model is not loaded, or its queue is full (see Retry-After)."},
    504: {"model": ErrorBody, "description": "The prediction took longer than the request timeout."},
}


class DirectRoute(APIRoute):
    """A route whose endpoint is called directly, without FastAPI's dependency solving: a JSON body read and
    validated by pydantic-core in one step (``validate_json`` on the bytes, not ``json.loads`` and then
    validation), plain ``str`` path parameters passed as the router matched them, and the answer written in
    one step (measurements: *Cheaper requests* in the README).

    Only the plain case takes this path. An empty body, another content type, or a body that fails
    validation (or that pydantic-core reads differently, such as UTF-16) goes to FastAPI's own handler,
    which reads the same bytes again, so every error is exactly FastAPI's. An endpoint that takes anything
    but its body, ``request``, ``response`` and unconstrained ``str`` path parameters is served the standard
    way."""

    def get_route_handler(self):
        standard = super().get_route_handler()
        names = set(inspect.signature(self.endpoint).parameters)
        body = self.body_field
        path = [f.name for f in self.dependant.path_params if f.field_info.annotation is str and not f.field_info.metadata]
        if names - {body.name if body else None, "request", "response", *path} or not (
                inspect.iscoroutinefunction(self.endpoint)):
            return standard
        validate_json = TypeAdapter(body.field_info.annotation).validate_json if body else None
        dump_json = TypeAdapter(self.response_model).dump_json if self.response_model else None
        endpoint = self.endpoint

        async def handle(request: Request) -> Response:
            arguments = {name: request.path_params[name] for name in path}
            if "request" in names:
                arguments["request"] = request
            if body is not None:
                try:
                    data = await request.body()  # kept on the request: the standard handler reads it from there
                except Exception:  # noqa: BLE001 - e.g. a body refused mid-stream (413): FastAPI answers as it does
                    return await standard(request)
                if not data or not is_json(request.headers.get("content-type")):
                    return await standard(request)
                if len(data) > OFF_LOOP_BYTES:  # read on a thread; its errors too (FastAPI's would be on the loop)
                    arguments[body.name], errors = await off_loop(len(data), validated_or_errors, validate_json, data)
                    if errors:
                        raise RequestValidationError(errors)
                else:
                    try:
                        arguments[body.name] = validate_json(data)
                    except ValidationError:
                        return await standard(request)
            headers = None
            if "response" in names:  # headers the endpoint sets (X-Model-Version), as FastAPI's sub-response
                arguments["response"] = headers = Response()
                del headers.headers["content-length"]
            result = await endpoint(**arguments)
            if isinstance(result, Response) or dump_json is None:  # a stream or a raw answer, or no declared model
                return result if isinstance(result, Response) else JSONResponse(result)
            answer = Response(dump_json(result), media_type="application/json")
            if headers is not None:
                answer.headers.raw.extend(headers.headers.raw)
            return answer

        return handle


T = TypeVar("T")
OFF_LOOP_BYTES = 64 * 1024  # bodies larger than this are decoded on a thread (measured: 8 MB took 1-2 s)


async def off_loop(size: int, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``, on a thread when it decodes a body of ``size`` bytes over OFF_LOOP_BYTES, so that
    the event loop (and /healthz) gets the interpreter back every few milliseconds; small ones inline, where
    a thread hop would cost more than the work."""
    if size <= OFF_LOOP_BYTES:
        return function(*args)
    return await asyncio.to_thread(function, *args)


def validated_or_errors(validate_json: Callable[[bytes], T], data: bytes) -> tuple[T | None, list[dict]]:
    """The body validated, or its errors in FastAPI's form (located in the body, without the input)."""
    try:
        return validate_json(data), []
    except ValidationError as exc:
        return None, [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False,
                                                                                       include_input=False)]


def is_json(content_type: str | None) -> bool:
    """Whether FastAPI reads a body with this Content-Type as JSON: application/json or application/*+json."""
    if not content_type:
        return False
    kind = content_type.partition(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def model_router(entry: ModelEntry, registry: Registry, hot: APIRouter) -> APIRouter:
    """Every route of one model, all through its batcher: ``POST /{name}`` for one instance,
    ``POST /{name}/batch`` for many, where the model declares them an upload route and a stream route, and
    ``POST /{name}/versions/{version}`` (and ``/batch``) to call one loaded version by name. Every answer
    names the version that produced it in ``X-Model-Version``.

    The API key and the body size are checked before any of these run (``middleware.Gate``). The two routes
    that take most traffic go on ``hot``, which the app matches first: the router tries routes in order, at a
    few microseconds each.
    """
    settings = registry.settings
    predictor, name, folder = entry.predictor, entry.name, entry.model.folder
    Input, Output = entry.Input, predictor.Output
    max_instances = settings.max_batch_instances
    example = Body(examples=[predictor.example])
    BatchInput = create_model(f"{Input.__name__}Batch", instances=(list[Input], Field(
        min_length=1, max_length=max_instances, description=f"1 to {max_instances} instances, answered in order.")))
    BatchOutput = create_model(f"{Output.__name__}Batch", predictions=(list[Output], Field(
        description="One prediction per instance, in the order sent.")))
    # A streaming model's single route also takes "stream"; its batch and /stream routes do not need it.
    One = create_model(f"{Input.__name__}OrStream", __base__=Input, stream=(StrictBool, Field(False, description=(
        f"If true, answer Server-Sent Events like POST /{name}/stream.")))) if predictor.stream_event else Input
    router = APIRouter(tags=[name], responses=ERRORS)

    async def submit(items: list, request: Request, response: Response, batch: bool = False,
                     version: str | None = None) -> list:
        """The outputs, in order, from the version picked for this request (named in X-Model-Version). An item
        that failed raises: one request's error as it is; in a batch, every InputError together as one 422
        naming each instance, like a validation error of the body."""
        meta: dict[str, int] = {}
        outputs, response.headers[VERSION_HEADER] = await registry.submit(entry, items, version, meta)
        failed = [(i, out) for i, out in enumerate(outputs) if isinstance(out, Exception)]
        request.state.batch_size = meta.get("batch_size")
        if not failed:
            return outputs
        if batch and all(isinstance(out, InputError) for _, out in failed):
            raise RequestValidationError([{"loc": ["body", "instances", i, *out.loc[1:]], "msg": str(out),
                                           "type": "value_error"} for i, out in failed])
        raise failed[0][1]

    async def predict_one(item: Annotated[One, example], request: Request,  # type: ignore[valid-type]
                          response: Response) -> Output:  # type: ignore[valid-type]
        if getattr(item, "stream", False):
            return open_stream(entry, item, settings)
        return (await submit([item], request, response))[0]

    async def predict_batch(body: BatchInput, request: Request, response: Response) -> BatchOutput:  # type: ignore[valid-type]
        return BatchOutput(predictions=await submit(body.instances, request, response, batch=True))

    async def predict_version(version: VersionName, item: Annotated[Input, example], request: Request,  # type: ignore[valid-type]
                              response: Response) -> Output:  # type: ignore[valid-type]
        return (await submit([item], request, response, version=version))[0]

    async def predict_version_batch(version: VersionName, body: BatchInput, request: Request,  # type: ignore[valid-type]
                                    response: Response) -> BatchOutput:  # type: ignore[valid-type]
        return BatchOutput(predictions=await submit(body.instances, request, response, batch=True, version=version))

    sse = {200: {"content": {"text/event-stream": {}}}} if predictor.stream_event else {}
    hot.add_api_route(f"/{name}", predict_one, methods=["POST"], response_model=Output, summary=predictor.summary,
                      description=predictor.description, responses={**ERRORS, **sse}, tags=[name],
                      operation_id=f"predict_{folder}", route_class_override=DirectRoute)
    hot.add_api_route(f"/{name}/batch", predict_batch, methods=["POST"], response_model=BatchOutput,
                      summary=f"{predictor.summary} (many at once)", responses=ERRORS, tags=[name],
                      description="The same model for a list of instances, in one request.",
                      operation_id=f"predict_{folder}_batch", route_class_override=DirectRoute)
    version_docs = {404: {"model": ErrorBody, "description": "That version is not loaded (the message lists those "
                                                             "that are)."}}
    router.add_api_route(f"/{name}/versions/{{version}}", predict_version, methods=["POST"], response_model=Output,
                         summary=f"{predictor.summary} (one version)", responses=version_docs,
                         description=f"Like POST /{name}, answered by the loaded version named in the path "
                                     "(GET /models lists them), whatever the default or the split.",
                         operation_id=f"predict_{folder}_version")
    router.add_api_route(f"/{name}/versions/{{version}}/batch", predict_version_batch, methods=["POST"],
                         response_model=BatchOutput, summary=f"{predictor.summary} (one version, many at once)",
                         description=f"Like POST /{name}/batch, answered by the version named in the path.",
                         responses=version_docs, operation_id=f"predict_{folder}_version_batch")
    if predictor.stream_event:  # Server-Sent Events, computed on the model's worker but outside its queue
        async def predict_stream(item: Annotated[Input, example]) -> StreamingResponse:  # type: ignore[valid-type]
            return open_stream(entry, item, settings)
        router.add_api_route(f"/{name}/stream", predict_stream, methods=["POST"], response_class=StreamingResponse,
                             responses=sse, summary=f"{predictor.summary}, streamed as Server-Sent Events",
                             description=f"Same body as POST /{name} (same as sending \"stream\": true).",
                             operation_id=f"predict_{folder}_stream")
    if predictor.upload:
        add_upload_route(router, entry, predictor.upload, submit, settings.max_uploads)
    if settings.benchmark_routes:  # the framework's ceiling: same schema and validation, no model
        async def noop(item: Input) -> dict[str, bool]:  # type: ignore[valid-type]
            return {"valid": True}
        router.add_api_route(f"/{name}/noop", noop, methods=["POST"], include_in_schema=False,
                             route_class_override=DirectRoute)
    return router


def open_stream(entry: ModelEntry, item: Any, settings: Settings) -> StreamingResponse:
    """Server-Sent Events: one ``stream_event`` event per piece the model yields, then one named after the
    model with the whole answer (the same JSON as the single route's).

    At most SERVE_MAX_STREAMS run per model (more get 503): each piece is one job on the model's worker,
    queued with its batches, so ordinary requests wait behind at most that many pieces. A stream still
    running after SERVE_STREAM_TIMEOUT_S ends with an ``error`` event."""
    version = entry.pick()  # 503 while the model is not loaded, like the other routes
    if refusal := entry.streams_full(settings.max_streams):  # "stream": true on the single route comes here
        raise QueueFullError(refusal)
    pieces = version.predictor.stream(item)  # checks the input first: a bad one is a 422, not a broken stream
    event, batcher = version.predictor.stream_event, version.batcher

    async def relay():  # each piece is computed on the model's worker thread, between its batches
        deadline = asyncio.get_running_loop().time() + settings.stream_timeout_s
        try:
            while True:
                async with asyncio.timeout_at(deadline):  # around the await only, never around a yield
                    piece = await batcher.call(next, pieces, None)
                if piece is None:
                    return
                if isinstance(piece, BaseModel):
                    yield f"event: {entry.name}\ndata: {piece.model_dump_json()}\n\n"
                else:
                    yield f"event: {event}\ndata: {json.dumps({event: piece}, ensure_ascii=False)}\n\n"
        except TimeoutError:
            detail = f"the stream ran longer than {settings.stream_timeout_s:g} s (SERVE_STREAM_TIMEOUT_S)"
            yield f"event: error\ndata: {json.dumps({'detail': detail})}\n\n"

    return CountedStream(entry, version, relay())


class CountedStream(StreamingResponse):
    """An SSE response that holds one of its model's stream places, and its version (which is not unloaded
    under it), until it ends, however it ends (a client that leaves before the first event included)."""

    def __init__(self, entry: ModelEntry, version: ModelVersion, body: Any):
        super().__init__(body, media_type="text/event-stream", headers={
            "Cache-Control": "no-cache", "X-Accel-Buffering": "no", VERSION_HEADER: version.name})
        self.entry, self.version = entry, version
        entry.streams += 1
        version.active += 1

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.entry.streams -= 1
            self.version.active -= 1


def add_upload_route(router: APIRouter, entry: ModelEntry, upload: UploadRoute, submit, max_uploads: int) -> None:
    """``POST /{name}/{path}``: a multipart ``file`` plus query options. The bytes are queued as they came
    and decoded by the model on its worker thread, batched with the other requests. At most ``max_uploads``
    files per model are held in memory at once (the parser keeps larger parts on disk until then)."""
    Options, Output = upload.Options, entry.predictor.Output

    async def predict_upload(request: Request, response: Response,
                             options: Annotated[Options, Query()],  # type: ignore[valid-type]
                             file: UploadFile = File(description=upload.file_description)) -> Output:  # type: ignore[valid-type]
        if entry.uploads >= max_uploads:
            raise QueueFullError(f"{entry.name} already holds its limit of {max_uploads} uploads (SERVE_MAX_UPLOADS); "
                                 "retry after the seconds in Retry-After")
        entry.uploads += 1
        try:
            return (await submit([Upload(await file.read(), options)], request, response))[0]
        finally:
            entry.uploads -= 1

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
    version: str | None = Field(None, description="The version answering by default (X-Model-Version names the one "
                                                 "that answered each request).")
    versions: list[str] = Field([], description="Versions loaded in this process; POST /{model}/versions/{v} calls one.")
    split: dict[str, int] = Field({}, description="The weighted split between versions in force (a canary), if any.")
    created_at: str | None = None
    git_commit: str | None = Field(None, description="The training code's commit (for callers with a key).")
    git_tree: str | None = Field(None, description="Whether the training code had uncommitted changes (idem).")
    quick: bool = Field(False, description="A --quick artifact: trained on a data slice as a smoke test.")
    metrics: dict[str, Any] = {}
    metrics_method: str | None = None
    hyperparameters: dict[str, Any] = Field({}, description="For callers with a key (or SERVE_PUBLIC_MODEL_DETAILS).")
    libraries: dict[str, str] = Field({}, description="Library versions of training (idem).")
    batching: dict[str, Any] = {}
    workers: int = Field(1, description="Worker processes serving it, each with its own batcher (SERVE_WORKERS).")
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]


class Readiness(BaseModel):
    status: str = Field(description="'ready' when every model is loaded.")
    models: dict[str, str] = Field(description="Each model's state, with the reason when it failed.")


def ops_router(registry: Registry) -> APIRouter:
    """Operations routes. /healthz is always open (liveness probes send no key); the rest need a key when keys
    are set, unless SERVE_PUBLIC_OPS (``app.gate``)."""
    router = APIRouter(tags=["operations"])
    # The schemas are fixed once the app is built: generate them once, not on every /models call.
    schemas = {name: (dict(e.Input.model_json_schema(), examples=[e.predictor.example]),
                      e.predictor.Output.model_json_schema()) for name, e in registry.entries.items()}

    def info(entry: ModelEntry, request: Request) -> ModelInfo:
        """What a client needs (schemas, version, quality); the build details (library versions, the training
        commit, hyperparameters) only for a caller with a key, or for all with SERVE_PUBLIC_MODEL_DETAILS."""
        m, settings = entry.manifest, registry.settings
        detailed = m is not None and (settings.public_model_details or request.state.authenticated)
        return ModelInfo(
            name=entry.name, state=entry.state, reason=entry.reason, device=str(registry.device),
            version=m and m.version, created_at=m and m.created_at, quick=bool(m and m.quick),
            versions=entry.ready_versions(), split=entry.split,
            git_commit=m.git_commit if detailed else None, git_tree=m.git_tree if detailed else None,
            metrics=m.metrics if m else {}, metrics_method=m and m.metrics_method,
            hyperparameters=m.hyperparameters if detailed else {}, libraries=m.libraries if detailed else {},
            batching=dict(entry.batcher.policy.model_dump(), threads=entry.batcher.threads) if entry.batcher
            else registry.settings.policy(entry.name).model_dump(),
            input_schema=schemas[entry.name][0], output_schema=schemas[entry.name][1],
            workers=settings.workers or 1)

    @router.get("/healthz", summary="Liveness: the process is up", operation_id="healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)  # probes that send HEAD

    @router.get("/readyz", summary="Readiness: every model is loaded", response_model=Readiness, operation_id="readyz",
                responses={503: {"model": Readiness, "description": "At least one model is not loaded."}})
    async def readyz():
        states = {name: e.state if e.state == "ready" else f"{e.state}: {e.reason}" for name, e in registry.entries.items()}
        ready = all(e.state == "ready" and e.batcher is not None for e in registry.entries.values())
        return JSONResponse(Readiness(status="ready" if ready else "not ready", models=states).model_dump(),
                            status_code=200 if ready else 503)

    @router.get("/models", summary="Metadata of every model", response_model=list[ModelInfo], operation_id="list_models")
    async def models(request: Request) -> list[ModelInfo]:
        return [info(e, request) for e in registry.entries.values()]

    @router.get("/models/{name}", summary="Metadata of one model", response_model=ModelInfo, operation_id="get_model",
                responses={404: {"model": ErrorBody, "description": "No model has that name."}})
    async def model(name: str, request: Request) -> ModelInfo:
        if name not in registry.entries:
            raise HTTPException(404, f"no model named '{name}'; known models: {', '.join(registry.entries)}")
        return info(registry.entries[name], request)

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response, operation_id="metrics",
                responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}})
    async def metrics(request: Request) -> Response:
        metrics_ = request.app.state.metrics
        for name, entry in registry.entries.items():
            metrics_.queue_depth.labels(name).set(entry.queue_depth)
        text, media_type = metrics_.exposition()
        return Response(text, media_type=media_type)

    return router
