"""The span exporter: a child process of each server process that turns the spans it records into OTLP and
sends them (``python -m service.runtime.span_export``, started by :class:`service.runtime.tracing.Tracing`).

Why a process of its own: the SDK's Python encoder takes about 21 µs per span and the SDK's span objects as
much again to make, four spans per request, all under the server's interpreter lock. Here the server only
records plain tuples and marshals them down a pipe; this process encodes the OTLP messages (each span the
protobuf bytes of one made once per route and status, or per batch, with the OpenTelemetry project's own
classes, ``opentelemetry-proto``, followed by the fields that are its own: see :class:`Batches`) and posts them
with the SDK's OTLP/HTTP exporter, which reads its ``OTEL_EXPORTER_OTLP_*`` variables (endpoint, headers, timeout,
compression, certificates) and retries what a collector asks it to, over urllib3 to a plain ``http://``
collector, else over a ``requests`` session that reads the environment's proxy settings once, at the start (see
:func:`http_client`).

Told the export batch size first (``{"batch_size": n}``), then reads lists of records
(service/runtime/offload.py) and reports ``(sent, failed)`` spans per export (the server counts them in
``trace_spans_*_total``). Records (marshalled: plain values):

- ``("s", traceparent, parent_id, trace_state, name, start_ns, end_ns, attributes, request_id, failed, models)``:
  a request's server span (its trace and span ids in ``traceparent``, its caller's span id in ``parent_id``, 0
  for none; ``attributes`` those it shares with its route's other requests) and, for each ``(model, version,
  enqueued_ns, timings)`` in ``models``, its ``queue``, ``batch`` and ``forward`` spans for each ``(size,
  started_ns, run_started_ns, run_ended_ns, ended_ns)`` of the batches it ran in;
- ``("m", traceparent, trace_state, model, version, enqueued_ns, timings)``: model spans recorded after the
  request's own span ended (a stream's last steps).
"""

from __future__ import annotations

import marshal
import os
import random
import struct
from collections.abc import Callable, Iterator
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as ResourceMessage
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from service.runtime.offload import serve_records

SCOPE = InstrumentationScope(name="service")
SERVICE_NAME = "course-models"  # unless OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES) names it
SAMPLED = 0x01
HAS_IS_REMOTE, IS_REMOTE = 0x100, 0x200  # OTLP's span flags: whether the parent was a caller's
LOCAL_CHILD = SAMPLED | HAS_IS_REMOTE
QUEUE = Span(flags=LOCAL_CHILD, name="queue", kind=Span.SPAN_KIND_INTERNAL).SerializeToString()  # as the others
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
    if record[0] == "m":
        return 3 * len(record[-1])
    models = record[-1]
    if len(models) == 1:  # the usual: without a generator's frame (2 k of this process's 38 k instructions a request)
        return 1 + 3 * len(models[0][-1])
    return 1 + 3 * sum(len(model[-1]) for model in models)


def varint(size: int) -> bytes:
    """A length in protobuf's varint encoding."""
    encoded = bytearray()
    while size > 0x7F:
        encoded.append(size & 0x7F | 0x80)
        size >>= 7
    encoded.append(size)
    return bytes(encoded)


VARINTS = [varint(n) for n in range(1 << 14)]  # every length a span has (two bytes at most), encoded once
TIMES = struct.Struct("<BQBQ")  # a span's start_time_unix_nano (field 7) and end_time_unix_nano (8): fixed64
REMOTE_FLAGS = b"\x85\x01" + struct.pack("<I", LOCAL_CHILD | IS_REMOTE)  # field 16 (fixed32), after the prototype's


def length(size: int) -> bytes:
    """A length-delimited field's length, encoded (from the table up to two bytes)."""
    return VARINTS[size] if size < len(VARINTS) else varint(size)


def delimited(tag: bytes, body: bytes) -> bytes:
    """A length-delimited protobuf field: its tag, the body's length (varint), the body."""
    return tag + length(len(body)) + body


def trace_state_field(trace_state: str) -> bytes:
    """A span's trace_state (field 3), or nothing where the trace has none."""
    return delimited(b"\x1a", trace_state.encode()) if trace_state else b""


def request_id_attribute(request_id: str) -> bytes:
    """A span's ``request.id`` attribute (field 9: a KeyValue, its value an AnyValue's string_value), encoded."""
    value = delimited(b"\x0a", request_id.encode())
    return delimited(b"\x4a", REQUEST_ID_KEY + delimited(b"\x12", value))


REQUEST_ID_KEY = delimited(b"\x0a", REQUEST_ID.encode())  # KeyValue.key
# a request id's attribute but for the id: one per length (an id is a plain token of 64 characters at most)
REQUEST_ID_PREFIXES = [request_id_attribute("x" * n)[:-n] for n in range(1, 65)]


def ids(traceparent: str) -> tuple[bytes, bytes]:
    """A span's trace id and its own span id, from its traceparent (the server's records carry them so)."""
    return bytes.fromhex(traceparent[3:35]), bytes.fromhex(traceparent[36:52])


SPAN_ID, PARENT_ID = b"\x12\x08", b"\x22\x08"  # the tags and lengths of a span's span_id and parent_span_id
TRACE_ID = b"\x0a\x10"  # and of its trace_id: the end of every prototype (see Batches.head)
# the bytes of a span's fields beyond its prototype, its trace state and a request's id: its trace id, its span id,
# its parent's and its times (each field's tag and length included)
TRACE_BYTES, ID_BYTES, TIMES_BYTES = 2 + 16, 2 + 8, TIMES.size
SERVER_OWN = TRACE_BYTES + ID_BYTES + TIMES_BYTES  # a request's parent, if any, is counted with its id
QUEUE_OWN = TRACE_BYTES + 2 * ID_BYTES + TIMES_BYTES
BATCH_OWN = FORWARD_OWN = TRACE_BYTES + 2 * ID_BYTES  # their times are their prototype's


def head(prototype: bytes, size: int) -> bytes:
    """The start of a span of ``size`` bytes in ScopeSpans.spans (field 2) made from ``prototype`` (the fields
    that it shares with others, encoded): its tag, its length, the prototype, then the tag of its trace id, which
    comes next."""
    return b"\x12" + length(size) + prototype + TRACE_ID


class Batches:
    """Spans added one record at a time into OTLP export requests of at most ``size`` spans each, encoded here.

    Each span is the protobuf encoding of a prototype made once (per route and status, per batch, ``queue``)
    followed by the fields that are its own (trace and span ids, parent, times, trace state, request id):
    protobuf reads a field given twice as the last one given, and a repeated one (attributes) as all of them,
    so the bytes read as the prototype with those fields set. A request's spans are pieces of bytes added to a
    list, joined once per export request: building the messages (and serialising them) took about 70 % of this
    process's CPU; joining each span on its own, then all of them again, a fifth of what was left."""

    def __init__(self, resource: ResourceMessage, size: int):
        self.size = size
        self.resource = delimited(b"\x0a", resource.SerializeToString())  # ResourceSpans.resource
        self.scope = delimited(b"\x0a", SCOPE.SerializeToString())  # ScopeSpans.scope
        self.full: list[tuple[bytes, int]] = []
        self._attributes: dict[tuple, list[KeyValue]] = {}  # a model span's attributes, made once per kind
        self._batches: dict[tuple, tuple[bytes, bytes, bytes]] = {}  # a batch's span heads, per trace state size
        self._servers: dict[tuple, bytes] = {}  # a request's span but for what is its own
        self.pieces: list[bytes] = []  # the spans of the export request being filled, in pieces
        self.count = 0  # how many

    def _room(self, spans: int) -> None:
        """Room for ``spans`` spans (the request being filled is finished first where they would pass ``size``)."""
        if self.count and self.count + spans > self.size:
            self.full.append(self._request())
        self.count += spans

    def _request(self) -> tuple[bytes, int]:
        """An ExportTraceServiceRequest of the spans added since the last (one resource, one scope), and their
        count; starts afresh."""
        scope_spans = self.scope + b"".join(self.pieces)
        resource_spans = self.resource + delimited(b"\x12", scope_spans)
        made = (delimited(b"\x0a", resource_spans), self.count)
        self.pieces, self.count = [], 0
        return made

    def take(self) -> list[tuple[bytes, int]]:
        """Every export request made so far (the one being filled too), encoded, with its span count."""
        taken = [*self.full, self._request()] if self.count else self.full
        self.full = []
        return taken

    def add(self, record: tuple) -> None:
        self._room(spans_in(record))
        if record[0] == "m":
            _, traceparent, trace_state, *model = record
            self._model_spans(*ids(traceparent), trace_state_field(trace_state), *model)
            return
        _, traceparent, parent_id, trace_state, name, start_ns, end_ns, attributes, request_id, failed, models = record
        trace, own = ids(traceparent)
        state = trace_state_field(trace_state)
        key = (name, failed, *attributes, *attributes.values())
        server = self._servers.get(key) or self._server_prototype(key, name, attributes, failed)
        encoded_id = request_id.encode()
        request = (
            REQUEST_ID_PREFIXES[len(encoded_id) - 1] + encoded_id
            if 0 < len(encoded_id) <= 64
            else request_id_attribute(request_id)
        )
        if parent_id:  # a caller's
            request += PARENT_ID + parent_id.to_bytes(8, "big") + REMOTE_FLAGS
        self.pieces += (
            head(server, len(server) + SERVER_OWN + len(state) + len(request)), trace, SPAN_ID, own,
            TIMES.pack(0x39, start_ns, 0x41, end_ns), state, request,
        )  # fmt: skip
        for model in models:
            self._model_spans(trace, own, state, *model)

    def _model_spans(
        self,
        trace: bytes,
        parent_id: bytes,
        state: bytes,
        model: str,
        version: str,
        enqueued_ns: int,
        timings: list[tuple[int, int, int, int, int]],
    ) -> None:
        """``queue`` and ``batch`` under the request's span, ``forward`` under ``batch``, for each batch."""
        for timing in timings:
            key = (model, version, timing, len(state))
            queue, batch, forward = self._batches.get(key) or self._heads(key)
            made = random.getrandbits(192).to_bytes(24, "big")  # queue's, batch's and forward's span ids
            batch_id = made[8:16]
            self.pieces += (
                queue, trace, SPAN_ID, made[:8], PARENT_ID, parent_id, TIMES.pack(0x39, enqueued_ns, 0x41, timing[1]),
                state,
                batch, trace, SPAN_ID, batch_id, PARENT_ID, parent_id, state,
                forward, trace, SPAN_ID, made[16:], PARENT_ID, batch_id, state,
            )  # fmt: skip

    def _server_prototype(self, key: tuple, name: str, attributes: dict[str, Any], failed: bool) -> bytes:
        """A request's span but for its ids, times and request id, encoded: the same for every request to a route
        that answered with the same status, made once. Paths a client makes up (404s) come and go: the cache is
        bounded."""
        made = Span(flags=LOCAL_CHILD, name=name, kind=Span.SPAN_KIND_SERVER)
        set_attributes(made.attributes, attributes)
        if failed:
            made.status.code = Status.STATUS_CODE_ERROR
        return cache(self._servers, key, made.SerializeToString(), 10_000)

    def _heads(self, key: tuple[str, str, tuple, int]) -> tuple[bytes, bytes, bytes]:
        """One batch's ``queue``, ``batch`` and ``forward`` spans but for their ids and the queue's times, encoded
        once for every request it served (with the size of their trace state, which their lengths count). A chunk
        of records spans a few batches: the cache never holds more than 1,000."""
        model, version, (size, started_ns, run_started_ns, run_ended_ns, ended_ns), state = key
        batch, forward = (
            Span(
                flags=LOCAL_CHILD,
                name=name,
                kind=Span.SPAN_KIND_INTERNAL,
                start_time_unix_nano=start_ns,
                end_time_unix_nano=end_ns,
                attributes=self._model_attributes(model, named_version, size),
            ).SerializeToString()
            for name, start_ns, end_ns, named_version in (
                ("batch", started_ns, ended_ns, version),
                ("forward", run_started_ns, run_ended_ns, None),
            )
        )
        heads = (
            head(QUEUE, len(QUEUE) + QUEUE_OWN + state),
            head(batch, len(batch) + BATCH_OWN + state),
            head(forward, len(forward) + FORWARD_OWN + state),
        )
        return cache(self._batches, key, heads, 1000)

    def _model_attributes(self, model: str, version: str | None, size: int) -> list[KeyValue]:
        """A model span's attributes, made once per kind (versions come and go: the cache is bounded)."""
        found = self._attributes.get((model, version, size))
        if found is None:
            named = {"model.name": model, **({"model.version": version} if version else {}), "batch.size": size}
            found = cache(self._attributes, (model, version, size), key_values(named), 10_000)
        return found


def cache(into: dict, key: Any, value: Any, limit: int) -> Any:
    """``value`` kept as ``into[key]`` (its callers look there first), and returned; past ``limit`` entries the
    cache starts afresh."""
    if len(into) >= limit:
        into.clear()
    into[key] = value
    return value


def resource() -> ResourceMessage:
    """The SDK's resource for this service: OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES and the SDK's own."""
    from opentelemetry.sdk.resources import Resource

    made = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE_NAME)})
    return ResourceMessage(attributes=key_values(dict(made.attributes)))


def http_client() -> dict[str, Any]:
    """How the SDK's exporter posts, as its keyword argument for :class:`OTLPSpanExporter`:
    - to a plain ``http://`` endpoint that no proxy applies to, the SDK's urllib3 transport (its private
      ``_transport``): a 512-span POST cost 4.6 µs of this process's CPU per traced request under load, against 7.4
      through ``requests``;
    - otherwise a ``requests`` session (proxies, certificates), the environment's proxy settings read once rather
      than at every POST as ``requests`` does (its two scans of the whole environment were about a quarter of a
      POST; the CA bundle variables are read once too, in :func:`exporter`);
    - nothing where a credential provider (OTEL_PYTHON_EXPORTER_OTLP_HTTP_*CREDENTIAL_PROVIDER) makes the SDK's
      own session."""
    if any(name.endswith("_CREDENTIAL_PROVIDER") for name in os.environ if name.startswith("OTEL_PYTHON_EXPORTER_")):
        return {}
    import requests

    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    proxies = requests.utils.get_environ_proxies(endpoint)  # HTTP(S)_PROXY, unless NO_PROXY names its host
    if endpoint.startswith("http://") and not proxies:
        from opentelemetry.exporter.http.transport._urllib3 import Urllib3HTTPTransport

        return {"_transport": Urllib3HTTPTransport()}
    made = requests.Session()
    made.proxies, made.trust_env = proxies, False
    return {"session": made}


def exporter(settings: dict[str, int]) -> tuple[Callable[[list], Iterator[tuple[int, int]]], Callable[[], None]]:
    """Records in, OTLP export requests out, posted by the SDK's exporter (its settings from OTEL_EXPORTER_OTLP_*
    variables)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    how = http_client()
    sdk_exporter = OTLPSpanExporter(**how)
    http = how.get("session")
    if http is not None and http.verify is True:  # no OTEL_EXPORTER_OTLP_*CERTIFICATE: requests' own variables
        http.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    # The exporter's export() takes the SDK's span objects and encodes them itself, at the cost this process
    # exists to avoid; its HTTP client (retries, headers, compression) sends the bytes built here.
    client = sdk_exporter._client
    batches = Batches(resource(), settings["batch_size"])  # OTEL_BSP_MAX_EXPORT_BATCH_SIZE, read by the server

    def export(records: list) -> Iterator[tuple[int, int]]:
        for record in records:
            batches.add(record)
        for body, spans in batches.take():
            yield (spans, 0) if client.export(body).success else (0, spans)

    return export, sdk_exporter.shutdown


if __name__ == "__main__":
    serve_records(exporter, marshal.loads)  # as the server writes them (service/runtime/tracing.py)
