"""The Open Inference Protocol v2 over gRPC (``SERVE_GRPC_PORT``), beside the REST routes.

Each method decodes its message with service/v2/codec.py and calls the same data plane as REST: the same
model lookup, tensors, validation, batcher, queue and limits as ``POST /v2/models/{m}/infer``. Outputs go
back as ``raw_output_contents``, as Triton sends them. :class:`CallGuard` does for every call what the
HTTP middleware does for a request: the API key (``x-api-key`` or ``authorization: Bearer`` metadata), a
request id (the caller's ``x-request-id``, sent back as trailing metadata), the access log line, the
``http_requests`` metrics (method ``GRPC``, status the code's name), and errors mapped once to codes. The
standard gRPC health service reports SERVING once every model is loaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.api.middleware import SAFE_REQUEST_ID, Gate, new_request_id
from service.errors import ServiceError, grpc_code_name
from service.runtime.context import CURRENT, CallContext
from service.runtime.memory import TRIM_AFTER_BYTES, trim_soon
from service.runtime.metrics import Metrics
from service.runtime.threads import off_loop
from service.runtime.tracing import Tracing
from service.v2 import codec
from service.v2.dataplane import DataPlane
from service.v2.generated import inference_pb2 as pb
from service.v2.generated import inference_pb2_grpc as pb_grpc

log = logging.getLogger("service.access")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's methods: messages in and out; the work is the data plane's."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**self.plane.server_metadata())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version or None))

    async def ModelMetadata(self, request, context):
        meta = self.plane.model_metadata(request.name, request.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]],
        )

    async def ModelConfig(self, request, context):
        config = self.plane.model_config(request.name, request.version or None)
        return pb.ModelConfigResponse(
            config=pb.ModelConfig(
                name=config["name"],
                platform=config["platform"],
                backend=config["backend"],
                max_batch_size=config["max_batch_size"],
                input=[pb.ModelInput(**t) for t in config["input"]],
                output=[pb.ModelOutput(**t) for t in config["output"]],
            )
        )

    async def ModelInfer(self, request, context):
        size = request.ByteSize()
        decoded = await off_loop(size, codec.from_proto, request)
        answer = await self.plane.infer(request.model_name, request.model_version or None, decoded, size)
        return codec.to_proto(answer)


def request_id_of(metadata: dict[str, Any]) -> str:
    """The caller's x-request-id metadata if it is a plain token (it goes into logs), else a new one."""
    given = metadata.get("x-request-id", "")
    return given if isinstance(given, str) and SAFE_REQUEST_ID.fullmatch(given) else new_request_id()


OPEN_METHODS = frozenset(
    {
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
    }
)  # probes send no key
# Codes that are the server's fault, so the call's span is marked an error (OpenTelemetry's gRPC conventions).
SERVER_FAULTS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})
UNAUTHENTICATED = "missing or invalid API key: send it in the x-api-key metadata or as 'authorization: Bearer <key>'"


class CallGuard(grpc.aio.ServerInterceptor):
    """What the HTTP middleware and protocol do for a request, done for every gRPC call, decided on its
    metadata before its message is received:

    - the API key: a call without a valid one is answered UNAUTHENTICATED by a handler that never reads the
      message (a unary handler receives the whole message first: keyless 8 MB calls took gigabytes);
    - the message must arrive within SERVE_REQUEST_READ_TIMEOUT_S, as an HTTP request must;
    - at most SERVE_GRPC_MAX_CALLS calls in progress per process. A call over it makes room by ending the
      call that has waited longest for its message (a slow or stalled client), as the HTTP protocol closes
      the longest-waiting connection; only when every call has its message is it refused with
      RESOURCE_EXHAUSTED. So 10,000 calls that never send their message cannot lock out a real client;
    - a request id, the access log line and the request metrics; a ServiceError becomes its status's code,
      anything else INTERNAL naming the request id (the traceback goes to the log).

    Every unary method is served as a stream-unary one for this: its handler reads the message itself."""

    def __init__(
        self,
        gate: Gate,
        metrics: Metrics,
        max_calls: int,
        read_timeout_s: float,
        tracing: Tracing | None = None,
    ):
        self.gate, self.metrics, self.max_calls, self.read_timeout_s = gate, metrics, max_calls, read_timeout_s
        self.tracing = tracing if tracing is not None and tracing.on else None
        self.waiting: dict[asyncio.Task, float] = {}  # calls waiting for their message, since when, oldest first
        self.working = 0  # calls with their message, being answered
        self.evicted: dict[asyncio.Task, tuple[str, str]] = {}  # waiting calls told to stop, with the reason
        self.sweeper: asyncio.Task | None = None  # started with the server (start_grpc)
        self.counters: dict[tuple[str, str], Any] = {}  # the metrics' labelled children, looked up once

    async def sweep(self) -> None:
        """End the calls whose message has not come within the read timeout, a few times a second (one task
        for all: a timer per call cost a twentieth of a small call)."""
        interval = min(0.25, self.read_timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.perf_counter()
            for task, since in list(self.waiting.items()):  # oldest first: stop at the first in time
                if now - since < self.read_timeout_s:
                    break
                self._evict(
                    task,
                    "DEADLINE_EXCEEDED",
                    f"the request message did not arrive within {self.read_timeout_s:g} s "
                    "(SERVE_REQUEST_READ_TIMEOUT_S); send it at once",
                )

    def _evict(self, task: asyncio.Task, code: str, why: str) -> None:
        self.waiting.pop(task, None)
        self.evicted[task] = (code, why)
        task.cancel()  # the call answers for itself, in _receive

    async def intercept_service(self, continuation, details):
        metadata = dict(details.invocation_metadata or ())
        handler = await continuation(details)  # finds the method's handler: nothing is read yet
        method = details.method if handler is not None else "unknown"  # no label per name a client makes up
        keys = {k.encode(): v.encode() for k, v in metadata.items() if isinstance(v, str)}
        if self.gate.api_keys and method not in OPEN_METHODS and not self.gate.has_valid_key(keys):

            async def refuse(requests, context) -> None:
                trim_soon()  # what grpc buffered of the unread message is freed: give it back
                await self._finish(
                    context, method, request_id_of(metadata), time.perf_counter(), ("UNAUTHENTICATED", UNAUTHENTICATED)
                )

            return grpc.stream_unary_rpc_method_handler(refuse)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler  # unknown (UNIMPLEMENTED), or the health service's Watch

        async def guarded(requests, context):
            request_id = request_id_of(metadata)
            remaining = context.time_remaining()  # the caller's deadline, if it set one
            # a little before it: the server gives up first and says why (DEADLINE_EXCEEDED, counted as expired)
            # rather than racing the caller's own cancellation
            deadline = time.monotonic() + remaining - min(0.02, remaining / 5) if remaining is not None else None
            call = CallContext(request_id, self.gate.client_key(keys) if self.gate.api_keys else None, deadline)
            CURRENT.set(call)
            if self.tracing is None:
                return await self._serve(handler.unary_unary, context, method, request_id)
            call.span = span = self.tracing.start_request(  # _finish sets its status code
                method, metadata, {"rpc.system": "grpc", "rpc.method": method}, request_id, raw=False
            )
            try:
                return await self._serve(handler.unary_unary, context, method, request_id)
            finally:
                self.tracing.end_request(span, method, {}, False)

        return grpc.stream_unary_rpc_method_handler(
            guarded, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )

    async def _serve(self, behavior: Callable[..., Awaitable[Any]], context, method: str, request_id: str):
        start = time.perf_counter()
        request = await self._receive(context, method, request_id, start)
        self.working += 1
        answer, failure = None, None
        try:
            answer = await behavior(request, context)
        except ServiceError as exc:
            failure = grpc_code_name(exc.status), str(exc)
        except Exception:
            log.exception("unhandled error in a gRPC call", extra={"request_id": request_id, "route": method})
            failure = "INTERNAL", f"internal error; quote request id {request_id} when reporting it"
        finally:
            self.working -= 1
            if request.ByteSize() > TRIM_AFTER_BYTES:
                trim_soon()
        del request  # aborted outside the except: the error caught holds frames with the message until a collection
        await self._finish(context, method, request_id, start, failure)
        return answer

    async def _receive(self, context, method: str, request_id: str, start: float):
        """The call's message, within the read timeout and the process's cap on calls."""
        if len(self.waiting) + self.working >= self.max_calls:
            if not self.waiting:
                await self._finish(
                    context,
                    method,
                    request_id,
                    start,
                    (
                        "RESOURCE_EXHAUSTED",
                        (
                            f"the server is answering its limit of {self.max_calls} gRPC calls (SERVE_GRPC_MAX_CALLS); "
                            "retry shortly"
                        ),
                    ),
                )
            self._evict(  # the longest-waiting call gives its place
                next(iter(self.waiting)),
                "UNAVAILABLE",
                (
                    f"this call waited longest for its message while the server holds its limit of "
                    f"{self.max_calls} gRPC calls (SERVE_GRPC_MAX_CALLS); send the message with the call, and retry"
                ),
            )
        task = asyncio.current_task()
        assert task is not None
        self.waiting[task] = start
        request, failure = None, None
        try:
            request = await context.read()
        except asyncio.CancelledError:
            failure = self.evicted.pop(task, None)
            if failure is None:
                raise
            task.uncancel()  # a cancelled handler alone would leave its call open: end it with a status
        except Exception:  # a message over the cap (RESOURCE_EXHAUSTED), a broken stream: what grpc held is freed
            trim_soon()
            raise
        finally:
            self.waiting.pop(task, None)
        if failure is None and request is grpc.aio.EOF:
            failure = "INVALID_ARGUMENT", "the call ended without its request message"
        if failure is not None:
            trim_soon()
            await self._finish(context, method, request_id, start, failure)
        return request

    async def _finish(
        self, context, method: str, request_id: str, start: float, failure: tuple[str, str] | None
    ) -> None:
        """The access log line and metrics of one call; with a failure, the call ends with its code."""
        code = failure[0] if failure else "OK"
        elapsed = time.perf_counter() - start
        counted = self.counters.get((method, code))
        if counted is None:
            counted = self.counters[(method, code)] = (
                self.metrics.requests.labels(method, "GRPC", code),
                self.metrics.latency.labels(method),
            )
        counted[0].inc()
        counted[1].observe(elapsed)
        trailing = [("x-request-id", request_id)]
        trace_id = None
        if self.tracing is not None and (span := self.tracing.current_span()) is not None:
            span.set_attribute("rpc.grpc.status_code", code)
            if code in SERVER_FAULTS:
                span.failed = True
            trace_id, traceresponse = span.ids()
            trailing.append(("traceresponse", traceresponse))
        log.info(
            "request",
            extra={
                "request_id": request_id,
                "method": "GRPC",
                "route": method,
                "path": method,
                "status": code,
                "latency_ms": round(elapsed * 1000, 2),
                "trace_id": trace_id,
            },
        )
        context.set_trailing_metadata(tuple(trailing))
        if failure is not None:
            await context.abort(grpc.StatusCode[failure[0]], failure[1])


async def start_grpc(
    plane: DataPlane, gate: Gate, metrics: Metrics, host: str, port: int, max_message_bytes: int
) -> grpc.aio.Server:
    """Serve the protocol and the standard health service on host:port (several workers share the port:
    grpc sets SO_REUSEPORT on Linux). A message is at most ``max_message_bytes`` (refused from its length
    prefix); calls in progress are capped per process (:class:`CallGuard`) and per connection."""
    settings = plane.registry.settings
    guard = CallGuard(
        gate,
        metrics,
        settings.grpc_max_calls,
        settings.request_read_timeout_s,
        plane.registry.tracing,
    )
    server = grpc.aio.server(  # grpc's own cap far above ours: only ours decides, by the rule above
        interceptors=[guard],
        maximum_concurrent_rpcs=4 * settings.grpc_max_calls,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_concurrent_streams", settings.grpc_max_calls_per_connection),
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    guard.sweeper = asyncio.create_task(guard.sweep(), name="grpc-read-timeouts")
    status = health_pb2.HealthCheckResponse.SERVING if plane.ready() else health_pb2.HealthCheckResponse.NOT_SERVING
    await health_servicer.set("", status)
    await health_servicer.set("inference.GRPCInferenceService", status)
    logging.getLogger("service.grpc").info("serving the v2 protocol over gRPC on %s:%d", host, port)
    return server
