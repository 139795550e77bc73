"""Continuous batching for generating models: iteration-level scheduling, as Orca and vLLM do it.

A generating model (``Predictor.generates``, the poem model) writes an answer in many steps, one piece (a
character) per step, and a step costs nearly the same for 64 requests as for one. So its requests run together
in one :class:`~service.models.base.RunningBatch` on the model's worker thread: each step advances every running
request by one piece; a request waiting in the queue joins at the next step, and one that is complete leaves at
once, so nobody waits for a longer request to finish and the step is shared by up to the policy's
``max_batch_size`` requests.

Admission is the :class:`Batcher`'s: a bounded queue served by priority, then earliest deadline; a request
leaves the queue when a place in the running batch frees up (a deadline that passes while it waits is a 504, as
for every model). The worker thread loops on its own while requests run and hands the event loop only what it
needs (a stream's pieces as each step completes, complete answers), one call per step. A request whose caller
has gone (a closed stream, a deadline passed) leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel

from service.models.base import Predictor, RunningBatch
from service.runtime.batching import Batcher, BatchTiming, Pieces, _Pending
from service.settings import BatchPolicy

JOINED = object()  # a delivery saying the request is in the running batch (a stream may start)
LEFT = object()  # a delivery saying the request left the batch unanswered (its caller had gone)


class ContinuousBatcher(Batcher):
    continuous = True

    def __init__(self, name: str, predictor: Predictor, policy: BatchPolicy, **options: Any):
        """As :class:`Batcher`'s (``options``: its keyword arguments), for a predictor that ``generates``."""
        super().__init__(name, predictor.run, policy, **options)
        self.predictor = predictor
        self._lock = threading.Lock()  # guards the two fields below, shared with the worker thread
        self._joining: list[_Pending] = []  # taken from the queue, to join at the worker's next step
        self._generating = False  # the worker's loop is running (it stops when nothing is left to write)
        self._worker: asyncio.Future | None = None

    async def stream(self, item: Any, pieces: Pieces, meta: dict | None, rank: int, deadline: float | None) -> None:
        """Queue ``item`` and return once it has joined the running batch; its pieces then arrive in
        ``pieces`` as each step completes, the whole answer last, then None. Raises what ``submit`` raises, and
        the model's InputError for an input it cannot answer."""
        (joined,) = await self._enqueue([item], meta, None, rank, deadline, pieces)
        if isinstance(joined, Exception):
            raise joined

    async def call(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{self.name} generates continuously: stream through ContinuousBatcher.stream")

    def _batches_before_done(self, items: int) -> int:
        """Here a "batch time" is one request's whole generation: a newcomer that finds a free place joins at
        once; otherwise it waits for places to free up, a batch's worth per generation."""
        free = self.policy.max_batch_size - self._running
        return 1 + (0 if items <= free else math.ceil((items - free) / self.policy.max_batch_size))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            room = self.policy.max_batch_size - self._running
            if room > 0 and (joining := self._next_batch(room)):
                self._running += len(joining)
                started = time.time_ns()
                for p in joining:
                    p.batch = BatchTiming(0, started)
                with self._lock:
                    self._joining += joining
                    start, self._generating = not self._generating, True
                if start:
                    self._worker = loop.run_in_executor(self._executor, self._generate, loop)
            if self._closing and not self.depth and not self._running:
                if self._worker is not None:
                    await self._worker
                return

    # -- on the worker thread --------------------------------------------------------------------------------

    def _generate(self, loop: asyncio.AbstractEventLoop) -> None:
        """Step the running batch until nothing is left to write; every change reaches the event loop as one
        list per step (:meth:`_deliver`)."""
        running, rows = self.predictor.running_batch(), list[_Pending]()
        try:
            with torch.inference_mode():
                while True:
                    with self._lock:
                        joining, self._joining = self._joining, []
                        if not joining and not rows:
                            self._generating = False
                            return
                    deliveries = self._join(running, rows, joining)
                    for p in [p for p in rows if _gone(p)]:
                        running.leave(p)
                        rows.remove(p)
                        deliveries.append((p, LEFT))
                    if rows:
                        deliveries += self._step(running, rows)
                    if deliveries:
                        loop.call_soon_threadsafe(self._deliver, deliveries)
        except BaseException as exc:  # a failed step fails every request running or joining, never the server
            with self._lock:
                failed, self._joining, self._generating = rows + self._joining, [], False
            loop.call_soon_threadsafe(self._deliver, [(p, exc) for p in failed])
            if not isinstance(exc, Exception):
                raise

    def _join(self, running: RunningBatch, rows: list[_Pending], joining: list[_Pending]) -> list:
        deliveries: list[tuple[_Pending, Any]] = []
        for p in joining:
            try:
                running.join(p, p.item)  # a poem's plan: its form, pattern and rhyme, off the event loop
            except Exception as exc:  # an InputError is this request's 422; it never joined
                deliveries.append((p, exc))
                continue
            rows.append(p)
            assert p.batch is not None
            p.batch.run_started_ns = time.time_ns()
            deliveries.append((p, JOINED))
        return deliveries

    def _step(self, running: RunningBatch, rows: list[_Pending]) -> list:
        started = time.perf_counter()
        size = len(rows)
        pieces = running.step()
        self._observe(size, time.perf_counter() - started, self.depth)
        deliveries: list[tuple[_Pending, Any]] = []
        for p, piece in pieces:
            assert isinstance(p, _Pending)
            if isinstance(piece, BaseModel):  # its whole answer: it has left the batch
                rows.remove(p)
                assert p.batch is not None
                p.batch.size, p.batch.run_ended_ns = size, time.time_ns()
                if self.predictor.drift is not None:
                    self.predictor.drift.observe(self.predictor, [p.item], [piece])
            elif p.pieces is None:
                continue  # a piece nobody streams
            deliveries.append((p, piece))
        return deliveries

    # -- on the event loop -----------------------------------------------------------------------------------

    def _deliver(self, deliveries: list[tuple[_Pending, Any]]) -> None:
        now = time.time_ns()
        for p, piece in deliveries:
            if piece is JOINED:
                if p.pieces is not None and not p.future.done():
                    p.future.set_result(None)  # the stream may start
                continue
            if isinstance(piece, BaseModel | Exception) or piece is LEFT:  # it has left the batch
                self._running -= 1
                self._wakeup.set()
                if p.batch is not None and p.batch.run_started_ns:
                    p.batch.ended_ns = now
                    if isinstance(piece, BaseModel):  # a whole generation (the check's unit), not one cut short
                        self._measured((now - p.batch.run_started_ns) / 1e9)
            if piece is LEFT:
                continue
            if p.pieces is not None and p.future.done():  # a stream that has started
                p.pieces.put_nowait(piece)
                if isinstance(piece, BaseModel | Exception):
                    p.pieces.put_nowait(None)
            elif not p.future.done():
                if isinstance(piece, Exception):
                    p.future.set_exception(piece)
                elif isinstance(piece, BaseModel):
                    p.future.set_result(piece)


def _gone(p: _Pending) -> bool:
    """Its caller has left: a closed stream, or a request given up (deadline passed, client gone)."""
    return p.future.cancelled() or (p.pieces is not None and p.pieces.gone)
