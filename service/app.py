"""The FastAPI application: ``create_app()`` for tests and embedding, ``app`` for ``uvicorn service.app:app``."""

from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.api import server
from service.api.admin import admin_router
from service.api.docs import PREFIX as DOCS_ASSETS
from service.api.docs import add_docs, describe_uploads_as_binary
from service.api.errors import add_error_handlers
from service.api.middleware import Gate, RequestContextMiddleware, configure_logging
from service.api.ops import ops_router
from service.api.playground import PREFIX as PLAYGROUND_ASSETS
from service.api.playground import playground_router
from service.api.reports import reports_router
from service.api.routes import BODY_LIMIT, model_router
from service.catalog import MODELS, Model
from service.runtime.control import Control
from service.runtime.memory import trimming
from service.runtime.metrics import Metrics
from service.runtime.registry import Registry
from service.runtime.rollouts import CanaryWatch
from service.settings import Settings
from service.v2.dataplane import DataPlane
from service.v2.rest import v2_router

log = logging.getLogger("service.app")

DESCRIPTION = """Four PyTorch models from the classic course notes, trained offline and served with dynamic
batching. Every input is validated: a bad request gets a 4xx whose message names the field and the rule.
Operations: `/healthz`, `/readyz`, `/models`, `/models/{name}/report` (the training report), `/metrics`."""


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
        # A request lives for milliseconds but allocates hundreds of objects; with the default first generation
        # (700) a collection ran every few ms under load and moved the objects of every request in flight to the
        # older generations, whose collections then re-scanned them: 35 us of a /phone-price request at 64 clients.
        # With 50,000, most requests are over before the next one (measured: docs/operations/runtime.md).
        gc.set_threshold(50_000, 10, 10)
        registry.start()
        registry.tracing.start()  # after the fork: the exporter and sender processes are per process
        registry.payloads.start()
        await control.start()  # a worker replacing a dead one catches up with the versions the others serve
        canaries = CanaryWatch(control, registry.outcomes, metrics.canary_decided)
        canaries.start()  # guarded canary splits, judged on this worker's traffic
        grpc_server = None
        if settings.grpc_port:
            from service.v2.grpc import start_grpc  # grpc only when it is on

            grpc_server = await start_grpc(
                plane,
                checks,
                metrics,
                settings.host,
                settings.grpc_port,
                min(settings.grpc_max_message_bytes, settings.max_body_bytes),
            )
        ready = [name for name, entry in registry.entries.items() if entry.state == "ready"]
        url = f"http://{settings.host}:{settings.port}"  # as `python -m service` was told to bind
        log.info("ready: serving %s at %s (API docs: %s/docs)", ", ".join(ready) or "no model", url, url)
        async with trimming():  # the state reaches every connection's protocol (service/api/server.py)
            yield {server.LIMITS_KEY: server.ConnectionLimits(settings, metrics.open_connections.set)}
        if grpc_server is not None:
            await grpc_server.stop(grace=30)  # in-flight calls finish, like HTTP's drain
        await canaries.stop()
        await control.stop()
        await registry.stop()  # uvicorn has already drained in-flight requests; finish anything queued
        registry.payloads.stop()  # what is recorded goes out (a few seconds at most)
        registry.tracing.stop()

    app = FastAPI(
        title="Course models server",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # FastAPI's own OpenTelemetry (on whenever a global provider is set, or FASTAPI_OTEL_AUTO_CONFIGURE) would
        # trace every request a second time, with the SDK's costly spans on the event loop: this server traces
        # its requests itself (service/runtime/tracing.py). Off, it also skips a provider lookup per request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )  # docs pages and schema added below
    control = Control(registry)
    app.state.settings, app.state.registry, app.state.metrics, app.state.control = settings, registry, metrics, control
    add_error_handlers(app)

    # The prediction routes go first, on the app itself (an included router costs a second pass): routes are
    # tried in order, a few µs each. v2 inference is one route for every model, so it leads.
    plane = DataPlane(registry, app.title, app.version)  # the v2 protocol's one path, REST and gRPC alike
    v2 = v2_router(plane, hot=app.router)
    model_routers = [model_router(entry, registry, hot=app.router) for entry in registry.entries.values()]
    app.include_router(ops_router(registry))
    app.include_router(reports_router(registry))
    add_docs(app)
    describe_uploads_as_binary(app)
    app.include_router(playground_router())  # a browser lands on the playground, which links the docs
    for router in [*model_routers, v2]:
        app.include_router(router)
    if settings.admin_keys:  # no admin key, no admin routes
        app.include_router(admin_router(registry, control))
    # the HTTP middleware's and the gRPC server's key check, with each route's declared body limit (the routers'
    # own routes: FastAPI keeps included routers as they are, not as a flat list of routes)
    checks = gate(settings, [*app.router.routes, *(r for router in [*model_routers, v2] for r in router.routes)])

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "traceresponse"],
        )
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        gate=checks,
        tracing=registry.tracing,
        payloads=registry.payloads,
    )
    return app


OPS_PATHS = ("/readyz", "/models", "/metrics", "/docs", "/redoc", "/openapi.json", DOCS_ASSETS, "/v2/health/ready")


def gate(settings: Settings, routes: list) -> Gate:
    """The key check and body limits, applied before the body is read. With keys set, every path needs one
    but /healthz (liveness probes send none), "/" and the playground's assets (the page asks for a key itself)
    and, with SERVE_PUBLIC_OPS, the operations routes and docs. Each route takes the largest body it declares
    (a model's largest valid body), within SERVE_MAX_BODY_BYTES; any other path 64 KB."""
    checks = Gate(
        api_keys=settings.api_keys,
        admin_keys=settings.admin_keys,
        open_paths=("/healthz", "/v2/health/live", PLAYGROUND_ASSETS, *(OPS_PATHS if settings.public_ops else ())),
        inflight_body_budget=settings.max_inflight_body_bytes,
    )
    checks.limit_bodies(routes, BODY_LIMIT, settings.max_body_bytes)
    return checks


def __getattr__(name: str):
    """``service.app:app`` is built on first use (``uvicorn service.app:app``), not by every import of this
    module: ``python -m service`` with several workers builds its own, once, before forking."""
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(f"module 'service.app' has no attribute {name!r}")
