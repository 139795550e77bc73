"""What the server knows about the request being answered, for the code below the routes: set once per request
by the HTTP middleware and per call by the gRPC guard, read where the work is done (the registry).

A context variable rather than a parameter threaded through every route, the v2 data plane and gRPC: each
request runs in its own task, so its value is its own.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.settings import ApiKey

if TYPE_CHECKING:
    from service.runtime.tracing import RequestSpan


@dataclass(slots=True)
class CallContext:
    request_id: str
    key: ApiKey | None = None  # the client key it came with (its name, priority and rate limit)
    deadline: float | None = None  # time.monotonic() by which its answer is no longer wanted (X-Request-Timeout)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # added to its answer (rate-limit state)
    span: RequestSpan | None = None  # its server span, when tracing is on (service/runtime/tracing.py)
    # payload records of a JSON route's request: its body as sent and whether it is a batch (set by the route), then
    # the model and version that answered it (set by the registry); the HTTP middleware records both bodies
    sent: tuple[bytes, bool] | None = None
    answered_by: tuple[str, str] | None = None


CURRENT: ContextVar[CallContext | None] = ContextVar("call", default=None)
