"""The payload sender: a child process of each server process that turns its payload records into CloudEvents
and sends them to SERVE_PAYLOAD_LOG_URL (``python -m service.runtime.payload_export``, started by
:class:`service.runtime.payloads.PayloadLog` through service/runtime/offload.py).

Told its settings first (``target``, ``mode``, ``timeout_s``, ``source``, ``namespace``, ``redact``), then reads
lists of records ``(request_id, model, version, time, traceparent, instances, predictions)`` (a JSON route's
bodies as sent and answered, or plain values: the server's pydantic models come as dicts, see
:func:`service.runtime.payloads.plain`), makes the events' data, the named fields redacted, and reports ``(sent,
failed)`` events per list. A sink that fails has what arrives in the next second dropped (reported as failed)
before it is tried again.
"""

from __future__ import annotations

import codecs
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from json.encoder import encode_basestring_ascii as json_string
from pathlib import Path
from typing import Any

from pydantic_core import from_json, to_json

from service.runtime.offload import LogLimiter, serve_records

log = logging.getLogger("service.payload_export")

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
BATCH_PAIRS = 500  # records (two events each) per POST in batch mode
RETRY_AFTER_S = 1.0  # a failed sink is tried again after this

Pair = tuple[bytes, bytes, bytes]  # the attributes both events share (a JSON object's members), then each one's data
TYPES = (REQUEST_TYPE, RESPONSE_TYPE)
STRUCTURED_STARTS = tuple(f'{{"type":"{kind}",'.encode() for kind in TYPES)  # each event's JSON, up to its type
REQUEST_START, RESPONSE_START = STRUCTURED_STARTS
DATA = b',"data":'  # after the attributes, before an event's data


REDACTED = "[redacted]"
LF, CR = b"\n\r"  # as ints: ``LF in body`` is a search, where ``b"\n" in body`` first fails to read an int (costly)


def redact(value: Any, fields: frozenset[str]) -> Any:
    if isinstance(value, dict):
        return {k: REDACTED if k in fields else redact(v, fields) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, fields) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    """What pydantic's serialiser cannot write by itself: numpy's arrays (decoded tensors)."""
    import numpy as np  # only where a record holds arrays

    if isinstance(value, np.ndarray):  # whole numbers as integers (pixels): half the size, the same JSON values
        whole = value.dtype.kind == "f" and value.size and np.array_equal(value, np.round(value))
        return (value.astype(np.int64) if whole else value).tolist()
    return repr(value)


def one_line(body: bytes) -> bytes:
    """A body as sent, as JSON that sits inside an event on one line: UTF-8 without a byte order mark (FastAPI
    also reads UTF-16 and UTF-32 bodies, and a UTF-8 mark), its line breaks as spaces (in JSON they can only be
    whitespace between values: inside a string they are escaped)."""
    if not body.isascii():
        try:
            if body.startswith(codecs.BOM_UTF8):
                raise UnicodeError("a byte order mark")
            body.decode("utf-8")
        except UnicodeError:
            return to_json(json.loads(body))  # json reads what FastAPI read: the encoding from the first bytes
    if LF in body or CR in body:
        return body.replace(b"\n", b" ").replace(b"\r", b" ")
    return body


def data(value: Any, wrap: bytes, fields: frozenset[str]) -> bytes:
    """An event's data: a JSON route's body as it was sent or answered (its JSON already: the whole data, or in a
    1-tuple one instance or prediction), or instances or predictions (plain values: the JSON made here); what is
    not the whole data in ``{wrap: [...]}``, and the ``fields`` named redacted at any depth."""
    if isinstance(value, tuple):
        value = b"".join((b'{"', wrap, b'":[', one_line(value[0]), b"]}"))  # one copy of the body
    elif isinstance(value, bytes):
        value = one_line(value)
    else:
        value = to_json(redact(value, fields) if fields else value, fallback=_jsonable)
        return b"".join((b'{"', wrap, b'":', value, b"}"))
    return to_json(redact(from_json(value), fields)) if fields else value


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def timestamp(when: float) -> str:
    """RFC 3339 in UTC, to the microsecond (the records of a frame share their second: it is formatted once)."""
    seconds, micros = divmod(round(when * 1e6), 1_000_000)
    return f"{_second(seconds)}.{'%06d' % micros}+00:00"  # noqa: UP031 - % pads in half a format spec's time


@functools.lru_cache(maxsize=256)
def _attributes(source: str, namespace: str | None, model: str, version: str) -> tuple[str, str]:
    """The JSON of the attributes (all but ``type``) that a model version's events share, around their time: what
    comes between their id and time, and what follows it. The settings' and the catalog's strings are escaped
    here, once, not trusted to be JSON-safe."""
    before_time = f',"source":{json_string(source)},"time":"'
    after_time = (
        f'","datacontenttype":"application/json","inferenceservicename":{json_string(model)},'
        f'"component":"predictor","endpoint":{json_string(version)}'
    )
    if namespace:
        after_time += f',"namespace":{json_string(namespace)}'
    return before_time, after_time


def to_pairs(records: list, source: str, namespace: str | None, redacted: frozenset[str] = frozenset()) -> list[Pair]:
    """Each record's two events: the attributes they share (all but ``type``, as the members of a JSON object)
    and each one's data. The attributes are formatted, not a dict serialised (that was most of the sender's CPU
    per record): the repeated strings are escaped once, the id and traceparent per record (the server checks or
    makes them, but an escape costs little)."""
    made = []
    for request_id, model, version, when, traceparent, instances, predictions in records:
        before_time, after_time = _attributes(source, namespace, model, version)
        attributes = f'"specversion":"1.0","id":{json_string(request_id)}{before_time}{timestamp(when)}{after_time}'
        if traceparent:  # CloudEvents' distributed tracing extension: the record joins the request's trace
            attributes += f',"traceparent":{json_string(traceparent)}'
        made.append(
            (attributes.encode(), data(instances, b"instances", redacted), data(predictions, b"predictions", redacted))
        )
    return made


def structured(pairs: list[Pair]) -> Iterator[bytes]:
    """Each event in CloudEvents' JSON format: its attributes and ``data``, one object."""
    for attributes, *data in pairs:
        for start, body in zip(STRUCTURED_STARTS, data, strict=True):
            yield b"".join((start, attributes, DATA, body, b"}"))


def structured_pairs(pairs: list[Pair], separator: bytes) -> Iterator[bytes]:
    """Each pair's two events in CloudEvents' JSON format, ``separator`` between them: one join per pair, not per
    event (a batch's events, JSON Lines)."""
    between = b"}" + separator + RESPONSE_START
    for attributes, request, response in pairs:
        yield b"".join((REQUEST_START, attributes, DATA, request, between, attributes, DATA, response, b"}"))


class Sender:
    def __init__(self, target: str, mode: str, timeout_s: float):
        self.target, self.mode = target, mode
        self.is_http = target.startswith(("http://", "https://"))
        self.http: Any = None
        if self.is_http:
            # urllib3's connection pool (one kept-alive connection, re-opened when the sink dropped it): a POST
            # costs it about 180 µs of CPU here, httpx's client 445 µs, which in binary mode (a POST per event)
            # decided how many events a sender could deliver. No retries: a POST is never sent twice.
            import urllib3

            self.http = urllib3.connection_from_url(target, timeout=urllib3.Timeout(total=timeout_s), retries=False)
            self.path = urllib3.util.parse_url(target).request_uri

    def send(self, pairs: list[Pair]) -> None:
        if not self.is_http:  # JSON Lines: one structured event per line
            with Path(self.target.removeprefix("file://")).open("ab") as sink:
                if pairs:  # (no empty line for none)
                    sink.write(b"\n".join(structured_pairs(pairs, b"\n")))
                    sink.write(b"\n")
        elif self.mode == "batch":  # CloudEvents' batched content mode: a JSON array of structured events
            for start in range(0, len(pairs), BATCH_PAIRS):
                body = b"[%b]" % b",".join(structured_pairs(pairs[start : start + BATCH_PAIRS], b","))
                self._post({"content-type": "application/cloudevents-batch+json"}, body)
        elif self.mode == "structured":
            for event in structured(pairs):
                self._post({"content-type": "application/cloudevents+json"}, event)
        else:  # binary, as KServe's logger sends: the attributes as Ce- headers, the data as the body
            for attributes, *data in pairs:
                shared = from_json(b"{" + attributes + b"}")
                headers = {f"ce-{k}": v for k, v in shared.items() if k != "datacontenttype"}
                headers["content-type"] = shared["datacontenttype"]
                for kind, body in zip(TYPES, data, strict=True):
                    self._post({**headers, "ce-type": kind}, body)

    def _post(self, headers: dict[str, str], body: bytes) -> None:
        answer = self.http.urlopen("POST", self.path, body=body, headers=headers)
        if answer.status >= 300:
            raise RuntimeError(f"HTTP {answer.status}: {answer.data[:200].decode(errors='replace')}")

    def close(self) -> None:
        if self.http is not None:
            self.http.close()


def sender(settings: dict[str, Any]) -> tuple[Callable[[list], Iterator[tuple[int, int]]], Callable[[], None]]:
    out = Sender(settings["target"], settings["mode"], settings["timeout_s"])
    resting_until = 0.0
    warnings = LogLimiter(log)
    redacted = frozenset(settings.get("redact", ()))

    def send(records: list) -> Iterator[tuple[int, int]]:
        nonlocal resting_until
        if time.monotonic() < resting_until:
            yield 0, 2 * len(records)
            return
        try:
            out.send(to_pairs(records, settings["source"], settings["namespace"], redacted))
            yield 2 * len(records), 0
        except Exception as exc:  # a sink down or refusing: what was made is dropped; the server counts it
            resting_until = time.monotonic() + RETRY_AFTER_S
            warnings.warning("payload sink %s failed (%s: %s)", settings["target"], type(exc).__name__, str(exc)[:200])
            yield 0, 2 * len(records)

    return send, out.close


if __name__ == "__main__":
    serve_records(sender)
