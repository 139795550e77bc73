"""Payload records: each prediction's request and response as a pair of CloudEvents, in KServe's logger shape.

Types ``org.kubeflow.serving.inference.request`` and ``...response``, the same ``id`` (the request id), the
model in the ``inferenceservicename`` extension and the version in ``endpoint``; the request's data is
``{"instances": [...]}``, the response's ``{"predictions": [...]}`` (an item that failed: ``{"error": ...}``).
They go to ``SERVE_PAYLOAD_LOG_URL``: an http(s) URL (binary mode, ``Ce-`` headers, as KServe's logger
sends; or ``structured``, or ``batch``: up to 1,000 events per POST), or a file path (JSON Lines, one
structured event per line). ``SERVE_PAYLOAD_LOG_SAMPLE`` picks the share of requests recorded and the fields
named in ``SERVE_PAYLOAD_LOG_REDACT`` are replaced, at any depth, before anything leaves the process.

Never in a prediction's way: the event loop appends the request's instances and answers to a bounded queue
(a full queue drops the pair); a thread turns them into JSON (pydantic's serialiser: 20 µs for a garment's
784 pixels, kept off the event loop) and a sender process (service/runtime/offload.py, payload_export.py)
makes the events and sends them. A sink that fails drops what arrives for a second, then is tried again. Every
record dropped is counted in ``payload_log_dropped_total{reason}`` (``queue_full``, ``sink_error``,
``sender_down``), every one delivered in ``payload_log_sent_total``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import time
from typing import Any

import numpy as np
from pydantic_core import to_json, to_jsonable_python

from service.models.base import Upload
from service.runtime.context import CURRENT
from service.runtime.metrics import Metrics
from service.runtime.offload import ChildPipe
from service.settings import Settings

log = logging.getLogger("service.payloads")

REDACTED = "[redacted]"
IDLE_S = 0.05  # records go to the sender process this often, or ...
SEND_AT = 256  # ... as soon as this many wait


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
    """The records of one server process: :meth:`record` on the event loop, :meth:`start` after the fork (the
    sender process), :meth:`stop` sends what is left (for a few seconds at most)."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.target = settings.payload_log_url
        self.on = bool(self.target) and settings.payload_log_sample > 0
        self.sample = settings.payload_log_sample
        self.fields = frozenset(settings.payload_log_redact)
        self._sent = metrics.payload_sent
        self._dropped = metrics.payload_dropped
        self._pipe = ChildPipe(
            "service.runtime.payload_export",
            capacity=settings.payload_log_queue,
            batch=SEND_AT,
            delay_s=IDLE_S,
            on_report=self._reported,
            on_dropped=self._lost,
            prepare=self._prepared,
            greeting={
                "target": self.target,
                "mode": settings.payload_log_format,
                "timeout_s": settings.payload_log_timeout_s,
                "source": f"urn:course-models:{socket.gethostname()}",
                "namespace": os.environ.get("POD_NAMESPACE"),
            },
        )
        self._how = (
            f"CloudEvents, {settings.payload_log_format} mode"
            if self.target and self.target.startswith(("http://", "https://"))
            else "JSON Lines"
        )

    def record(self, model: str, version: str, items: list, outputs: list) -> None:
        """Queue one request's pair (sampled): on the event loop, so it only appends what the request holds (its
        JSON is made on the pipe's thread, :meth:`_prepared`)."""
        if self.sample < 1 and random.random() >= self.sample:
            return
        call = CURRENT.get()
        request_id, span = (call.request_id, call.span) if call is not None else (os.urandom(16).hex(), None)
        if items and isinstance(items[0], Upload):  # an upload's request: its one file
            items = [_instance(item) for item in items]
        traceparent = span.traceparent if span is not None else None  # the record joins the request's trace
        self._pipe.put((request_id, model, version, time.time(), traceparent, items, outputs))

    def _prepared(self, record: tuple) -> tuple:
        """On the pipe's thread: the instances and answers as JSON, the data of the pair's two events."""
        *head, items, outputs = record
        return (*head, self._json(items), self._json(outputs))

    def _json(self, value: Any) -> bytes:
        """``value`` as JSON, by pydantic's serialiser (validated inputs, answers), with the named fields redacted."""
        if self.fields:
            return json.dumps(redact(to_jsonable_python(value, fallback=_jsonable), self.fields)).encode()
        return to_json(value, fallback=_jsonable)

    def start(self) -> None:
        if self.on:
            self._pipe.start()
            log.info("payload records: %s of requests go to %s (%s)", f"{self.sample:.0%}", self.target, self._how)

    def stop(self) -> None:
        if self.on:
            self._pipe.stop()

    def _reported(self, report: tuple[int, int]) -> None:
        sent, failed = report
        self._sent.inc(sent)
        if failed:
            self._lost("sink_error", [None] * (failed // 2))

    def _lost(self, reason: str, records: list) -> None:
        """Records dropped (each a request's pair of events), counted and warned of."""
        self._dropped.labels(reason).inc(2 * len(records))
        why = {
            "queue_full": "the sink is slower than the traffic",
            "sink_error": "the payload sink failed (the sender's log says how); retrying in a second",
            "sender_down": "the sender process is not running",
        }[reason]
        self._pipe.warn(f"payload sink {self.target}: dropped {2 * len(records)} records: {why}")
