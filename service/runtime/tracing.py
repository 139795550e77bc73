"""OpenTelemetry traces, configured the standard way (the ``OTEL_*`` variables) and off unless an OTLP endpoint is set.

One span per request (the HTTP middleware, the gRPC call guard) and, under it, the request's path through its
model: ``queue`` (waiting for a place in a batch), ``batch`` (that forward pass as a whole, with the model,
the version and the batch size) and ``forward`` under it (the model's own work on its worker thread: decoding
uploads, preprocessing, the net). The model's spans are made after the fact from the times the batcher
records for every batch, so the batcher itself knows nothing of tracing and a batch shared by 64 requests is
timed once. A caller's ``traceparent`` (any propagator OTEL_PROPAGATORS names) is honoured: the request's
spans join the caller's trace; the trace id goes back in a ``traceresponse`` header and into the access log.

What a span costs the server is what decides this design. The SDK's own spans cost about 22 µs each to make
and 21 µs to encode, four per request, under the interpreter lock the requests need: a third of what the
server could serve. So the request's span here is a small object of its own, sampled by the SDK's sampler
(OTEL_TRACES_SAMPLER; a request without a caller's context is sampled without a call where the sampler
samples every such request), and a finished span is a tuple appended to a queue, marshalled down a pipe in
batches to a child process (service/runtime/offload.py, span_export.py) that builds the OTLP messages and
posts them. The queue is bounded (OTEL_BSP_MAX_QUEUE_SIZE records) and sent when it holds
OTEL_BSP_MAX_EXPORT_BATCH_SIZE records or every OTEL_BSP_SCHEDULE_DELAY ms; a full queue or a dead exporter
drops spans, counted in ``trace_spans_dropped_total{reason}``, never a request's time.

Off (no endpoint), every method returns at its first line: the hot path pays one attribute check.
"""

from __future__ import annotations

import logging
import marshal
import os
import random
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter

from service.runtime.context import CURRENT
from service.runtime.offload import ChildPipe
from service.runtime.span_export import spans_in

if TYPE_CHECKING:
    from service.runtime.metrics import Metrics

log = logging.getLogger("service.tracing")

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
SUPPORTED_PROTOCOL = "http/protobuf"
# the batching span processor's variables, with the SDK's defaults (the queue's size counts records: a request's
# own span, or its model's three)
BSP_DEFAULTS = {"OTEL_BSP_MAX_QUEUE_SIZE": 2048, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 512, "OTEL_BSP_SCHEDULE_DELAY": 5000}
EMPTY = Context()
IDS_AT_ONCE = 256  # new traces whose ids are drawn at once (see Tracing._draw_ids)


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


class RequestSpan:
    """One request's server span: its ids, its caller's, and what it records (only if ``sampled``)."""

    __slots__ = (
        "traceparent",
        "parent_id",
        "trace_state",
        "sampled",
        "start_ns",
        "attributes",
        "request_id",
        "failed",
        "models",
    )

    def __init__(
        self,
        traceparent: str,
        parent_id: int,
        trace_state: str,
        sampled: bool,
        attributes: dict[str, Any] | None,
        request_id: str,
    ):
        # ``traceparent``: this span as a W3C traceparent value. Every answer carries it (as traceresponse, level
        # 2: the server's span in place of the caller's), and so does the request's payload record. ``attributes``:
        # those known at its start (None: the HTTP middleware gives them all at its end)
        self.traceparent, self.parent_id, self.trace_state, self.sampled = traceparent, parent_id, trace_state, sampled
        self.start_ns, self.attributes, self.request_id, self.failed = time.time_ns(), attributes, request_id, False
        # its model's spans, sent with its own (one record per request); None once it has ended
        self.models: list[tuple] | None = []

    @property
    def trace_id(self) -> int:
        return int(self.traceparent[3:35], 16)

    def set_attribute(self, key: str, value: Any) -> None:
        if self.attributes is None:
            self.attributes = {}
        self.attributes[key] = value

    def ids(self) -> tuple[str, str]:
        """The trace id (for the log line) and the ``traceresponse`` header value."""
        return self.traceparent[3:35], self.traceparent


class Tracing:
    """The tracer of one server process: :meth:`start` after the fork (its exporter process),
    :meth:`stop` sends what is left."""

    def __init__(self, environ: Mapping[str, str], metrics: Metrics | None = None):
        endpoint = next((environ[v] for v in ENDPOINT_VARIABLES if environ.get(v)), None)
        disabled = environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        exporter = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
        self.on = bool(endpoint) and not disabled and exporter != "none"
        self.endpoint = endpoint
        self.metrics = metrics
        self.sampler: Any = None
        # the SDK's default sampler, and always_on, sample every request that has no caller's context: such a
        # request is sampled without asking (the sampler's call was a tenth of what tracing cost a request)
        sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
        self._roots_sampled = sampler in ("always_on", "parentbased_always_on")
        self._new_ids: list[str] = []  # traceparents for new traces, drawn in advance (_draw_ids)
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
        bsp = {name: int(environ.get(name) or default) for name, default in BSP_DEFAULTS.items()}
        self._pipe = ChildPipe(
            "service.runtime.span_export",
            capacity=bsp["OTEL_BSP_MAX_QUEUE_SIZE"],
            batch=bsp["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"],
            delay_s=bsp["OTEL_BSP_SCHEDULE_DELAY"] / 1000,
            on_report=self._spans_sent,
            on_dropped=self._dropped,
            greeting={"batch_size": bsp["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"]},
            encode=marshal.dumps,  # plain values: half of what pickling them costs (span_export reads them so)
        )
        # the headers the propagators read (traceparent, tracestate, baggage): a request with none of them has no
        # caller's context to extract
        self._fields = frozenset(propagate.get_global_textmap().fields)
        self._raw_fields = frozenset(f.encode("latin-1") for f in self._fields)

    @classmethod
    def from_environment(cls, metrics: Metrics | None = None) -> Tracing:
        return cls(os.environ, metrics)

    def start(self) -> None:
        """The SDK's sampler (OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG) and the exporter process."""
        if not self.on:
            return
        from opentelemetry.sdk.trace import TracerProvider

        self.sampler = TracerProvider(shutdown_on_exit=False).sampler
        self._new_ids = []  # none drawn before a fork: each worker draws its own
        self._pipe.start()
        log.info("tracing: spans go to %s over OTLP/HTTP (sampler %s)", self.endpoint, self.sampler.get_description())

    def stop(self) -> None:
        if self.on:
            self._pipe.stop()

    # -- one request (on the event loop) ------------------------------------------------------------------

    def start_request(
        self, name: str, carrier: Mapping, attributes: dict[str, Any] | None, request_id: str, raw: bool = True
    ) -> RequestSpan:
        """A server span for one request, a child of the caller's context if it sent one (``carrier``: the
        request's headers, raw (bytes) as ASGI has them, or else gRPC's metadata). ``attributes``: those its
        route shares with other requests (the exporter encodes them once per route), or None where they all come
        with :meth:`end_request`; ``request_id`` its own. The caller keeps it on the request's CallContext, where the
        model's spans and the payload record find it."""
        if raw:
            parent = (
                propagate.extract(carrier, getter=RAW_HEADERS) if not self._raw_fields.isdisjoint(carrier) else None
            )
        else:
            parent = propagate.extract(carrier) if not self._fields.isdisjoint(carrier) else None
        if parent is None:
            if self._roots_sampled:  # a new trace, sampled: its ids drawn in advance
                if not self._new_ids:
                    self._draw_ids()
                return RequestSpan(self._new_ids.pop(), 0, "", True, attributes, request_id)
            parent = EMPTY
        caller = trace.get_current_span(parent).get_span_context()
        trace_id = caller.trace_id if caller.is_valid else random.getrandbits(128)
        sampled = self.sampler.should_sample(parent, trace_id, name, trace.SpanKind.SERVER, attributes).decision
        return RequestSpan(
            f"00-{trace_id:032x}-{random.getrandbits(64):016x}-{'01' if sampled.is_sampled() else '00'}",
            caller.span_id if caller.is_valid else 0,
            caller.trace_state.to_header() if caller.is_valid else "",
            sampled.is_sampled(),
            attributes,
            request_id,
        )

    def _draw_ids(self) -> None:
        """The traceparents of the next IDS_AT_ONCE new traces (a trace id and a span id each, sampled): one random
        number and one hex encoding for all of them, rather than a draw, a conversion to bytes and an encoding per
        request on the event loop."""
        digits = random.getrandbits(IDS_AT_ONCE * 192).to_bytes(IDS_AT_ONCE * 24, "big").hex()
        self._new_ids = [f"00-{digits[i : i + 32]}-{digits[i + 32 : i + 48]}-01" for i in range(0, len(digits), 48)]

    def end_request(self, span: RequestSpan, name: str, attributes: dict[str, Any], failed: bool) -> None:
        models, span.models = span.models, None
        if span.sampled and models is not None:  # (None: it has ended already)
            if span.attributes:
                attributes = {**span.attributes, **attributes}
            self._pipe.put(
                ("s", span.traceparent, span.parent_id, span.trace_state, name, span.start_ns, time.time_ns(),
                 attributes, span.request_id, failed or span.failed, models)
            )  # fmt: skip

    @staticmethod
    def current_span() -> RequestSpan | None:
        """The current request's span, or None (tracing off, or a caller in process)."""
        call = CURRENT.get()
        return call.span if call is not None else None

    def model_spans(self, model: str, version: str, enqueued_ns: int, batches: list) -> None:
        """The request's ``queue``, ``batch`` and ``forward`` spans under its span, from the times the batcher
        recorded (a request of several items may have run in several batches: a set for each)."""
        call = CURRENT.get()
        span = call.span if call is not None else None
        if span is None or not span.sampled:  # an in-process caller, or the sampler said no
            return
        # a batch's times, one tuple that its requests share (written once in a frame, as the exporter needs it)
        if len(batches) == 1:
            timings = [batches[0].as_tuple()] if batches[0] is not None else []
        else:
            timings = [b.as_tuple() for b in {id(b): b for b in batches}.values() if b is not None]
        if span.models is not None:
            span.models.append((model, version, enqueued_ns, timings))
        else:  # after its answer (a stream's last steps): on their own
            self._pipe.put(("m", span.traceparent, span.trace_state, model, version, enqueued_ns, timings))

    def _spans_sent(self, report: tuple[int, int]) -> None:
        sent, failed = report
        if self.metrics is not None:
            self.metrics.spans_sent.inc(sent)
            self.metrics.spans_dropped.labels("export_error").inc(failed)
        if failed:
            self._pipe.warn(f"{self.endpoint} did not take {failed} spans (the exporter's log says why)")

    def _dropped(self, reason: str, records: list[tuple]) -> None:
        spans = sum(spans_in(record) for record in records)
        if self.metrics is not None:
            self.metrics.spans_dropped.labels(reason).inc(spans)
        self._pipe.warn(f"dropped {spans} spans ({reason}): the span exporter cannot keep up or is not running")
