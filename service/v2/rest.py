"""The Open Inference Protocol v2 over REST (KServe v2 / Triton), so tritonclient and KServe clients work.

Each route decodes, calls the data plane and encodes: the protocol's rules are in service/v2/codec.py and
service/v2/dataplane.py. Errors are the data plane's ServiceErrors, answered by the app's one handler
(``{"error": ..., "detail": ...}`` with their status). Inference without a version is a hot route (matched
first) taking its body in one step (service/api/routes.py: DirectRoute).
"""

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from service.api.routes import DirectRoute, batch_bytes, with_limit
from service.runtime.threads import off_loop
from service.v2 import codec
from service.v2.dataplane import DataPlane


class V2Error(BaseModel):
    error: str
    detail: str


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    why = {
        400: "The request does not follow the protocol (what to send instead is in the message).",
        401: "API keys are configured and none (or a wrong one) was sent.",
        404: "No such model or version.",
        413: "The body is larger than the model's batch route takes.",
        422: "A tensor's value breaks the model's input rules (the message names the instance and input).",
        503: "The model is not loaded, or its queue is full (see Retry-After).",
        504: "The prediction took longer than the request timeout.",
    }
    return {status: {"model": V2Error, "description": why[status]} for status in statuses}


INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"enum": [*codec.NUMPY, "BYTES"]},
                                    "parameters": {"type": "object"},
                                    "data": {"type": "array"},
                                },
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                            },
                        },
                    },
                }
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": (
                    "The binary tensor extension: the JSON request (its length in Inference-Header-Content-Length), "
                    "then the inputs' bytes."
                ),
            },
        },
    }
}


def v2_router(plane: DataPlane, hot: APIRouter) -> APIRouter:
    """The protocol's routes; inference (without a version) goes on ``hot`` (matched first, see
    routes.model_router)."""
    router = APIRouter(tags=["open inference protocol v2"])
    registry = plane.registry

    @router.get("/v2", summary="Server metadata (v2)", operation_id="v2_server_metadata")
    async def server_metadata() -> dict:
        return plane.server_metadata()

    @router.get("/v2/health/live", summary="Server live (v2)", operation_id="v2_live")
    async def live() -> dict:
        return {"live": True}

    @router.get(
        "/v2/health/ready",
        summary="Server ready (v2)",
        operation_id="v2_ready",
        responses={503: {"description": 'A model is not loaded: {"ready": false}.'}},
    )
    async def ready() -> JSONResponse:
        ok = plane.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    names = list(registry.entries)
    # the same instances as a model's batch route, as tensors: the largest any model takes
    largest = max((batch_bytes(e.predictor, registry.settings) for e in registry.entries.values()), default=1024)
    versions = [e.artifact.manifest.version for e in registry.entries.values() if e.artifact is not None]
    Model = Annotated[str, Path(description="A served model's name.", examples=names)]
    Version = Annotated[str, Path(description="Its version (GET /v2/models/{model}).", examples=versions)]
    Handler = Callable[[str, Request, "str | None"], Awaitable[Response]]

    def routes_for(handler: Handler):
        """The handler on both paths: without a version (the served one), and with one."""

        async def served(model: Model, request: Request) -> Response:
            return await handler(model, request, None)

        async def pinned(model: Model, version: Version, request: Request) -> Response:
            return await handler(model, request, version)

        return served, pinned

    async def model_metadata(model: str, request: Request, version: str | None) -> Response:
        return JSONResponse(plane.model_metadata(model, version))

    async def model_ready(model: str, request: Request, version: str | None) -> Response:
        ok = plane.model_ready(model, version)
        return JSONResponse({"name": model, "ready": ok}, status_code=200 if ok else 503)

    async def config(model: str, request: Request, version: str | None) -> Response:
        return JSONResponse(plane.model_config(model, version))

    async def infer(model: str, request: Request, version: str | None) -> Response:
        entry = plane.model(model, version)
        body = await request.body()
        decoded = await off_loop(
            len(body),
            codec.from_rest,
            body,
            request.headers.get(codec.HEADER_LENGTH),
            codec.most_values(entry, registry.settings.max_batch_instances),
        )
        answer = await plane.infer(model, version, decoded, len(body))
        content, headers = codec.to_rest(answer, codec.binary_outputs(decoded, [o.name for o in answer.outputs]))
        return Response(content, headers=headers)

    routes = {
        "metadata": routes_for(model_metadata),
        "ready": routes_for(model_ready),
        "infer": routes_for(infer),
        "config": routes_for(config),
    }
    for prefix, which, suffix in (
        ("/v2/models/{model}", 0, ""),
        ("/v2/models/{model}/versions/{version}", 1, "_version"),
    ):
        router.add_api_route(
            prefix,
            routes["metadata"][which],
            methods=["GET"],
            summary="Model metadata (v2)",
            operation_id="v2_model_metadata" + suffix,
            responses=_errors(401, 404),
        )
        router.add_api_route(
            prefix + "/ready",
            routes["ready"][which],
            methods=["GET"],
            summary="Model ready (v2)",
            operation_id="v2_model_ready" + suffix,
            responses=_errors(401, 404, 503),
        )
        router.add_api_route(
            prefix + "/config",
            routes["config"][which],
            methods=["GET"],
            summary="Model configuration (Triton's extension, for perf_analyzer)",
            operation_id="v2_model_config" + suffix,
            responses=_errors(401, 404),
        )
        (router if which else hot).add_api_route(  # the default version's inference is a hot route
            prefix + "/infer",
            routes["infer"][which],
            methods=["POST"],
            tags=router.tags,
            summary="Inference (v2, JSON or binary)",
            operation_id="v2_infer" + suffix,
            openapi_extra={**INFER_BODY, **with_limit(largest)},
            responses=_errors(400, 401, 404, 413, 422, 503, 504),
            route_class_override=DirectRoute,
        )
    return router
