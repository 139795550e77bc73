"""The FastAPI application: ``create_app()`` for tests and embedding, ``app`` for ``uvicorn service.app:app``."""

from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager

import torch
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import RedirectResponse

from service.catalog import MODELS, Model
from service.docs import add_docs, describe_uploads_as_binary
from service.errors import add_error_handlers
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware, configure_logging
from service.registry import Registry
from service.routes import model_router, ops_router, require_api_key
from service.settings import Settings

log = logging.getLogger("service.app")

DESCRIPTION = """Four PyTorch models from the classic course notes, trained offline and served with dynamic
batching. Every input is validated: a bad request gets a 4xx whose message names the field and the rule.
Operations: `/healthz`, `/readyz`, `/models`, `/metrics`."""


def selected_models(settings: Settings) -> list[Model]:
    """The catalog's models, or those ``SERVE_MODELS`` names; an unknown name stops the start with the list."""
    if settings.models is None:
        return MODELS
    known = {m.name for m in MODELS}
    if unknown := [name for name in settings.models if name not in known]:
        raise ValueError(f"SERVE_MODELS names {unknown}, which are not models; choose from {sorted(known)}")
    return [m for m in MODELS if m.name in settings.models]


def create_app(settings: Settings | None = None, models: list[Model] | None = None) -> FastAPI:
    """The app serving ``models`` (default: SERVE_MODELS, else the whole catalog) with ``settings`` (default:
    from the environment)."""
    settings = settings or Settings()
    configure_logging(settings.log_json, settings.log_level)
    metrics = Metrics()
    registry = Registry(selected_models(settings) if models is None else models, settings, metrics)

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
        ready = [name for name, entry in registry.entries.items() if entry.state == "ready"]
        url = f"http://{settings.host}:{settings.port}"  # as `python -m service` was told to bind
        log.info("ready: serving %s at %s (API docs: %s/docs)", ", ".join(ready) or "no model", url, url)
        yield
        await registry.stop()  # uvicorn has already drained in-flight requests; finish anything queued

    app = FastAPI(title="Course models server", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)  # docs pages and schema added below
    app.state.settings, app.state.registry, app.state.metrics = settings, registry, metrics
    add_error_handlers(app)

    # Without keys there is no check at all: a no-op dependency still costs every request its resolution.
    guards = [Depends(require_api_key)] if settings.api_keys else []
    app.include_router(ops_router(registry, [] if settings.public_ops else guards))
    add_docs(app, [] if settings.public_ops else guards)  # the pages and /openapi.json, behind the same guard
    describe_uploads_as_binary(app)
    app.add_api_route("/", lambda: RedirectResponse("/docs"), include_in_schema=False)  # a browser lands on the docs
    for entry in registry.entries.values():
        app.include_router(model_router(entry, settings.max_batch_instances, guards, settings.benchmark_routes))

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["X-Request-ID"])
    app.add_middleware(RequestContextMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    return app


app = create_app()
