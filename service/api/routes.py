"""HTTP routes: each model's routes (single, batch, and its upload and stream routes), plus health, readiness,
metadata and metrics."""

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, File, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, StrictBool, TypeAdapter, ValidationError, create_model

from service.artifacts import VERSION_NAME
from service.models.base import InputError, Upload, UploadRoute
from service.runtime.context import CURRENT
from service.runtime.registry import ModelEntry, Registry, Stream
from service.runtime.threads import OFF_LOOP_BYTES, T, off_loop
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
        path = [
            f.name for f in self.dependant.path_params if f.field_info.annotation is str and not f.field_info.metadata
        ]
        if names - {body.name if body else None, "request", "response", *path} or not (
            inspect.iscoroutinefunction(self.endpoint)
        ):
            return standard
        validate_json: Callable[[bytes], Any] | None = None
        if body is not None:
            assert body.field_info.annotation is not None  # a body parameter always has its type
            validate_json = TypeAdapter(body.field_info.annotation).validate_json
        dump_json = TypeAdapter(self.response_model).dump_json if self.response_model else None
        endpoint = self.endpoint

        async def handle(request: Request) -> Response:
            arguments = {name: request.path_params[name] for name in path}
            if "request" in names:
                arguments["request"] = request
            if body is not None:
                assert validate_json is not None  # set with body
                try:
                    data = await request.body()  # kept on the request: the standard handler reads it from there
                except Exception:  # e.g. a body refused mid-stream (413): FastAPI answers as it does
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


def validated_or_errors(validate_json: Callable[[bytes], T], data: bytes) -> tuple[T | None, list[dict]]:
    """The body validated, or its errors in FastAPI's form (located in the body, without the input)."""
    try:
        return validate_json(data), []
    except ValidationError as exc:
        return None, [
            {**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False, include_input=False)
        ]


BODY_LIMIT = "x-max-body-bytes"  # a route's largest body, in its OpenAPI operation (clients see it too)


def with_limit(limit: int) -> dict[str, int]:
    """A route's ``openapi_extra`` declaring its largest body (service/api/middleware.py: Gate.from_routes)."""
    return {BODY_LIMIT: limit}


def batch_bytes(predictor: Any, settings: Settings) -> int:
    """The largest body of a batch: SERVE_MAX_BATCH_INSTANCES instances of the model's largest one."""
    return predictor.max_instance_bytes * settings.max_batch_instances + 1024


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
    # Input, Output, One, BatchInput and BatchOutput are models built at run time (create_model, or the
    # artifact's own schema), used below as the endpoints' annotations, which FastAPI reads to validate and
    # document: mypy cannot know them (each "type: ignore" below says so), nor their fields.
    BatchInput = create_model(
        f"{Input.__name__}Batch",
        instances=(
            list[Input],  # type: ignore[valid-type]  # a model built at run time (above)
            Field(
                min_length=1,
                max_length=max_instances,
                description=f"1 to {max_instances} instances, answered in order.",
            ),
        ),
    )
    BatchOutput = create_model(
        f"{Output.__name__}Batch",
        predictions=(list[Output], Field(description="One prediction per instance, in the order sent.")),  # type: ignore[valid-type]  # built at run time
    )
    # A streaming model's single route also takes "stream"; its batch and /stream routes do not need it.
    One = (
        create_model(
            f"{Input.__name__}OrStream",
            __base__=Input,
            stream=(
                StrictBool,
                Field(False, description=(f"If true, answer Server-Sent Events like POST /{name}/stream.")),
            ),
        )
        if predictor.stream_event
        else Input
    )
    router = APIRouter(tags=[name], responses=ERRORS)

    async def submit(
        items: list,
        request: Request,
        response: Response,
        batch: bool = False,
        version: str | None = None,
        json_body: bool = True,
    ) -> list:
        """The outputs, in order, from the version picked for this request (named in X-Model-Version). An item
        that failed raises: one request's error as it is; in a batch, every InputError together as one 422
        naming each instance, like a validation error of the body. A JSON body's payload record holds it as it
        was sent (read already: kept on the request), and the answer as written."""
        meta: dict[str, int] = {}
        if json_body and registry.payloads.on and (call := CURRENT.get()) is not None:
            call.sent = (await request.body(), batch)
        outputs, response.headers[VERSION_HEADER] = await registry.submit(entry, items, version, meta)
        failed = [(i, out) for i, out in enumerate(outputs) if isinstance(out, Exception)]
        request.state.batch_size = meta.get("batch_size")
        if not failed:
            return outputs
        invalid = [(i, out) for i, out in failed if isinstance(out, InputError)]
        if batch and len(invalid) == len(failed):
            raise RequestValidationError(
                [
                    {"loc": ["body", "instances", i, *out.loc[1:]], "msg": str(out), "type": "value_error"}
                    for i, out in invalid
                ]
            )
        raise failed[0][1]

    async def predict_one(
        item: Annotated[One, example],  # type: ignore[valid-type]  # a model built at run time (above)
        request: Request,
        response: Response,
    ) -> Output:  # type: ignore[valid-type]  # the model's Output, known at run time
        if getattr(item, "stream", False):
            return await open_stream(registry, entry, item)
        return (await submit([item], request, response))[0]

    async def predict_batch(body: BatchInput, request: Request, response: Response) -> BatchOutput:
        return BatchOutput(predictions=await submit(body.instances, request, response, batch=True))  # type: ignore[attr-defined]  # its field is built at run time

    async def predict_version(
        version: VersionName,
        item: Annotated[Input, example],  # type: ignore[valid-type]  # a model built at run time (above)
        request: Request,
        response: Response,
    ) -> Output:  # type: ignore[valid-type]  # the model's Output, known at run time
        return (await submit([item], request, response, version=version))[0]

    async def predict_version_batch(
        version: VersionName,
        body: BatchInput,
        request: Request,
        response: Response,
    ) -> BatchOutput:
        return BatchOutput(predictions=await submit(body.instances, request, response, batch=True, version=version))  # type: ignore[attr-defined]  # its field is built at run time

    sse: dict[int | str, dict[str, Any]] = (
        {200: {"content": {"text/event-stream": {}}}} if predictor.stream_event else {}
    )
    # Each route's largest body (BODY_LIMIT), read by the middleware before a byte of the body is: one instance's
    # largest valid JSON (the model's max_instance_bytes), a batch SERVE_MAX_BATCH_INSTANCES of those.
    one, many = with_limit(predictor.max_instance_bytes), with_limit(batch_bytes(predictor, settings))
    hot.add_api_route(
        f"/{name}",
        predict_one,
        methods=["POST"],
        response_model=Output,
        summary=predictor.summary,
        description=predictor.description,
        responses={**ERRORS, **sse},
        tags=[name],
        operation_id=f"predict_{folder}",
        route_class_override=DirectRoute,
        openapi_extra=one,
    )
    hot.add_api_route(
        f"/{name}/batch",
        predict_batch,
        methods=["POST"],
        response_model=BatchOutput,
        summary=f"{predictor.summary} (many at once)",
        responses=ERRORS,
        tags=[name],
        description="The same model for a list of instances, in one request.",
        operation_id=f"predict_{folder}_batch",
        route_class_override=DirectRoute,
        openapi_extra=many,
    )
    version_docs: dict[int | str, dict[str, Any]] = {
        404: {"model": ErrorBody, "description": "That version is not loaded (the message lists those that are)."}
    }
    router.add_api_route(
        f"/{name}/versions/{{version}}",
        predict_version,
        methods=["POST"],
        response_model=Output,
        summary=f"{predictor.summary} (one version)",
        responses=version_docs,
        description=f"Like POST /{name}, answered by the loaded version named in the path "
        "(GET /models lists them), whatever the default or the split.",
        operation_id=f"predict_{folder}_version",
        openapi_extra=one,
    )
    router.add_api_route(
        f"/{name}/versions/{{version}}/batch",
        predict_version_batch,
        methods=["POST"],
        response_model=BatchOutput,
        summary=f"{predictor.summary} (one version, many at once)",
        description=f"Like POST /{name}/batch, answered by the version named in the path.",
        responses=version_docs,
        operation_id=f"predict_{folder}_version_batch",
        openapi_extra=many,
    )
    if predictor.stream_event:  # Server-Sent Events, computed on the model's worker but outside its queue

        async def predict_stream(item: Annotated[Input, example]) -> StreamingResponse:  # type: ignore[valid-type]  # run-time model
            return await open_stream(registry, entry, item)

        router.add_api_route(
            f"/{name}/stream",
            predict_stream,
            methods=["POST"],
            response_class=StreamingResponse,
            responses=sse,
            summary=f"{predictor.summary}, streamed as Server-Sent Events",
            description=f'Same body as POST /{name} (same as sending "stream": true).',
            operation_id=f"predict_{folder}_stream",
            openapi_extra=one,
        )
    if predictor.upload:
        add_upload_route(router, entry, predictor.upload, submit, settings.max_uploads, settings.max_body_bytes)
    if settings.benchmark_routes:  # the framework's ceiling: same schema and validation, no model

        async def noop(item: Input) -> dict[str, bool]:  # type: ignore[valid-type]  # a model known at run time
            return {"valid": True}

        router.add_api_route(
            f"/{name}/noop",
            noop,
            methods=["POST"],
            include_in_schema=False,
            route_class_override=DirectRoute,
            openapi_extra=one,
        )
    return router


async def open_stream(
    registry: Registry, entry: ModelEntry, item: Any, version: str | None = None
) -> StreamingResponse:
    """Server-Sent Events: one ``stream_event`` event per piece the model yields, then one named after the
    model with the whole answer (the same JSON as the single route's).

    The stream goes through the registry like any request (:meth:`Registry.open_stream`: the version picked
    and held, at most SERVE_MAX_STREAMS per model, each piece in its turn in the model's queue, counted per
    version); a bad input is a 422 before anything is sent. A stream still running after
    SERVE_STREAM_TIMEOUT_S ends with an ``error`` event."""
    stream = await registry.open_stream(entry, item, version)
    return EventStream(stream, registry.settings.stream_timeout_s)


class EventStream(StreamingResponse):
    """The SSE response of one stream; it closes the stream (its place, its version) however it ends, a client
    that leaves before the first event included."""

    def __init__(self, stream: Stream, timeout_s: float):
        super().__init__(
            self._events(stream, timeout_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", VERSION_HEADER: stream.version.name},
        )
        self.stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.close()

    @staticmethod
    async def _events(stream: Stream, timeout_s: float) -> AsyncIterator[str]:
        name, event = stream.entry.name, stream.version.live_predictor.stream_event
        deadline = asyncio.get_running_loop().time() + timeout_s

        def text(piece: Any) -> str:
            if isinstance(piece, BaseModel):
                return f"event: {name}\ndata: {piece.model_dump_json()}\n\n"
            return f"event: {event}\ndata: {json.dumps({event: piece}, ensure_ascii=False)}\n\n"

        try:
            while True:
                async with asyncio.timeout_at(deadline):  # around the await only, never around a yield
                    pieces = [await stream.next_piece()]
                    while pieces[-1] is not None and stream.has_piece():  # pieces written while the last was sent
                        pieces.append(await stream.next_piece())
                if events := "".join(text(piece) for piece in pieces if piece is not None):
                    yield events  # one write for all of them
                if pieces[-1] is None:
                    return
        except TimeoutError:
            detail = f"the stream ran longer than {timeout_s:g} s (SERVE_STREAM_TIMEOUT_S)"
            yield f"event: error\ndata: {json.dumps({'detail': detail})}\n\n"


def add_upload_route(
    router: APIRouter, entry: ModelEntry, upload: UploadRoute, submit, max_uploads: int, max_body_bytes: int
) -> None:
    """``POST /{name}/{path}``: a multipart ``file`` plus query options. The bytes are queued as they came
    and decoded by the model on its worker thread, batched with the other requests. At most ``max_uploads``
    files per model are held in memory at once (the parser keeps larger parts on disk until then)."""
    Options, Output = upload.Options, entry.predictor.Output

    async def predict_upload(
        request: Request,
        response: Response,
        options: Annotated[Options, Query()],  # type: ignore[valid-type]  # the model's Options, known at run time
        file: UploadFile = File(description=upload.file_description),
    ) -> Output:  # type: ignore[valid-type]  # the model's Output, known at run time
        with entry.upload_place(max_uploads):
            return (await submit([Upload(await file.read(), options)], request, response, json_body=False))[0]

    validation_errors = {"$ref": "#/components/schemas/HTTPValidationError"}  # the body of FastAPI's own 422s
    responses: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": text} for status, text in upload.errors.items() if status != 422
    }
    if 422 in upload.errors:
        responses[422] = {
            "description": upload.errors[422],
            "content": {"application/json": {"schema": validation_errors}},
        }
    # The part's media types, so clients (and fuzzers) know the bytes must be an image, not any file.
    encoding = {"file": {"contentType": ", ".join(upload.media_types)}}
    router.add_api_route(
        f"/{entry.name}/{upload.path}",
        predict_upload,
        methods=["POST"],
        response_model=Output,
        summary=upload.summary,
        description=upload.description,
        responses=responses,
        operation_id=f"predict_{entry.model.folder}_{upload.path}",
        openapi_extra={
            "requestBody": {"content": {"multipart/form-data": {"encoding": encoding}}},
            BODY_LIMIT: max_body_bytes,
        },
    )  # a picture's bytes: only the overall cap
