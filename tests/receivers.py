"""Real HTTP receivers for what the server sends out, each on a free port in a thread of the test process:

- :class:`OtlpReceiver`: OTLP/HTTP traces (``POST /v1/traces``, http/protobuf), decoded with the
  OpenTelemetry project's own protobuf classes (``opentelemetry-proto``) into plain span records. No
  OpenTelemetry Collector can be installed from the registries this project reaches, so this is the receiving
  end of the same wire format, not a stand-in for the exporter.
- :class:`EventSink`: CloudEvents over HTTP (binary, structured or batched mode), parsed with the
  ``cloudevents`` SDK; ``delay_s`` makes it a slow sink.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cloudevents.http import from_http
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


@dataclass
class SpanRecord:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int


def _value(v) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class _Receiver:
    def __init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                status = receiver.handle(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> int:
        raise NotImplementedError

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class OtlpReceiver(_Receiver):
    def __init__(self) -> None:
        super().__init__()
        self.spans: list[SpanRecord] = []

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> int:
        if path != "/v1/traces" or headers.get("content-type") != "application/x-protobuf":
            return 404
        request = ExportTraceServiceRequest.FromString(body)
        spans = [
            SpanRecord(
                name=span.name,
                trace_id=span.trace_id.hex(),
                span_id=span.span_id.hex(),
                parent_span_id=span.parent_span_id.hex(),
                kind=span.kind,
                start_ns=span.start_time_unix_nano,
                end_ns=span.end_time_unix_nano,
                attributes={a.key: _value(a.value) for a in span.attributes},
                status_code=span.status.code,
            )
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]
        with self.lock:
            self.spans.extend(spans)
        return 200

    def trace(self, trace_id: str, at_least: int, timeout_s: float = 15) -> list[SpanRecord]:
        """The spans of one trace, once at least ``at_least`` have arrived."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                found = [s for s in self.spans if s.trace_id == trace_id]
            if len(found) >= at_least or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


class EventSink(_Receiver):
    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.events: list[Any] = []  # cloudevents.http.CloudEvent
        self.posts = 0

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> int:
        time.sleep(self.delay_s)
        if headers.get("content-type") == "application/cloudevents-batch+json":
            events = [
                from_http({"content-type": "application/cloudevents+json"}, json.dumps(e)) for e in json.loads(body)
            ]
        else:
            events = [from_http(headers, body)]
        with self.lock:
            self.events.extend(events)
            self.posts += 1
        return 202

    def wait_for(self, count: int, timeout_s: float = 15) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                events = list(self.events)
            if len(events) >= count or time.monotonic() > deadline:
                return events
            time.sleep(0.05)
