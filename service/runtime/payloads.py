"""Payload records: each prediction's request and response as a pair of CloudEvents, in KServe's logger shape.

Types ``org.kubeflow.serving.inference.request`` and ``...response``, the same ``id`` (the request id), the
model in the ``inferenceservicename`` extension and the version in ``endpoint``. A JSON route's pair holds its
bodies, as KServe's logger records them: the request's as sent (``{"instances": [...]}``, one instance's put
in it) and the answer as written (``{"predictions": [...]}``, likewise; or the error answered), joined by the
HTTP middleware (:meth:`PayloadLog.record_sent`). Uploads, streams, v2 and gRPC are recorded from their
instances and predictions (an item that failed: ``{"error": ...}``). They go to ``SERVE_PAYLOAD_LOG_URL``: an
http(s) URL (binary mode, ``Ce-`` headers, as KServe's logger sends; or ``structured``, or ``batch``: up to
1,000 events per POST), or a file path (JSON Lines, one structured event per line).
``SERVE_PAYLOAD_LOG_SAMPLE`` picks the share of requests recorded and the fields named in
``SERVE_PAYLOAD_LOG_REDACT`` are replaced, at any depth, by the sender before it sends anything.

Never in a prediction's way: the event loop appends what the request holds to a bounded queue (a full queue drops
the pair); a thread pickles it down a pipe to a sender process (service/runtime/offload.py, payload_export.py),
which makes the events and sends them. The JSON was the largest part of what a record cost the server, under its
interpreter lock (41 k of the 106 k instructions that traces and records added to a phone request, counted with
callgrind): a JSON route's bodies are JSON already, and the objects of the other records go down as plain values
(:func:`plain`) whose JSON the sender makes. A sink that fails drops what arrives for a second, then is tried
again. Every record dropped is counted in ``payload_log_dropped_total{reason}`` (``queue_full``, ``sink_error``,
``sender_down``), every one delivered in ``payload_log_sent_total``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import random
import socket
import time
from types import BuiltinFunctionType, FunctionType
from typing import Any

import numpy as np
from pydantic import BaseModel

from service.models.base import Upload
from service.runtime.context import CURRENT, CallContext
from service.runtime.metrics import Metrics
from service.runtime.offload import ChildPipe
from service.runtime.payload_export import BATCH_PAIRS
from service.settings import Settings

log = logging.getLogger("service.payloads")

# Records go to the sender process this often, or as soon as a batch-mode POST's worth waits. Each frame costs
# the server a wake-up of its pipe's thread and the sender a POST: frames of about 110 records (every 50 ms at
# 2,500 requests a second) cost the sender 10.5-11.5 µs a record, frames of 500 7.4-7.7.
IDLE_S = 0.5
SEND_AT = BATCH_PAIRS


@functools.cache
def _json_keys(model: type[BaseModel]) -> tuple[tuple[str, str], ...] | None:
    """A model's (field, JSON key) pairs where an alias renames a field (pydantic writes JSON by alias), else
    None: its ``__dict__`` has the keys already."""
    pairs = tuple((name, f.serialization_alias or f.alias or name) for name, f in model.model_fields.items())
    return pairs if any(name != key for name, key in pairs) else None


def plain(value: Any) -> Any:
    """How a record's objects are pickled for the sender, which cannot import their classes (a pickler's
    ``reducer_override``): a pydantic model as the dict of its fields by their JSON names, an error as
    ``{"error": ...}``, numpy's arrays and numbers (and the classes and functions pickle names) as usual, and
    anything else by its ``repr``."""
    if isinstance(value, BaseModel):
        pairs, fields = _json_keys(type(value)), value.__dict__
        return dict, (fields if pairs is None else {key: fields[name] for name, key in pairs},)
    if isinstance(value, Exception):
        return dict, ({"error": str(value)},)
    if isinstance(value, type | FunctionType | BuiltinFunctionType | np.ndarray | np.generic | np.dtype):
        return NotImplemented
    return str, (repr(value),)


def _instance(item: Any) -> Any:
    """An uploaded file is recorded by its size and hash, with its options: not its bytes."""
    if isinstance(item, Upload):
        return {
            "file": {"bytes": len(item.data), "sha256": hashlib.sha256(item.data).hexdigest()},
            "options": item.options,
        }
    return item


class PayloadLog:
    """The records of one server process: :meth:`record` on the event loop, :meth:`start` after the fork (the
    sender process), :meth:`stop` sends what is left (for a few seconds at most)."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.target = settings.payload_log_url
        self.on = bool(self.target) and settings.payload_log_sample > 0
        self.sample = settings.payload_log_sample
        self._sent = metrics.payload_sent
        self._dropped = metrics.payload_dropped
        self._pipe = ChildPipe(
            "service.runtime.payload_export",
            capacity=settings.payload_log_queue,
            batch=SEND_AT,
            delay_s=IDLE_S,
            on_report=self._reported,
            on_dropped=self._lost,
            reduce=plain,
            greeting={
                "target": self.target,
                "mode": settings.payload_log_format,
                "timeout_s": settings.payload_log_timeout_s,
                "source": f"urn:course-models:{socket.gethostname()}",
                "namespace": os.environ.get("POD_NAMESPACE"),
                "redact": sorted(settings.payload_log_redact),
            },
        )
        self._how = (
            f"CloudEvents, {settings.payload_log_format} mode"
            if self.target and self.target.startswith(("http://", "https://"))
            else "JSON Lines"
        )

    def record(self, model: str, version: str, items: list, outputs: list) -> None:
        """Queue one request's pair (sampled): on the event loop, so it only appends what the request holds (its
        JSON is made by the sender)."""
        if not self._drawn():
            return
        if items and isinstance(items[0], Upload):  # an upload's request: its one file
            items = [_instance(item) for item in items]
        self._put(CURRENT.get(), model, version, items, outputs)

    def record_sent(self, call: CallContext, answer: bytes, status: int) -> None:
        """Queue a JSON route's pair (sampled), from the bodies as sent: the request's (``call.sent``, read by the
        route) and the answer as written (by the HTTP middleware), where the instances and answers as objects would
        cost their pickling, or their JSON. A batch's body (and an error's) goes as the event's data; one
        instance's (one prediction's) in a 1-tuple, put in ``{"instances": [...]}`` by the sender, which also makes
        any body one line of UTF-8."""
        if self.sample < 1 and random.random() >= self.sample:  # (_drawn and _put, inline: once per request)
            return
        (body, batch), (model, version), span = call.sent, call.answered_by, call.span  # type: ignore[misc]
        self._pipe.put(
            (call.request_id, model, version, time.time(), span.traceparent if span is not None else None,
             body if batch else (body,), answer if batch or status >= 300 else (answer,))
        )  # fmt: skip

    def _drawn(self) -> bool:
        """Whether this request is recorded (SERVE_PAYLOAD_LOG_SAMPLE)."""
        return self.sample >= 1 or random.random() < self.sample

    def _put(self, call: CallContext | None, model: str, version: str, instances: Any, predictions: Any) -> None:
        """The pair's record, queued, with the request's id and span (the record joins its trace)."""
        request_id, span = (call.request_id, call.span) if call is not None else (os.urandom(16).hex(), None)
        traceparent = span.traceparent if span is not None else None
        self._pipe.put((request_id, model, version, time.time(), traceparent, instances, predictions))

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
