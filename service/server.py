"""uvicorn's HTTP protocol with the connection limits it lacks, so the server holds without a proxy in front.

uvicorn closes idle keep-alive connections, but a connection that trickles a header line every few seconds,
or announces a large body and sends it a kilobyte at a time, is kept forever, and it accepts connections
until the process runs out of file descriptors. This protocol adds, per connection:

- a deadline for each request to arrive whole (headers and body), ``SERVE_REQUEST_READ_TIMEOUT_S``, counted
  from the moment the server waits for it; a request still incomplete then gets 408 and the connection
  closes;
- a cap on open connections, ``SERVE_MAX_CONNECTIONS``. A connection beyond it first makes room by
  closing the connection that has waited longest for its request (an idle keep-alive one, or a slow
  sender): so a liveness probe still gets through while slow connections hold every place. Only when
  every connection is busy with a request does the new one get 503 and close.

Use it with ``uvicorn --http service.server:GuardedHttpProtocol`` (``python -m service`` does).
hypercorn has a read timeout but no connection cap; keeping uvicorn keeps its worker manager and httptools'
parser, and the whole addition is the two timers below.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from functools import cache

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import Settings

log = logging.getLogger("service.server")


# Reports this process's open connections (the app sets it to its metrics gauge, http_open_connections).
connections_changed: Callable[[int], None] = lambda count: None


@cache
def limits() -> tuple[float, int]:
    """(request read timeout in seconds, most open connections), from the environment like every setting."""
    settings = Settings()
    return settings.request_read_timeout_s, settings.max_connections


def _raw_response(status: str, detail: str, extra: str = "") -> bytes:
    body = json.dumps({"detail": detail}).encode()
    head = (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{extra}connection: close\r\n\r\n")
    return head.encode() + body


class GuardedHttpProtocol(HttpToolsProtocol):
    _deadline: asyncio.TimerHandle | None = None
    _waiting_since: float | None = None  # when this connection began to wait for a request; None while one runs

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        connections_changed(len(self.connections))
        timeout, most = limits()
        if len(self.connections) > most and not self._close_longest_waiting():
            transport.write(_raw_response("503 Service Unavailable", f"the server holds its limit of {most} open "
                                          "connections (SERVE_MAX_CONNECTIONS), all busy; retry shortly",
                                          "retry-after: 1\r\n"))
            transport.close()
            return
        self._arm(timeout)

    def _close_longest_waiting(self) -> bool:
        """Close the other connection that has waited longest for its request; False if every one is busy."""
        waiting = [c for c in self.connections if c is not self and getattr(c, "_waiting_since", None) is not None
                   and not c.transport.is_closing()]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c._waiting_since)
        oldest._disarm()
        oldest.transport.close()
        return True

    def _arm(self, timeout: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(timeout, self._read_too_slow, timeout)
        self._waiting_since = self.loop.time()

    def _disarm(self) -> None:
        self._waiting_since = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _read_too_slow(self, timeout: float) -> None:
        cycle = self.cycle
        if self.transport.is_closing() or (cycle is not None and not cycle.more_body and not cycle.response_complete):
            return  # closed already, or a (pipelined) request is whole and its handler is at work
        if cycle is None or cycle.response_complete or not cycle.response_started:  # no answer under way
            self.transport.write(_raw_response("408 Request Timeout", f"the request did not arrive whole within "
                                               f"{timeout:g} s (SERVE_REQUEST_READ_TIMEOUT_S); send it at once"))
        log.info("closed a connection whose request did not arrive within %g s", timeout)
        self.transport.close()  # a handler still waiting for the body sees a disconnect

    def on_message_complete(self) -> None:
        self._disarm()  # the whole request is in; what the handler does with it has its own timeout
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm(limits()[0])  # the next request on this keep-alive connection gets the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
        connections_changed(len(self.connections))
