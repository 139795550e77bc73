"""One pure-ASGI middleware for what every request needs: request id, the API-key check, the route's body-size
cap, metrics, access log.

Pure ASGI (rather than Starlette's BaseHTTPMiddleware) keeps the per-request overhead small, and it answers
before the app reads a byte of the body: a request without a valid key, or announcing a body larger than its
route takes, costs the server its headers only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field

from service.api.errors import error_body
from service.runtime.context import CURRENT, CallContext
from service.runtime.memory import TRIM_AFTER_BYTES, trim_soon
from service.runtime.metrics import Metrics
from service.runtime.payloads import PayloadLog
from service.runtime.tracing import Tracing
from service.settings import ApiKey

log = logging.getLogger("service.access")
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def new_request_id() -> str:
    """128 random bits in hex, as uuid4().hex gives, at a third of its cost (no UUID object per request)."""
    return os.urandom(16).hex()


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]], path: str) -> None:
    payload = json.dumps(error_body(path, body["detail"])).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


@dataclass
class Gate:
    """Who may call which path, and how large a body each path takes."""

    api_keys: list[ApiKey]
    open_paths: tuple[str, ...]  # reachable without a key (each with everything below it; "/" always)
    admin_keys: list[str] = field(default_factory=list)  # the only keys /admin takes (client keys never do)
    body_limits: dict[str, int] = field(default_factory=dict)  # per exact path
    body_limit_patterns: list[tuple[re.Pattern, int]] = field(default_factory=list)  # paths with parameters
    default_body_limit: int = 64 * 1024  # any other path: operations routes take no body at all
    inflight_body_budget: int = 128 * 2**20  # bytes of request bodies being received or handled at once

    def needs_key(self, path: str) -> bool:
        return (
            bool(self.api_keys)
            and path != "/"
            and not is_admin(path)
            and not any(path == p or path.startswith(p + "/") for p in self.open_paths)
        )

    def body_limit(self, path: str) -> int:
        limit = self.body_limits.get(path)
        if limit is None:
            limit = next(
                (most for pattern, most in self.body_limit_patterns if pattern.match(path)), self.default_body_limit
            )
        return limit

    def limit_bodies(self, routes: list, key: str, cap: int) -> None:
        """Each route's declared largest body (``openapi_extra[key]``), within ``cap`` (SERVE_MAX_BODY_BYTES):
        a route renamed or added keeps its own limit, with no table of paths to keep in step."""
        self.default_body_limit = min(self.default_body_limit, cap)
        for route in routes:
            limit = (getattr(route, "openapi_extra", None) or {}).get(key)
            if limit is None:
                continue
            if route.param_convertors:
                self.body_limit_patterns.append((route.path_regex, min(limit, cap)))
            else:
                self.body_limits[route.path] = min(limit, cap)

    def admin_refused(self, path: str, headers: dict[bytes, bytes]) -> bool:
        """/admin takes an admin key only; with none configured its routes do not exist (404)."""
        return is_admin(path) and bool(self.admin_keys) and not self.has_valid_key(headers, self.admin_keys)

    def has_valid_key(self, headers: dict[bytes, bytes], keys: list[str] | None = None) -> bool:
        """Whether the headers carry one of the keys (X-API-Key, or Authorization: Bearer); default: the
        client keys."""
        if keys is None:
            return self.client_key(headers) is not None
        return _matching(_supplied(headers), keys) is not None

    def client_key(self, headers: dict[bytes, bytes]) -> ApiKey | None:
        """The client key the headers carry, or None."""
        found = _matching(_supplied(headers), [k.key for k in self.api_keys])
        return None if found is None else self.api_keys[found]


def _supplied(headers: dict[bytes, bytes]) -> bytes:
    supplied = headers.get(b"x-api-key", b"")
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    if not supplied and scheme.lower() == b"bearer":
        supplied = token.strip()
    return supplied


def _matching(supplied: bytes, keys: list[str]) -> int | None:
    """The position of the key ``supplied`` is, comparing against every key, always, so that timing does not
    reveal which prefix matched."""
    matches = [secrets.compare_digest(supplied, key.encode()) for key in keys]
    return matches.index(True) if supplied and any(matches) else None


UNAUTHORIZED = {
    "detail": "missing or invalid API key: send it in the X-API-Key header or as 'Authorization: Bearer <key>'"
}
ADMIN_UNAUTHORIZED = {
    "detail": "missing or invalid admin key: /admin takes only the keys of SERVE_ADMIN_KEYS (not "
    "the client keys), in the X-API-Key header or as 'Authorization: Bearer <key>'"
}


def is_admin(path: str) -> bool:
    return path == "/admin" or path.startswith("/admin/")


MAX_REQUEST_TIMEOUT_S = 3600.0
BAD_TIMEOUT = (
    f"X-Request-Timeout must be a number of seconds above 0 and at most {MAX_REQUEST_TIMEOUT_S:g} (a decimal, e.g. "
    "0.25): how long the answer is still wanted"
)


def request_deadline(value: bytes | str | None) -> float | None:
    """The deadline (``time.monotonic()``) an X-Request-Timeout value sets, None without one; ValueError if it is
    not a number of seconds in (0, 3600]."""
    if value is None:
        return None
    seconds = float(value)  # ValueError for text; "nan" and "inf" fail the range below
    if not 0 < seconds <= MAX_REQUEST_TIMEOUT_S:
        raise ValueError(BAD_TIMEOUT)
    return time.monotonic() + seconds


class RequestContextMiddleware:
    def __init__(
        self, app, *, metrics: Metrics, gate: Gate, tracing: Tracing | None = None, payloads: PayloadLog | None = None
    ):
        self.app, self.metrics, self.gate = app, metrics, gate
        self.tracing = tracing if tracing is not None and tracing.on else None
        self.payloads = payloads if payloads is not None and payloads.on else None
        self.inflight_bytes = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = dict(scope["headers"])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        # A client's id is kept only if it is a plain token: it goes into logs and response headers.
        request_id = incoming if SAFE_REQUEST_ID.fullmatch(incoming) else new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        # /models shows build details to callers with a key; computed here once, where the key is checked
        key = self.gate.client_key(headers) if self.gate.api_keys else None
        state["authenticated"] = key is not None
        id_headers = [(b"x-request-id", request_id.encode("latin-1"))]
        call = CallContext(request_id, key)
        CURRENT.set(call)  # the registry reads the caller's key, deadline and id there
        span = trace_id = None
        if self.tracing is not None:  # the request's span, a child of the caller's traceparent if it sent one
            call.span = span = self.tracing.start_request(scope["method"], headers, None, request_id)
            trace_id = span.traceparent[3:35]
            id_headers.append((b"traceresponse", span.traceparent.encode()))
        status = 500
        refused = False  # set once this middleware has answered 413 itself
        limit = self.gate.body_limit(scope["path"])
        path = scope["path"]
        too_large = {
            "detail": f"request body is larger than the limit of {limit} bytes for {scope['path']}; "
            "send a smaller body (a batch: fewer instances per request)"
        }

        answer: list[bytes] | None = None  # a JSON route's answer, as written, for its payload record

        async def send_with_id(message):
            nonlocal status, answer
            if refused:
                return  # the app's own late answer to a refused body is dropped
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *id_headers, *call.headers]
                if call.answered_by is not None and self.payloads is not None:
                    answer = []
            elif answer is not None:
                answer.append(message.get("body", b""))
            await send(message)

        received = 0

        async def limited_receive():
            nonlocal received, refused, status
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit and not refused:
                refused, status = True, 413
                await _send_json(send, 413, too_large, id_headers, path)
                return {"type": "http.disconnect"}
            return message

        try:
            declared = headers.get(b"content-length")
            try:
                call.deadline = request_deadline(headers.get(b"x-request-timeout"))
                bad_timeout = False
            except ValueError:
                bad_timeout = True
            admin = self.gate.admin_refused(scope["path"], headers)
            if scope["method"] != "OPTIONS" and (
                admin
                or (  # CORS preflights carry no key
                    self.gate.needs_key(scope["path"]) and not state["authenticated"]
                )
            ):
                status = 401
                await _send_json(
                    send,
                    401,
                    ADMIN_UNAUTHORIZED if admin else UNAUTHORIZED,
                    [*id_headers, (b"www-authenticate", b"Bearer")],
                    path,
                )
            elif bad_timeout:
                status = 400
                await _send_json(send, 400, {"detail": BAD_TIMEOUT}, id_headers, path)
            elif declared is not None and declared.isdigit() and int(declared) > limit:
                status = 413  # refuse before reading a byte of the body
                await _send_json(send, 413, too_large, id_headers, path)
            else:
                # Bodies in flight are bounded as a whole: each holds what it may grow to (its declared length,
                # or its route's limit when sent in chunks) until it is answered; a request without a body
                # (/healthz) holds nothing, so probes are never refused.
                hold = (
                    int(declared)
                    if declared is not None and declared.isdigit()
                    else (limit if b"transfer-encoding" in headers else 0)
                )
                if hold and self.inflight_bytes + hold > self.gate.inflight_body_budget:
                    status = 503
                    await _send_json(
                        send,
                        503,
                        {
                            "detail": (
                                f"the server is receiving its limit of {self.gate.inflight_body_budget} bytes of "
                                "request bodies (SERVE_MAX_INFLIGHT_BODY_BYTES); retry after the seconds in Retry-After"
                            )
                        },
                        [*id_headers, (b"retry-after", b"1")],
                        path,
                    )
                else:
                    self.inflight_bytes += hold
                    try:
                        await self.app(scope, limited_receive, send_with_id)
                    finally:
                        self.inflight_bytes -= hold
                        if received > TRIM_AFTER_BYTES:
                            trim_soon()  # its megabytes, freed on several threads, back to the system
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(label, scope["method"], str(status)).inc()
            self.metrics.latency.labels(label).observe(elapsed)
            if answer is not None and self.payloads is not None:
                self.payloads.record_sent(call, b"".join(answer), status)
            if span is not None and self.tracing is not None:
                self.tracing.end_request(
                    span,
                    f"{scope['method']} {label}",
                    {
                        "http.request.method": scope["method"],
                        "url.path": scope["path"],
                        "http.route": label,
                        "http.response.status_code": status,
                    },
                    status >= 500,
                )
            log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "route": label,
                    "path": scope["path"],
                    "status": status,
                    "latency_ms": round(elapsed * 1000, 2),
                    "batch_size": scope["state"].get("batch_size"),
                    "trace_id": trace_id,
                },
            )


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the request fields the access log attaches."""

    FIELDS = ("request_id", "method", "route", "path", "status", "latency_ms", "batch_size", "trace_id")

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: getattr(record, k) for k in self.FIELDS if getattr(record, k, None) is not None})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _plain(value: object) -> str:
    """A field value that cannot pass for another field or line: anything but a plain token is JSON-quoted
    (so CR, LF, spaces and '=' in a client's path show as escapes inside quotes)."""
    text = str(value)
    return text if PLAIN_TOKEN.fullmatch(text) else json.dumps(text)


PLAIN_TOKEN = re.compile(r"[A-Za-z0-9._:/\-]+")


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname} {record.name}: {record.getMessage()}"
        fields = [
            f"{k}={_plain(getattr(record, k))}" for k in JsonFormatter.FIELDS if getattr(record, k, None) is not None
        ]
        return " ".join([line, *fields]) + (("\n" + self.formatException(record.exc_info)) if record.exc_info else "")


def configure_logging(json_logs: bool, level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_logs else PlainFormatter())
    root = logging.getLogger("service")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # No record needs the caller's file and line (the logging HOWTO's "Optimization"): finding them walks
    # the stack, deep under coroutines, on every access log line.
    logging._srcfile = None
    # Our access log has every request already, with its id, route, latency and batch size: uvicorn's own
    # access lines would print each request twice under plain `uvicorn service.app:app`.
    logging.getLogger("uvicorn.access").disabled = True
