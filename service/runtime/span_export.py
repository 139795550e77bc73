"""The span exporter: a child process of each server process that turns the spans it records into OTLP and
sends them (``python -m service.runtime.span_export``, started by :class:`service.runtime.tracing.Tracing`).

Why a process of its own: the SDK's Python encoder takes about 21 µs per span and the SDK's span objects as
much again to make, four spans per request, all under the server's interpreter lock. Here the server only
records plain tuples and pickles them down a pipe; this process builds the OTLP messages with the
OpenTelemetry project's own protobuf classes (``opentelemetry-proto``, about 3 µs a span) and posts them with
the SDK's OTLP/HTTP exporter, which reads its ``OTEL_EXPORTER_OTLP_*`` variables (endpoint, headers,
timeout, compression, certificates) and retries what a collector asks it to.

Reads lists of records (service/runtime/offload.py) and reports ``(sent, failed)`` spans per export (the
server counts them in ``trace_spans_*_total``). Records:

- ``("s", trace_id, span_id, parent_id, trace_state, remote, name, start_ns, end_ns, attributes, failed)``:
  a request's server span;
- ``("m", trace_id, parent_id, trace_state, model, version, enqueued_ns, timings)``: its ``queue``,
  ``batch`` and ``forward`` spans for each ``(size, started_ns, run_started_ns, run_ended_ns, ended_ns)``
  of the batches it ran in.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as ResourceMessage
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from service.runtime.offload import serve_records

SCOPE = InstrumentationScope(name="service")
SERVICE_NAME = "course-models"  # unless OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES) names it
SAMPLED = 0x01
HAS_IS_REMOTE, IS_REMOTE = 0x100, 0x200  # OTLP's span flags: whether the parent was a caller's
LOCAL_CHILD = SAMPLED | HAS_IS_REMOTE
BATCH_SIZE_VARIABLE, DEFAULT_BATCH_SIZE = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512


def any_value(value: Any) -> AnyValue:
    if isinstance(value, bool):  # before int: a bool is one
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, list | tuple):
        return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in value]))
    return AnyValue(string_value=str(value))


def key_values(attributes: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in attributes.items()]


def span_id() -> bytes:
    return random.getrandbits(64).to_bytes(8, "big")


class Batches:
    """Spans added one record at a time into OTLP export requests of at most ``size`` spans each."""

    def __init__(self, resource: ResourceMessage, size: int):
        self.resource, self.size = resource, size
        self.full: list[ExportTraceServiceRequest] = []
        self._attributes: dict[tuple, list[KeyValue]] = {}  # a model span's attributes, made once per kind
        self._new()

    def _new(self) -> None:
        self.request = ExportTraceServiceRequest()
        self.spans = self.request.resource_spans.add(resource=self.resource).scope_spans.add(scope=SCOPE).spans
        self.count = 0

    def _span(self, **fields: Any) -> Span:
        if self.count == self.size:
            self.full.append(self.request)
            self._new()
        self.count += 1
        return self.spans.add(**fields)

    def take(self) -> list[ExportTraceServiceRequest]:
        """Every request made so far (the one being filled too); starts afresh."""
        taken = [*self.full, self.request] if self.count else self.full
        self.full = []
        self._new()
        return taken

    def add(self, record: tuple) -> None:
        if record[0] == "s":
            _, trace_id, own_id, parent_id, trace_state, remote, name, start_ns, end_ns, attributes, failed = record
            span = self._span(
                trace_id=trace_id.to_bytes(16, "big"),
                span_id=own_id.to_bytes(8, "big"),
                parent_span_id=parent_id.to_bytes(8, "big") if parent_id else b"",
                trace_state=trace_state,
                flags=LOCAL_CHILD | (IS_REMOTE if remote else 0),
                name=name,
                kind=Span.SPAN_KIND_SERVER,
                start_time_unix_nano=start_ns,
                end_time_unix_nano=end_ns,
                status=Status(code=Status.STATUS_CODE_ERROR) if failed else None,
            )
            span.attributes.extend(key_values(attributes))
            return
        _, trace_id, parent_id, trace_state, model, version, enqueued_ns, timings = record
        trace_bytes, parent_bytes = trace_id.to_bytes(16, "big"), parent_id.to_bytes(8, "big")
        common = {
            "trace_id": trace_bytes,
            "trace_state": trace_state,
            "flags": LOCAL_CHILD,
            "kind": Span.SPAN_KIND_INTERNAL,
        }
        for size, started_ns, run_started_ns, run_ended_ns, ended_ns in timings:
            self._span(
                span_id=span_id(),
                parent_span_id=parent_bytes,
                name="queue",
                start_time_unix_nano=enqueued_ns,
                end_time_unix_nano=started_ns,
                **common,
            )
            batch_id = span_id()
            batch = self._span(
                span_id=batch_id,
                parent_span_id=parent_bytes,
                name="batch",
                start_time_unix_nano=started_ns,
                end_time_unix_nano=ended_ns,
                **common,
            )
            batch.attributes.extend(self._model_attributes(model, version, size))
            forward = self._span(
                span_id=span_id(),
                parent_span_id=batch_id,
                name="forward",
                start_time_unix_nano=run_started_ns,
                end_time_unix_nano=run_ended_ns,
                **common,
            )
            forward.attributes.extend(self._model_attributes(model, None, size))

    def _model_attributes(self, model: str, version: str | None, size: int) -> list[KeyValue]:
        key = (model, version, size)
        found = self._attributes.get(key)
        if found is None:
            named = {"model.name": model, **({"model.version": version} if version else {}), "batch.size": size}
            found = self._attributes[key] = key_values(named)
            if len(self._attributes) > 10_000:  # versions come and go: never grow without end
                self._attributes.clear()
        return found


def resource() -> ResourceMessage:
    """The SDK's resource for this service: OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES and the SDK's own."""
    from opentelemetry.sdk.resources import Resource

    made = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE_NAME)})
    return ResourceMessage(attributes=key_values(dict(made.attributes)))


def main() -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter()
    # The exporter's export() takes the SDK's span objects and encodes them itself, at the cost this process
    # exists to avoid; its HTTP client (retries, headers, compression) sends the bytes built here.
    client = exporter._client
    batches = Batches(resource(), int(os.environ.get(BATCH_SIZE_VARIABLE) or DEFAULT_BATCH_SIZE))

    def export(records: list[tuple]) -> Iterator[tuple[int, int]]:
        for record in records:
            batches.add(record)
        for request in batches.take():
            spans = len(request.resource_spans[0].scope_spans[0].spans)
            yield (spans, 0) if client.export(request.SerializeToString()).success else (0, spans)

    serve_records(export, exporter.shutdown)


if __name__ == "__main__":
    main()
