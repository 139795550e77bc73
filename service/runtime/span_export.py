"""The span exporter: a child process of each server process that turns the spans it records into OTLP and
sends them (``python -m service.runtime.span_export``, started by :class:`service.runtime.tracing.Tracing`).

Why a process of its own: the SDK's Python encoder takes about 21 µs per span and the SDK's span objects as
much again to make, four spans per request, all under the server's interpreter lock. Here the server only
records plain tuples and pickles them down a pipe; this process builds the OTLP messages with the
OpenTelemetry project's own protobuf classes (``opentelemetry-proto``: each span copied from one made once per
route and status, or per batch, then given its own ids and times, under 2 µs a span) and posts them with the
SDK's OTLP/HTTP exporter, which reads its ``OTEL_EXPORTER_OTLP_*`` variables (endpoint, headers, timeout,
compression, certificates) and retries what a collector asks it to. Its ``requests`` session reads the
environment's proxy settings once, at the start (see :func:`session`).

Told the export batch size first (``{"batch_size": n}``), then reads lists of records
(service/runtime/offload.py) and reports ``(sent, failed)`` spans per export (the server counts them in
``trace_spans_*_total``). Records:

- ``("s", trace_id, span_id, parent_id, trace_state, remote, name, start_ns, end_ns, attributes, failed,
  models)``: a request's server span and, for each ``(model, version, enqueued_ns, timings)`` in ``models``,
  its ``queue``, ``batch`` and ``forward`` spans for each ``(size, started_ns, run_started_ns, run_ended_ns,
  ended_ns)`` of the batches it ran in;
- ``("m", trace_id, parent_id, trace_state, model, version, enqueued_ns, timings)``: model spans recorded
  after the request's own span ended (a stream's last steps).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as ResourceMessage
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from service.runtime.offload import serve_records

if TYPE_CHECKING:
    import requests

SCOPE = InstrumentationScope(name="service")
SERVICE_NAME = "course-models"  # unless OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES) names it
SAMPLED = 0x01
HAS_IS_REMOTE, IS_REMOTE = 0x100, 0x200  # OTLP's span flags: whether the parent was a caller's
LOCAL_CHILD = SAMPLED | HAS_IS_REMOTE
QUEUE = Span(flags=LOCAL_CHILD, name="queue", kind=Span.SPAN_KIND_INTERNAL)  # copied, as the other spans are
REQUEST_ID = "request.id"  # the one attribute of a request's span that differs from request to request


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


def set_attributes(into: Any, attributes: dict[str, Any]) -> None:
    """``attributes`` added to a span's repeated field in place (a third of the cost of making KeyValues)."""
    for key, value in attributes.items():
        pair = into.add()
        pair.key = key
        if isinstance(value, str):
            pair.value.string_value = value
        elif isinstance(value, bool):
            pair.value.bool_value = value
        elif isinstance(value, int):
            pair.value.int_value = value
        else:
            pair.value.CopyFrom(any_value(value))


def spans_in(record: tuple) -> int:
    """How many spans a record sent to the exporter becomes: a request's own (``"s"``) and three per batch its
    model ran in (``queue``, ``batch``, ``forward``), for each model entry it carries (``"m"``: one entry)."""
    if record[0] == "s":
        return 1 + 3 * sum(len(model[-1]) for model in record[-1])
    return 3 * len(record[-1])


def span_id() -> bytes:
    return random.getrandbits(64).to_bytes(8, "big")


class Batches:
    """Spans added one record at a time into OTLP export requests of at most ``size`` spans each."""

    def __init__(self, resource: ResourceMessage, size: int):
        self.resource, self.size = resource, size
        self.full: list[ExportTraceServiceRequest] = []
        self._attributes: dict[tuple, list[KeyValue]] = {}  # a model span's attributes, made once per kind
        self._batches: dict[tuple, tuple[Span, Span]] = {}
        self._servers: dict[tuple, Span] = {}  # a request's span but for what is its own
        self._new()

    def _new(self) -> None:
        self.request = ExportTraceServiceRequest()
        self.spans = self.request.resource_spans.add(resource=self.resource).scope_spans.add(scope=SCOPE).spans
        self.count = 0

    def _room(self, spans: int) -> Any:
        """The repeated field to add ``spans`` spans to (a new request's when this one would pass ``size``)."""
        if self.count and self.count + spans > self.size:
            self.full.append(self.request)
            self._new()
        self.count += spans
        return self.spans

    def take(self) -> list[ExportTraceServiceRequest]:
        """Every request made so far (the one being filled too); starts afresh."""
        taken = [*self.full, self.request] if self.count else self.full
        self.full = []
        self._new()
        return taken

    def add(self, record: tuple) -> None:
        if record[0] == "m":
            _, trace_id, parent_id, trace_state, *model = record
            spans = self._room(spans_in(record))
            self._model_spans(spans, trace_id.to_bytes(16, "big"), parent_id.to_bytes(8, "big"), trace_state, *model)
            return
        _, trace_id, own_id, parent_id, trace_state, remote, name, start_ns, end_ns, attributes, failed, models = record
        spans = self._room(spans_in(record))
        trace_bytes, own_bytes = trace_id.to_bytes(16, "big"), own_id.to_bytes(8, "big")
        span = spans.add()
        span.CopyFrom(self._server_prototype(name, attributes, failed))
        span.trace_id, span.span_id = trace_bytes, own_bytes
        span.start_time_unix_nano, span.end_time_unix_nano = start_ns, end_ns
        if parent_id:
            span.parent_span_id = parent_id.to_bytes(8, "big")
            span.flags = LOCAL_CHILD | (IS_REMOTE if remote else 0)
        if trace_state:
            span.trace_state = trace_state
        if REQUEST_ID in attributes:
            set_attributes(span.attributes, {REQUEST_ID: attributes[REQUEST_ID]})
        for model in models:
            self._model_spans(spans, trace_bytes, own_bytes, trace_state, *model)

    def _model_spans(
        self,
        spans: Any,
        trace_bytes: bytes,
        parent_bytes: bytes,
        trace_state: str,
        model: str,
        version: str,
        enqueued_ns: int,
        timings: list[tuple[int, int, int, int, int]],
    ) -> None:
        """``queue`` and ``batch`` under the request's span, ``forward`` under ``batch``, for each batch."""
        for timing in timings:
            batch, forward = self._prototypes(model, version, timing)
            batch_id = span_id()
            for prototype, own_id, parent in (
                (QUEUE, span_id(), parent_bytes),
                (batch, batch_id, parent_bytes),
                (forward, span_id(), batch_id),
            ):
                made = spans.add()
                made.CopyFrom(prototype)
                made.trace_id, made.span_id, made.parent_span_id = trace_bytes, own_id, parent
                if trace_state:
                    made.trace_state = trace_state
            queue = spans[-3]  # from the request's arrival to its batch being taken off the queue
            queue.start_time_unix_nano, queue.end_time_unix_nano = enqueued_ns, timing[1]

    def _server_prototype(self, name: str, attributes: dict[str, Any], failed: bool) -> Span:
        """A request's span but for its ids, times and request id: the same for every request to a route that
        answered with the same status, made once and copied (a third of what making it costs). Paths a client
        makes up (404s) come and go: the cache is bounded."""
        shared = tuple((k, v) for k, v in attributes.items() if k != REQUEST_ID)

        def make() -> Span:
            made = Span(flags=LOCAL_CHILD, name=name, kind=Span.SPAN_KIND_SERVER)
            set_attributes(made.attributes, dict(shared))
            if failed:
                made.status.code = Status.STATUS_CODE_ERROR
            return made

        return cached(self._servers, (name, failed, shared), make, 10_000)

    def _prototypes(self, model: str, version: str, timing: tuple) -> tuple[Span, Span]:
        """One batch's ``batch`` and ``forward`` spans but for their ids, made once and copied into the trace of
        each request it served (a copy costs half of making one). A chunk of records spans a few batches: the
        cache never holds more than 1,000."""
        size, started_ns, run_started_ns, run_ended_ns, ended_ns = timing

        def make() -> tuple[Span, Span]:
            batch, forward = (
                Span(
                    flags=LOCAL_CHILD,
                    name=name,
                    kind=Span.SPAN_KIND_INTERNAL,
                    start_time_unix_nano=start_ns,
                    end_time_unix_nano=end_ns,
                    attributes=self._model_attributes(model, named_version, size),
                )
                for name, start_ns, end_ns, named_version in (
                    ("batch", started_ns, ended_ns, version),
                    ("forward", run_started_ns, run_ended_ns, None),
                )
            )
            return batch, forward

        return cached(self._batches, (model, version, timing), make, 1000)

    def _model_attributes(self, model: str, version: str | None, size: int) -> list[KeyValue]:
        """A model span's attributes, made once per kind (versions come and go: the cache is bounded)."""
        named = {"model.name": model, **({"model.version": version} if version else {}), "batch.size": size}
        return cached(self._attributes, (model, version, size), lambda: key_values(named), 10_000)


def cached(cache: dict, key: Any, make: Callable[[], Any], limit: int) -> Any:
    """``cache[key]``, made by ``make()`` the first time; past ``limit`` entries the cache starts afresh."""
    found = cache.get(key)
    if found is None:
        if len(cache) >= limit:
            cache.clear()
        found = cache[key] = make()
    return found


def resource() -> ResourceMessage:
    """The SDK's resource for this service: OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES and the SDK's own."""
    from opentelemetry.sdk.resources import Resource

    made = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE_NAME)})
    return ResourceMessage(attributes=key_values(dict(made.attributes)))


def session() -> requests.Session | None:
    """The exporter's HTTP session, reading the environment's proxy settings once rather than at every POST (as
    ``requests`` does: its two scans of the whole environment were about a quarter of what a POST cost; the CA
    bundle variables are read once too, in :func:`exporter`), or None where a credential provider
    (OTEL_PYTHON_EXPORTER_OTLP_HTTP_*CREDENTIAL_PROVIDER) makes the SDK's session."""
    if any(name.endswith("_CREDENTIAL_PROVIDER") for name in os.environ if name.startswith("OTEL_PYTHON_EXPORTER_")):
        return None
    import requests

    made = requests.Session()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    made.proxies = requests.utils.get_environ_proxies(endpoint)  # HTTP(S)_PROXY, unless NO_PROXY names its host
    made.trust_env = False
    return made


def exporter(settings: dict[str, int]) -> tuple[Callable[[list], Iterator[tuple[int, int]]], Callable[[], None]]:
    """Records in, OTLP export requests out, posted by the SDK's exporter (its settings from OTEL_EXPORTER_OTLP_*
    variables)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    http = session()
    sdk_exporter = OTLPSpanExporter(session=http)
    if http is not None and http.verify is True:  # no OTEL_EXPORTER_OTLP_*CERTIFICATE: requests' own variables
        http.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    # The exporter's export() takes the SDK's span objects and encodes them itself, at the cost this process
    # exists to avoid; its HTTP client (retries, headers, compression) sends the bytes built here.
    client = sdk_exporter._client
    batches = Batches(resource(), settings["batch_size"])  # OTEL_BSP_MAX_EXPORT_BATCH_SIZE, read by the server

    def export(records: list) -> Iterator[tuple[int, int]]:
        for record in records:
            batches.add(record)
        for request in batches.take():
            spans = len(request.resource_spans[0].scope_spans[0].spans)
            yield (spans, 0) if client.export(request.SerializeToString()).success else (0, spans)

    return export, sdk_exporter.shutdown


if __name__ == "__main__":
    serve_records(exporter)
