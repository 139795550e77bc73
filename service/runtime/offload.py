"""Work handed from the server to a child process: what traces and payload records send out.

Why a process: the server's requests, the model's worker thread and anything else in the process share one
interpreter lock. Encoding spans and CloudEvents and posting them took 30-45 µs per request under that lock
in a sender thread, a sixth of what a small request costs, and the request path waited for it. Here a record
(plain values) is appended to a bounded queue; every ``batch`` records, or every ``delay_s`` (the pipe's
thread), what waits is pickled (or marshalled) in one go (the names and strings records share, once) and goes
down the child's stdin as one frame, written without ever blocking (what the pipe cannot take yet goes before
the next frame). A full batch is sent by the caller that puts its last record, encoding being cheap, unless the
records hold objects that ``reduce`` turns into plain values as they are pickled (payload records' pydantic
models): that is the thread's. The child (a module run with ``python -m``, see :func:`serve_records`) does
the rest at the lowest CPU priority, writing back a count of what it delivered and what it could not.

A full queue, or a child that is not running, drops the records, reported by ``on_dropped``; a child that
exited is started again, at most once a second. Nothing here ever waits on the event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import io
import logging
import os
import pickle
import signal
import struct
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
FRAME = struct.Struct("<I")  # a frame's header: its length (then its list of records, encoded)
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # a child ignores them: it ends when the server closes its pipe
PIPE_BYTES = 1 << 20  # asked of Linux for the pipe to a child (its default 64 KiB is a third of a frame)


class LogLimiter:
    """Warnings in a log, at most one per ``every_s``: a dead collector or sink must not flood it."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0):
        self.logger, self.every_s, self._last = logger, every_s, 0.0

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last > self.every_s:
            self._last = now
            self.logger.warning(message, *args)


def _reducing_pickle(reduce: Callable[[Any], Any]) -> Callable[[list], bytes]:
    """Pickles records with ``reduce`` as the pickler's ``reducer_override`` (a class attribute: pickle's C
    pickler looks it up there)."""
    pickler = type("Pickler", (pickle.Pickler,), {"reducer_override": staticmethod(reduce)})

    def encode(records: list) -> bytes:
        frame = io.BytesIO()
        pickler(frame, pickle.HIGHEST_PROTOCOL).dump(records)
        return frame.getvalue()

    return encode


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
        reduce: Callable[[Any], Any] | None = None,
        encode: Callable[[list], bytes] = pickle.dumps,
    ):
        """``greeting``: what the child is told first (its settings: passed down, never through the environment).
        ``reduce``: a pickler's ``reducer_override`` for the objects in records that the child should get as
        plain values (it cannot import their classes); then the pipe's thread pickles and sends each batch
        (woken when ``batch`` records wait), rather than the caller that puts its last record. ``encode``: how a
        frame's list of records is written where there is no ``reduce`` (``marshal.dumps`` for records of plain
        values: half of pickle's cost, whose memo of every object it writes is most of its; the child then
        decodes them so, see :func:`serve_records`)."""
        self.module, self.capacity, self.batch, self.delay_s = module, capacity, batch, delay_s
        self.on_report, self.on_dropped, self.greeting = on_report, on_dropped, greeting
        self._in_thread = reduce is not None  # reducing is the pipe's thread's work, not a request's
        self.encode = encode if reduce is None else _reducing_pickle(reduce)
        self._wake = threading.Event()
        self._waiting: deque[Any] = deque()  # records not yet in a frame
        self._unsent = memoryview(b"")  # what the pipe has not taken yet of the last frame
        self._unsent_records: list[Any] = []  # that frame's records (dropped, counted, if its child dies)
        self._lock = threading.Lock()  # a frame is made and written by one caller at a time
        self._stopping = threading.Event()
        self._ticker: threading.Thread | None = None
        self._child: subprocess.Popen | None = None
        self._started_at = 0.0
        self._warnings = LogLimiter(log)

    def has_room(self) -> bool:
        """Whether a record put now is queued."""
        return len(self._waiting) + len(self._unsent_records) < self.capacity

    def put(self, record: Any) -> None:
        """Queue one record (dropped, reported as ``queue_full``, if the queue is full); the queue goes to the child
        as soon as ``batch`` records wait."""
        if len(self._waiting) + len(self._unsent_records) >= self.capacity:  # (has_room, inline: once per request)
            self.on_dropped("queue_full", [record])
            return
        self._waiting.append(record)
        if len(self._waiting) >= self.batch and self._ticker is not None:
            if self._in_thread:
                self._wake.set()
            else:
                self.flush()

    def warn(self, message: str) -> None:
        """A warning about this pipe's records in the log (rate-limited: :class:`LogLimiter`)."""
        self._warnings.warning(message)

    def start(self) -> None:
        if self._ticker is not None:
            return
        self._stopping.clear()
        self._start_child()
        self._ticker = threading.Thread(target=self._tick, name=f"{self.module}-ticker", daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        """Hands over what waits, lets the child send it and exit (``STOP_S`` each at most)."""
        if self._ticker is None:
            return
        self._stopping.set()
        self._wake.set()
        self._ticker.join(STOP_S)
        self._ticker = None
        if self._child is not None:
            try:
                self._child.wait(STOP_S)
            except subprocess.TimeoutExpired:  # at the lowest priority, a busy host may not have let it run
                log.warning(
                    "%s had not sent everything %g s after shutdown began: what it held is lost", self.module, STOP_S
                )
                self._child.kill()
            self._child = None

    def flush(self) -> None:
        """What waits, handed to the child's pipe as far as the pipe takes it now, never waiting for it."""
        with self._lock:
            while self._unsent or self._waiting:
                if not self._unsent:
                    records = [self._waiting.popleft() for _ in range(len(self._waiting))]
                    body = self.encode(records)
                    self._unsent, self._unsent_records = memoryview(FRAME.pack(len(body)) + body), records
                    if not self._child_running():
                        return
                if not self._write():
                    return

    def _child_running(self) -> bool:
        """Whether the child is there for the new frame: started again if it exited (the frame is dropped if it
        did so less than a second after its start)."""
        child = self._child
        if child is not None and child.poll() is None:
            return True
        if time.monotonic() - self._started_at < RESTART_AFTER_S:
            self._drop_unsent()
            return False
        status = child.returncode if child is not None else None
        log.warning("%s exited (status %s); starting it again", self.module, status)
        self._start_child()
        return True

    def _write(self) -> bool:
        """Writes what is unsent; True once all of it is in the pipe."""
        assert self._child is not None and self._child.stdin is not None
        try:
            written = os.write(self._child.stdin.fileno(), self._unsent)
        except BlockingIOError:  # the pipe is full: the child is behind
            return False
        except (OSError, ValueError):  # a broken pipe: the child died since
            self._drop_unsent()
            return False
        self._unsent = self._unsent[written:]
        if self._unsent:
            return False
        self._unsent_records = []
        return True

    def _drop_unsent(self) -> None:
        records, self._unsent, self._unsent_records = self._unsent_records, memoryview(b""), []
        self.on_dropped("sender_down", records)

    def _start_child(self) -> None:
        self._started_at = time.monotonic()
        # A stop signal (Ctrl-C, a service manager's SIGTERM to the whole group) can come while the child imports,
        # before it ignores them (serve_records) and would kill it with its records: blocked in this thread while
        # it is started, they reach the child blocked (the mask outlives exec); a signal to this process still
        # reaches its main thread, or this one once the mask is back
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self._child = child = subprocess.Popen(
                [sys.executable, "-m", self.module], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        assert child.stdin is not None
        with contextlib.suppress(OSError, AttributeError):  # Linux only; the default pipe works, in smaller writes
            fcntl.fcntl(child.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        child.stdin.write(pickle.dumps(self.greeting))
        child.stdin.flush()
        os.set_blocking(child.stdin.fileno(), False)
        threading.Thread(target=self._read_reports, args=(self._child,), daemon=True).start()

    def _tick(self) -> None:
        """Sends what waits every ``delay_s`` (a queue that never fills a frame), and all of it when stopping."""
        while not self._stopping.is_set():
            self._wake.wait(self.delay_s)
            self._wake.clear()
            self.flush()
        deadline = time.monotonic() + STOP_S
        self.flush()
        while (self._unsent or self._waiting) and time.monotonic() < deadline:
            time.sleep(0.01)  # the child reads at the lowest priority
            self.flush()
        if self._child is not None and self._child.stdin is not None:
            with contextlib.suppress(OSError):  # the child sends what it holds, then exits
                self._child.stdin.close()

    def _read_reports(self, child: subprocess.Popen) -> None:
        assert child.stdout is not None
        while True:
            try:
                report = pickle.load(child.stdout)
            except (EOFError, OSError, pickle.UnpicklingError):
                return
            self.on_report(report)


Handler = Callable[[list], Iterable[Any]]


def serve_records(
    setup: Callable[[Any], tuple[Handler, Callable[[], None]]], decode: Callable[[bytes], list] = pickle.loads
) -> None:
    """A child's main loop: ``setup(greeting)`` gives the handler and what to do at the end; the records of
    each frame from stdin (its :data:`FRAME` header, then a list, as its server's ChildPipe encodes it: pickled
    unless it says otherwise) go through the handler,
    whose reports go back on stdout, until the server closes the pipe. The records are handled at the lowest
    CPU priority: that work waits for a core the requests leave idle (a queue that fills meanwhile drops
    records, counted, rather than slowing a request). Its start (imports, clients), once, is not: on a host
    kept busy, at that priority it could take minutes."""
    # Ctrl-C in a terminal, or a service manager stopping the whole group (systemd's default), reaches the child
    # too: it goes on until the server closes the pipe (after handing over what waits) or exits, rather than
    # dying with its records
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)  # one that came while this process started (blocked) is dropped
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source: BinaryIO = sys.stdin.buffer
    report: BinaryIO = sys.stdout.buffer
    try:
        handle, close = setup(pickle.load(source))
    except EOFError:
        return
    # What the child keeps (modules, clients, caches) is made by now, and its records hold no cycles: they are freed
    # as they go. Left to the default collector, its passes over a frame's young records took a tenth of its CPU.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)
    try:  # Linux: from now on, run only when a core would otherwise idle
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)
    try:
        while True:
            header = source.read(FRAME.size)
            if len(header) < FRAME.size:  # the server closed the pipe: it is stopping (or gone)
                return
            (size,) = FRAME.unpack(header)
            records = decode(source.read(size))
            for outcome in handle(records):
                pickle.dump(outcome, report)
            report.flush()
    except BrokenPipeError:  # the server is gone: nobody to report to
        pass
    finally:
        close()
