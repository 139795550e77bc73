"""Work handed from the server to a child process: what traces and payload records send out.

Why a process: the server's requests, the model's worker thread and anything else in the process share one
interpreter lock. Encoding spans and CloudEvents and posting them took 30-45 µs per request under that lock
in a sender thread, a sixth of what a small request costs, and the request path waited for it. Here the
event loop appends a record to a bounded queue; a thread turns what waits into plain values (``prepare``)
and pickles them down the child's stdin (when ``batch`` records wait, else every ``delay_s``), and the child
(a module run with ``python -m``, see :func:`serve_records`) does the rest at the lowest CPU priority,
writing back a count of what it delivered and what it could not.

A full queue, or a child that is not running, drops the records, reported by ``on_dropped``; a child that
exited is started again, at most once a second. Nothing here ever waits on the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

log = logging.getLogger("service.offload")

STOP_S = 5.0  # what is queued at shutdown has this long to go out
RESTART_AFTER_S = 1.0


class LogLimiter:
    """Warnings in a log, at most one per ``every_s``: a dead collector or sink must not flood it."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0):
        self.logger, self.every_s, self._last = logger, every_s, 0.0

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last > self.every_s:
            self._last = now
            self.logger.warning(message, *args)


class ChildPipe:
    def __init__(
        self,
        module: str,
        *,
        capacity: int,
        batch: int,
        delay_s: float,
        on_report: Callable[[Any], None],
        on_dropped: Callable[[str, list], None],
        greeting: Any = None,
        prepare: Callable[[Any], Any] | None = None,
    ):
        """``greeting``: what the child is told first (its settings: passed down, never through the environment).
        ``prepare``: what turns a record into what the child is sent, on the sender thread (work that would
        otherwise lengthen a request: there it fills the moments the event loop waits for the network)."""
        self.module, self.capacity, self.batch, self.delay_s = module, capacity, batch, delay_s
        self.on_report, self.on_dropped, self.greeting, self.prepare = on_report, on_dropped, greeting, prepare
        self._waiting: deque[Any] = deque()
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._sender: threading.Thread | None = None
        self._child: subprocess.Popen | None = None
        self._started_at = 0.0
        self._warnings = LogLimiter(log)

    def has_room(self) -> bool:
        """Whether a record put now is queued (a caller can skip the work of making one that would be dropped)."""
        return len(self._waiting) < self.capacity

    def put(self, record: Any) -> None:
        """On the event loop: queue one record (dropped, reported as ``queue_full``, if the queue is full)."""
        waiting = len(self._waiting)
        if waiting >= self.capacity:
            self.on_dropped("queue_full", [record])
            return
        self._waiting.append(record)
        if waiting + 1 == self.batch:
            self._wake.set()

    def warn(self, message: str) -> None:
        """A warning about this pipe's records in the log (rate-limited: :class:`LogLimiter`)."""
        self._warnings.warning(message)

    def start(self) -> None:
        if self._sender is not None:
            return
        self._stopping.clear()
        self._start_child()
        self._sender = threading.Thread(target=self._send, name=f"{self.module}-sender", daemon=True)
        self._sender.start()

    def stop(self) -> None:
        """Hands over what waits, lets the child send it and exit (``STOP_S`` each at most)."""
        if self._sender is None:
            return
        self._stopping.set()
        self._wake.set()
        self._sender.join(STOP_S)
        self._sender = None
        if self._child is not None:
            try:
                self._child.wait(STOP_S)
            except subprocess.TimeoutExpired:  # at the lowest priority, a busy host may not have let it run
                log.warning(
                    "%s had not sent everything %g s after shutdown began: what it held is lost", self.module, STOP_S
                )
                self._child.kill()
            self._child = None

    def _start_child(self) -> None:
        self._started_at = time.monotonic()
        self._child = child = subprocess.Popen(
            [sys.executable, "-m", self.module], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert child.stdin is not None
        pickle.dump(self.greeting, child.stdin)  # buffered: goes with the first records
        threading.Thread(target=self._read_reports, args=(self._child,), daemon=True).start()

    def _send(self) -> None:
        while True:
            self._wake.wait(self.delay_s)
            self._wake.clear()
            records = [self._waiting.popleft() for _ in range(len(self._waiting))]
            if records and self.prepare is not None:
                records = [self.prepare(record) for record in records]
            if records:
                self._deliver(records)
            if self._stopping.is_set() and not self._waiting:
                break
        if self._child is not None and self._child.stdin is not None:
            with contextlib.suppress(OSError):  # the child sends what it holds, then exits
                self._child.stdin.close()

    def _deliver(self, records: list) -> None:
        child = self._child
        if child is None or child.poll() is not None:
            if time.monotonic() - self._started_at < RESTART_AFTER_S:
                self.on_dropped("sender_down", records)
                return
            status = child.returncode if child is not None else None
            log.warning("%s exited (status %s); starting it again", self.module, status)
            self._start_child()
            child = self._child
        assert child is not None and child.stdin is not None
        try:
            pickle.dump(records, child.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            child.stdin.flush()
        except (OSError, ValueError):  # a broken pipe: the child died since
            self.on_dropped("sender_down", records)

    def _read_reports(self, child: subprocess.Popen) -> None:
        assert child.stdout is not None
        while True:
            try:
                report = pickle.load(child.stdout)
            except (EOFError, OSError, pickle.UnpicklingError):
                return
            self.on_report(report)


Handler = Callable[[list], Iterable[Any]]


def serve_records(setup: Callable[[Any], tuple[Handler, Callable[[], None]]]) -> None:
    """A child's main loop: ``setup(greeting)`` gives the handler and what to do at the end; each pickled list
    of records from stdin goes through the handler, whose reports go back on stdout, until the server closes
    the pipe. The records are handled at the lowest CPU priority: that work waits for a core the requests leave
    idle (a queue that fills meanwhile drops records, counted, rather than slowing a request). Its start (imports,
    clients), once, is not: on a host kept busy, at that priority it could take minutes."""
    # Ctrl-C in a terminal, or a service manager stopping the whole group (systemd's default), reaches the child
    # too: it goes on until the server closes the pipe (after handing over what waits) or exits, rather than
    # dying with its records
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source: BinaryIO = sys.stdin.buffer
    report: BinaryIO = sys.stdout.buffer
    try:
        handle, close = setup(pickle.load(source))
    except EOFError:
        return
    try:  # Linux: from now on, run only when a core would otherwise idle
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)
    try:
        while True:
            try:
                records = pickle.load(source)
            except EOFError:  # the server closed the pipe: it is stopping (or gone)
                return
            for outcome in handle(records):
                pickle.dump(outcome, report)
            report.flush()
    except BrokenPipeError:  # the server is gone: nobody to report to
        pass
    finally:
        close()
