"""The FastAPI application: ``create_app()`` for tests and embedding, ``app`` for ``uvicorn service.app:app``."""

from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from service.docs import add_docs
from service.batching import PredictionTimeoutError, QueueFullError
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware, configure_logging
from service.catalog import MODELS, Model
from service.models.base import InputError, InputRejected
from service.registry import ModelUnavailableError, Registry
from service.routes import model_router, ops_router, require_api_key
from service.settings import Settings

log = logging.getLogger("service.app")

DESCRIPTION = """Four PyTorch models from the classic course notes, trained offline and served with dynamic
batching. Every input is validated: a bad request gets a 4xx whose message names the field and the rule.
Operations: `/healthz`, `/readyz`, `/models`, `/metrics`."""


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field and rule; the offending input is not echoed (it may be huge or NaN)."""
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=422)


def _input_error(request: Request, exc: InputError) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": exc.loc, "msg": str(exc), "type": "value_error"}]}, status_code=422)


def _rejected(request: Request, exc: InputRejected) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=exc.status)


def _error(status: int, headers: dict[str, str] | None = None):
    def handler(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)
    return handler


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    request_id = getattr(request.state, "request_id", "?")
    log.exception("unhandled error", extra={"request_id": request_id})
    return JSONResponse({"detail": f"internal error; quote request id {request_id} when reporting it"},
                        status_code=500)


def create_app(settings: Settings | None = None, models: list[Model] | None = None) -> FastAPI:
    """The app serving ``models`` (default: every model in the catalog) with ``settings`` (default: from env)."""
    settings = settings or Settings()
    configure_logging(settings.log_json, settings.log_level)
    metrics = Metrics()
    registry = Registry(MODELS if models is None else models, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        registry.load_all()
        # The loaded models, tokenizer tables and schemas are ~500k long-lived objects that the cyclic GC
        # would re-scan in every full collection (~180 ms each, often under load): park them for good.
        gc.collect()
        gc.freeze()
        registry.start()
        yield
        await registry.stop()  # uvicorn has already drained in-flight requests; finish anything queued

    app = FastAPI(title="Course models server", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # offline pages below instead of CDN-backed ones
    app.state.settings, app.state.registry, app.state.metrics = settings, registry, metrics
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(InputError, _input_error)
    app.add_exception_handler(InputRejected, _rejected)
    app.add_exception_handler(ModelUnavailableError, _error(503))
    app.add_exception_handler(QueueFullError, _error(503, {"Retry-After": "1"}))
    app.add_exception_handler(PredictionTimeoutError, _error(504))
    app.add_exception_handler(Exception, _unexpected)

    # Without keys there is no check at all: a no-op dependency still costs every request its resolution.
    guards = [Depends(require_api_key)] if settings.api_keys else []
    app.include_router(ops_router(registry, [] if settings.public_ops else guards))
    add_docs(app, [] if settings.public_ops else guards)
    for entry in registry.entries.values():
        app.include_router(model_router(entry, settings.max_batch_instances, guards, settings.benchmark_routes))

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["X-Request-ID"])
    app.add_middleware(RequestContextMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    return app


app = create_app()
