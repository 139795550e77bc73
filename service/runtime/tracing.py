"""OpenTelemetry traces, configured the standard way (the ``OTEL_*`` variables) and off unless an OTLP endpoint is set.

One span per request (the HTTP middleware, the gRPC call guard) and, under it, the request's path through its
model: ``queue`` (waiting for a place in a batch), ``batch`` (that forward pass as a whole, with the model,
the version and the batch size) and ``forward`` under it (the model's own work on its worker thread: decoding
uploads, preprocessing, the net). The model's spans are made after the fact from the times the batcher
records for every batch, so the batcher itself knows nothing of tracing and a batch shared by 64 requests is
timed once. A caller's W3C ``traceparent`` is honoured (the request's spans join the caller's trace); the
trace id goes back in a ``traceresponse`` header and into the access log line.

Off (no endpoint), every method returns at its first line: the hot path pays one attribute check.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.propagators.textmap import Getter

log = logging.getLogger("service.tracing")

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
SUPPORTED_PROTOCOL = "http/protobuf"


class _RawHeaders(Getter[Mapping[bytes, bytes]]):
    """Reads a propagator's headers (``traceparent``, ``tracestate``, ...) from ASGI's raw header bytes, decoding
    only those it asks for."""

    def get(self, carrier: Mapping[bytes, bytes], key: str) -> list[str] | None:
        value = carrier.get(key.encode("latin-1"))
        return None if value is None else [value.decode("latin-1")]

    def keys(self, carrier: Mapping[bytes, bytes]) -> list[str]:
        return [k.decode("latin-1") for k in carrier]


RAW_HEADERS = _RawHeaders()


class TracingConfigError(ValueError):
    """The OTEL_* variables ask for something this server cannot do (stops the start, saying what to set)."""


class Tracing:
    """The tracer of one server process: :meth:`start` after the fork (the exporter's thread), :meth:`stop`
    flushes what is left."""

    def __init__(self, environ: Mapping[str, str]):
        endpoint = next((environ[v] for v in ENDPOINT_VARIABLES if environ.get(v)), None)
        disabled = environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        exporter = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
        self.on = bool(endpoint) and not disabled and exporter != "none"
        self.endpoint = endpoint
        self.tracer: Any = None
        self._provider: Any = None
        if not self.on:
            return
        if exporter != "otlp":
            raise TracingConfigError(f"OTEL_TRACES_EXPORTER={exporter!r}: this server exports traces with otlp only")
        protocol = next((environ[v] for v in PROTOCOL_VARIABLES if environ.get(v)), SUPPORTED_PROTOCOL)
        if protocol.strip().lower() != SUPPORTED_PROTOCOL:
            raise TracingConfigError(
                f"OTLP protocol {protocol!r}: this server sends traces over {SUPPORTED_PROTOCOL} (OTLP/HTTP); unset "
                "OTEL_EXPORTER_OTLP_PROTOCOL or point the endpoint at the collector's OTLP/HTTP port (4318)"
            )

    @classmethod
    def from_environment(cls) -> Tracing:
        return cls(os.environ)

    def start(self) -> None:
        """The provider, its batching processor and the OTLP/HTTP exporter, each reading its OTEL_* variables
        (service name, resource attributes, sampler, headers, timeouts, queue sizes)."""
        if not self.on or self._provider is not None:
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "course-models")})
        self._provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self._provider.get_tracer("service")
        log.info("tracing: spans go to %s over OTLP/HTTP", self.endpoint)

    def stop(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()  # exports what is queued
            self._provider = self.tracer = None

    # -- one request -----------------------------------------------------------------------------------

    def start_request(self, name: str, carrier: Mapping, attributes: dict[str, Any]) -> tuple[Any, Any]:
        """A server span for one request, a child of the caller's ``traceparent`` if it sent one, made the
        current span (the model's spans find it there); returns it and the token that :meth:`end_request`
        needs to restore the context. ``carrier``: the request's headers, raw (bytes) or gRPC's metadata."""
        getter = RAW_HEADERS if carrier and isinstance(next(iter(carrier)), bytes) else None
        parent = propagate.extract(carrier, getter=getter) if getter else propagate.extract(carrier)
        span = self.tracer.start_span(name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes)
        return span, context.attach(trace.set_span_in_context(span))

    @staticmethod
    def end_request(span: Any, token: Any, name: str, attributes: dict[str, Any], failed: bool) -> None:
        span.update_name(name)
        span.set_attributes(attributes)
        if failed:
            Tracing.failed(span)
        span.end()
        context.detach(token)

    @staticmethod
    def failed(span: Any) -> None:
        span.set_status(trace.StatusCode.ERROR)

    def current_span(self) -> Any:
        """The current request's span, or None (tracing off, or not sampled)."""
        span = trace.get_current_span() if self.on else None
        return span if span is not None and span.is_recording() else None

    @staticmethod
    def ids(span: Any) -> tuple[str, str]:
        """The span's trace id (for the log line) and its ``traceresponse`` header value (W3C Trace Context
        level 2: the server span's id in place of the parent's)."""
        ctx = span.get_span_context()
        trace_id = f"{ctx.trace_id:032x}"
        return trace_id, f"00-{trace_id}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def traceparent(self) -> str | None:
        """The current span as a ``traceparent`` value (payload records carry it), or None."""
        if not self.on:
            return None
        ctx = trace.get_current_span().get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}" if ctx.is_valid else None

    def model_spans(self, model: str, version: str, enqueued_ns: int, batches: list) -> None:
        """The request's ``queue``, ``batch`` and ``forward`` spans under the current span, from the times the
        batcher recorded (a request of several items may have run in several batches: a pair for each)."""
        parent = trace.get_current_span()
        if not parent.is_recording():  # no request span (an in-process caller), or the sampler said no
            return
        here = trace.set_span_in_context(parent)
        for batch in {id(b): b for b in batches if b is not None}.values():
            self.tracer.start_span("queue", context=here, start_time=enqueued_ns).end(end_time=batch.started_ns)
            span = self.tracer.start_span(
                "batch",
                context=here,
                start_time=batch.started_ns,
                attributes={"model.name": model, "model.version": version, "batch.size": batch.size},
            )
            forward = self.tracer.start_span(
                "forward",
                context=trace.set_span_in_context(span),
                start_time=batch.run_started_ns,
                attributes={"model.name": model, "batch.size": batch.size},
            )
            forward.end(end_time=batch.run_ended_ns)
            span.end(end_time=batch.ended_ns)
