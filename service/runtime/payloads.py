"""Payload records: each prediction's request and response as a pair of CloudEvents, in KServe's logger shape.

Types ``org.kubeflow.serving.inference.request`` and ``...response``, the same ``id`` (the request id), the
model in the ``inferenceservicename`` extension and the version in ``endpoint``; the request's data is
``{"instances": [...]}``, the response's ``{"predictions": [...]}`` (an item that failed: ``{"error": ...}``).
They go to ``SERVE_PAYLOAD_LOG_URL``: an http(s) URL (binary mode, ``Ce-`` headers, as KServe's logger
sends; or ``structured``, or ``batch``: up to 100 events per POST), or a file path (JSON Lines, one
structured event per line). ``SERVE_PAYLOAD_LOG_SAMPLE`` picks the share of requests recorded and the fields
named in ``SERVE_PAYLOAD_LOG_REDACT`` are replaced, at any depth, before anything leaves the process.

Never in a prediction's way: the event loop only appends the request's objects to a bounded queue (a full
queue drops the pair); one sender thread turns them into JSON and sends them. A sink that fails drops what
is waiting and is tried again a second later. Every record dropped is counted in
``payload_log_dropped_total{reason}`` (``queue_full``, ``sink_error``), every one delivered in
``payload_log_sent_total``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic_core import to_json, to_jsonable_python

from service.models.base import Upload
from service.runtime.context import CURRENT
from service.runtime.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("service.payloads")

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
REDACTED = "[redacted]"
BATCH_EVENTS = 100  # events per POST in batch mode
IDLE_S = 0.05  # how often the sender looks for records when there were none
RETRY_AFTER_S = 1.0  # a failed sink is tried again after this


def _jsonable(value: Any) -> Any:
    """What pydantic cannot turn into JSON by itself: arrays (decoded tensors) and errors."""
    if isinstance(value, np.ndarray):  # whole numbers as integers (pixels): half the cost, the same JSON values
        whole = value.dtype.kind == "f" and value.size and np.array_equal(value, np.round(value))
        return (value.astype(np.int64) if whole else value).tolist()
    if isinstance(value, Exception):
        return {"error": str(value)}
    return repr(value)


def _instance(item: Any) -> Any:
    """An uploaded file is recorded by its size and hash, with its options: not its bytes."""
    if isinstance(item, Upload):
        return {
            "file": {"bytes": len(item.data), "sha256": hashlib.sha256(item.data).hexdigest()},
            "options": item.options,
        }
    return item


def redact(value: Any, fields: frozenset[str]) -> Any:
    if isinstance(value, dict):
        return {k: REDACTED if k in fields else redact(v, fields) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, fields) for v in value]
    return value


class PayloadLog:
    """The records of one server process: :meth:`record` on the event loop, :meth:`start` after the fork
    (the sender thread), :meth:`stop` sends what is left (for a few seconds at most)."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.target = settings.payload_log_url
        self.on = bool(self.target) and settings.payload_log_sample > 0
        self.sample = settings.payload_log_sample
        self.fields = frozenset(settings.payload_log_redact)
        self.mode = settings.payload_log_format
        self.timeout_s = settings.payload_log_timeout_s
        self.capacity = settings.payload_log_queue
        self.source = f"urn:course-models:{socket.gethostname()}"
        self.namespace = os.environ.get("POD_NAMESPACE")
        self._waiting: deque[tuple] = deque()
        self._sent = metrics.payload_sent
        self._dropped_full = metrics.payload_dropped.labels("queue_full")
        self._dropped_sink = metrics.payload_dropped.labels("sink_error")
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._http: Any = None
        self._last_warning = 0.0

    @property
    def is_http(self) -> bool:
        return self.target is not None and self.target.startswith(("http://", "https://"))

    def record(self, model: str, version: str, items: list, outputs: list, traceparent: str | None = None) -> None:
        """Queue one request's pair (sampled); on the event loop, so it only appends."""
        if self.sample < 1 and random.random() >= self.sample:
            return
        if len(self._waiting) >= self.capacity:
            self._dropped_full.inc(2)
            return
        call = CURRENT.get()
        request_id = call.request_id if call is not None else os.urandom(16).hex()
        self._waiting.append((request_id, model, version, time.time(), items, outputs, traceparent))

    # -- the sender thread ------------------------------------------------------------------------------

    def start(self) -> None:
        if not self.on or self._thread is not None:
            return
        if self.is_http:
            import httpx

            self._http = httpx.Client(timeout=self.timeout_s)
        self._thread = threading.Thread(target=self._run, name="payload-log", daemon=True)
        self._thread.start()
        how = f"CloudEvents, {self.mode} mode" if self.is_http else "JSON Lines"
        log.info("payload records: %s of requests go to %s (%s)", f"{self.sample:.0%}", self.target, how)

    def stop(self, flush_s: float = 5.0) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join(flush_s)
        if self._http is not None:
            self._http.close()
        self._thread = None

    def _run(self) -> None:
        while True:
            if not self._waiting:
                if self._stopping.is_set():
                    return
                time.sleep(IDLE_S)
                continue
            records = [self._waiting.popleft() for _ in range(min(len(self._waiting), 256))]
            events = [event for record in records for event in self._events(record)]
            try:
                self._send(events)
                self._sent.inc(len(events))
            except Exception as exc:  # a sink down or refusing: drop what waits, count it, try again later
                dropped = len(events) + 2 * len(self._waiting)
                self._waiting.clear()
                self._dropped_sink.inc(dropped)
                self._warn(
                    f"payload sink {self.target} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                    f"dropped {dropped} records, retrying in {RETRY_AFTER_S:g} s"
                )
                if self._stopping.wait(RETRY_AFTER_S):
                    return

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning > 10:  # once per 10 s: a dead sink must not flood the log
            self._last_warning = now
            log.warning(message)

    def _events(self, record: tuple) -> list[tuple[dict[str, str], bytes]]:
        """The request's and the response's event: its attributes and its data, as JSON."""
        request_id, model, version, when, items, outputs, traceparent = record
        base = {
            "specversion": "1.0",
            "id": request_id,
            "source": self.source,
            "time": datetime.fromtimestamp(when, UTC).isoformat(),
            "datacontenttype": "application/json",
            "inferenceservicename": model,
            "component": "predictor",
            "endpoint": version,
        }
        if self.namespace:
            base["namespace"] = self.namespace
        if traceparent:  # CloudEvents' distributed tracing extension: the record joins the request's trace
            base["traceparent"] = traceparent
        return [
            ({"type": REQUEST_TYPE, **base}, b'{"instances":' + self._json([_instance(i) for i in items]) + b"}"),
            ({"type": RESPONSE_TYPE, **base}, b'{"predictions":' + self._json(outputs) + b"}"),
        ]

    def _json(self, value: Any) -> bytes:
        """``value`` as JSON, by pydantic's serialiser (validated inputs, answers), with the named fields redacted."""
        if self.fields:
            return json.dumps(redact(to_jsonable_python(value, fallback=_jsonable), self.fields)).encode()
        return to_json(value, fallback=_jsonable)

    @staticmethod
    def _structured(attributes: dict[str, str], data: bytes) -> bytes:
        """The event in CloudEvents' JSON format: its attributes and ``data``, one object."""
        return to_json(attributes)[:-1] + b',"data":' + data + b"}"

    def _send(self, events: list[tuple[dict[str, str], bytes]]) -> None:
        if not self.is_http:  # JSON Lines: one structured event per line
            assert self.target is not None
            with Path(self.target.removeprefix("file://")).open("ab") as sink:
                sink.writelines(self._structured(*event) + b"\n" for event in events)
        elif self.mode == "batch":  # CloudEvents' batched content mode: a JSON array of structured events
            for start in range(0, len(events), BATCH_EVENTS):
                body = b"[" + b",".join(self._structured(*e) for e in events[start : start + BATCH_EVENTS]) + b"]"
                self._post({"content-type": "application/cloudevents-batch+json"}, body)
        elif self.mode == "structured":
            for event in events:
                self._post({"content-type": "application/cloudevents+json"}, self._structured(*event))
        else:  # binary, as KServe's logger sends: the attributes as Ce- headers, the data as the body
            for attributes, data in events:
                headers = {f"ce-{k}": v for k, v in attributes.items() if k != "datacontenttype"}
                headers["content-type"] = attributes["datacontenttype"]
                self._post(headers, data)

    def _post(self, headers: dict[str, str], body: bytes) -> None:
        answer = self._http.post(self.target, content=body, headers=headers)
        if answer.status_code >= 300:
            raise RuntimeError(f"HTTP {answer.status_code}: {answer.text[:200]}")
