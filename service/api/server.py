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

- a bound on what a caller can make it hold: the request line and headers (``SERVE_MAX_HEADER_BYTES``,
  ``SERVE_MAX_HEADERS``; more get 431 and a close: llhttp itself has no limit, and megabytes of header
  lines took gigabytes), requests pipelined ahead of their answers (``SERVE_MAX_PIPELINED``: uvicorn
  resumes reading after every answer, so a client that pipelines and never reads queued thousands), and
  answers the client does not read (writing stalls past the read timeout: the connection is dropped).

Use it with ``uvicorn --http service.api.server:GuardedHttpProtocol`` (``python -m service`` does).
hypercorn has a read timeout but no connection cap; keeping uvicorn keeps its worker manager and httptools'
parser, and the whole addition is the two timers below.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import Settings

log = logging.getLogger("service.api.server")


@dataclass(frozen=True)
class ConnectionLimits:
    """What the protocol needs from the settings, and where it reports its open connections. The app's
    lifespan hands it over in its state (``LIMITS_KEY``), which uvicorn gives every connection: no global."""

    settings: Settings
    connections_changed: Callable[[int], None] = lambda count: None


LIMITS_KEY = "connection_limits"
DEFAULT_LIMITS = ConnectionLimits(Settings.model_construct())  # an app without our lifespan: the defaults


LINGER_S, LINGER_BYTES = 2.0, 1 << 20  # how long, and how much, a refused connection is drained before closing


class StopReading(Exception):
    """Raised in a parser callback to stop parsing this connection (httptools then abandons the data)."""


def _raw_response(status: str, detail: str, extra: str = "") -> bytes:
    body = json.dumps({"detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"{extra}connection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedHttpProtocol(HttpToolsProtocol):
    _deadline: asyncio.TimerHandle | None = None
    _waiting_since: float | None = None  # when this connection began to wait for a request; None while one runs
    _write_stalled: asyncio.TimerHandle | None = None  # armed while the client does not read our answers
    _head_open = True  # the parser is inside a request line or headers
    _head_raw = 0  # bytes received since that head began (counted per read, for a head still open)
    _head_size = 0  # bytes of its URL and header lines so far (counted per callback)
    _header_count = 0
    _stopped = False  # this connection reads nothing more (a head too large, too many pipelined)
    _drained = 0  # bytes dropped since

    # Transport, as uvicorn's HttpToolsProtocol declares it (asyncio's BaseProtocol says BaseTransport)
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.limits = self.app_state.get(LIMITS_KEY, DEFAULT_LIMITS)
        self.limits.connections_changed(len(self.connections))
        settings = self.limits.settings
        timeout, most = settings.request_read_timeout_s, settings.max_connections
        if len(self.connections) > most and not self._close_longest_waiting():
            transport.write(
                _raw_response(
                    "503 Service Unavailable",
                    f"the server holds its limit of {most} open "
                    "connections (SERVE_MAX_CONNECTIONS), all busy; retry shortly",
                    "retry-after: 1\r\n",
                )
            )
            transport.close()
            return
        self._arm(timeout)

    def _close_longest_waiting(self) -> bool:
        """Close the other connection that has waited longest for its request; False if every one is busy."""
        waiting = [
            (c._waiting_since, c)
            for c in self.connections
            if c is not self
            and isinstance(c, GuardedHttpProtocol)
            and c._waiting_since is not None
            and not c.transport.is_closing()
        ]
        if not waiting:
            return False
        _, oldest = min(waiting, key=lambda pair: pair[0])
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
            self.transport.write(
                _raw_response(
                    "408 Request Timeout",
                    f"the request did not arrive whole within "
                    f"{timeout:g} s (SERVE_REQUEST_READ_TIMEOUT_S); send it at once",
                )
            )
        log.info("closed a connection whose request did not arrive within %g s", timeout)
        self.transport.close()  # a handler still waiting for the body sees a disconnect

    def on_message_complete(self) -> None:
        self._disarm()  # the whole request is in; what the handler does with it has its own timeout
        self._head_open = True  # whatever comes next is the next request's head
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts the next pipelined request, and resumes reading
        if self._stopped or self.pipeline:  # read more only once the requests already queued are answered
            self.flow.pause_reading()
        if not self.transport.is_closing():
            self._arm(
                self.limits.settings.request_read_timeout_s
            )  # the next request on this connection: the same deadline

    # -- bounds on what one connection can make the server hold --------------------------------------------

    def data_received(self, data: bytes) -> None:
        """uvicorn's, with the head's size counted and this protocol's own refusals left as they are."""
        if self._stopped:  # refused: what still arrives is dropped, up to a bound (see _lingering_close)
            self._drained += len(data)
            if self._drained > LINGER_BYTES:
                self.transport.close()
            return
        if self._head_open:
            self._head_raw += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if not self._stopped:  # a malformed request (our own refusals have answered already)
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        settings = self.limits.settings
        if self._head_open and self._head_raw > settings.max_header_bytes and not self._stopped:
            self._refuse_head(
                f"the request line and headers are longer than {settings.max_header_bytes} bytes "
                "(SERVE_MAX_HEADER_BYTES)"
            )  # one header still arriving, a megabyte long

    def on_message_begin(self) -> None:
        self._head_open, self._head_size, self._header_count = True, 0, 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        self._check_head()
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        self._header_count += 1
        self._check_head()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_open, self._head_raw = False, 0
        if (
            self.cycle is not None
            and not self.cycle.response_complete
            and len(self.pipeline) >= self.limits.settings.max_pipelined
        ):
            self._stop_after_answers()  # answer what is queued, then close: the client retries the rest
            raise StopReading
        super().on_headers_complete()

    def _check_head(self) -> None:
        settings = self.limits.settings
        if self._header_count > settings.max_headers:
            self._refuse_head(f"the request has more than {settings.max_headers} header lines (SERVE_MAX_HEADERS)")
        elif self._head_size > settings.max_header_bytes:
            self._refuse_head(
                f"the request line and headers are longer than {settings.max_header_bytes} bytes "
                "(SERVE_MAX_HEADER_BYTES)"
            )
        else:
            return
        raise StopReading

    def _refuse_head(self, why: str) -> None:
        """431 and close; while an earlier request's answer is still due, that answer first, then the close."""
        if self.cycle is not None and not self.cycle.response_complete:
            self._stop_after_answers()
            return
        self._stopped = True
        self._disarm()
        self.transport.write(
            _raw_response("431 Request Header Fields Too Large", f"{why}; send fewer or shorter headers")
        )
        self._lingering_close()

    def _lingering_close(self) -> None:
        """Close after the answer, reading (and dropping) what the client still sends for a moment (at most
        LINGER_S and LINGER_BYTES): closing a socket with unread data sends a reset, which can destroy the
        answer before the client reads it."""
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.flow.resume_reading()  # data_received drops everything once _stopped is set
        self.loop.call_later(LINGER_S, self.transport.close)

    def _stop_after_answers(self) -> None:
        self._stopped = True
        self.flow.pause_reading()
        self.cycle.keep_alive = False  # the newest request accepted closes the connection once answered

    def pause_writing(self) -> None:
        """The client is not reading our answers: give it the read timeout to start again, then drop it."""
        super().pause_writing()
        if self._write_stalled is None:
            timeout = self.limits.settings.request_read_timeout_s
            self._write_stalled = self.loop.call_later(timeout, self._not_reading, timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_stalled is not None:
            self._write_stalled.cancel()
            self._write_stalled = None

    def _not_reading(self, timeout: float) -> None:
        log.info("dropped a connection that read none of its answers for %g s", timeout)
        self.transport.abort()  # close() would wait for the unread answers to drain

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._write_stalled is not None:
            self._write_stalled.cancel()
        super().connection_lost(exc)
        self.limits.connections_changed(len(self.connections))
