"""Dynamic batching for one model, with Triton's default policy, a bounded queue, priorities and deadlines.

When the model is idle a request runs at once with whatever is queued, so low load adds no latency.
While a forward pass runs, new arrivals queue up and form the next batch (up to ``max_batch_size``);
``max_wait_ms`` > 0 additionally waits for a fuller batch. Model work runs on one worker thread per
model, never on the event loop.

Overload: the queue is served by priority (the caller's key: high, normal, low), then earliest deadline
first. A request whose deadline passes while it waits is dropped unanswered (504) rather than computed for
nobody; one that cannot finish in time, given the measured time of the batches ahead of it, is refused on
arrival (503); when the queue is full a newcomer takes the places of lower-priority requests (which get 503)
or is refused itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from service.errors import DeadlineUnmeetableError, PredictionTimeoutError, QueueFullError
from service.settings import BatchPolicy


@dataclass(slots=True)
class BatchTiming:
    """When one batch ran (``time.time_ns()``, as traces take them): taken off the queue, its run on the model's
    worker thread, and its answers handed back. Recorded for every batch (four clock reads); traces read it."""

    size: int
    started_ns: int
    run_started_ns: int = 0
    run_ended_ns: int = 0
    ended_ns: int = 0
    _tuple: tuple[int, int, int, int, int] | None = field(default=None, repr=False)

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        """``(size, started_ns, run_started_ns, run_ended_ns, ended_ns)`` once the batch has ended: one tuple,
        made once, that the spans of each of its requests share."""
        if self._tuple is None or not self._tuple[-1]:
            self._tuple = (self.size, self.started_ns, self.run_started_ns, self.run_ended_ns, self.ended_ns)
        return self._tuple


@dataclass(slots=True, eq=False)
class _Pending:
    item: Any
    future: asyncio.Future
    batch: BatchTiming | None = None  # the forward pass this item ran in
    call: Callable[[], Any] | None = None  # instead of an item: a function run alone, in its turn (a stream's step)
    rank: int = 1  # its priority: 0 high, 1 normal, 2 low, 3 shadow (SIDE_RANK: mirrored traffic)
    deadline: float = math.inf  # time.monotonic() past which its answer is no longer wanted
    queued: bool = True  # still counted in the queue (not yet taken, dropped or given up)
    pieces: Pieces | None = None  # a stream's pieces, as a generating model writes them (generation.py)


class Pieces(asyncio.Queue):
    """A stream's pieces as a generating model writes them, then None; ``gone`` once its caller has left."""

    gone = False


SIDE_RANK = 3  # shadow copies (service/runtime/rollouts.py): served last, shed first, on the lowest priority


def _side_thread(threads: int | None) -> None:
    """The side worker: its torch threads, and nice 19 for this thread (Linux: per thread; the OpenMP threads it
    starts inherit it). Where that cannot be set the copies still run last in the queue."""
    if threads:
        torch.set_num_threads(threads)
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _timed(function: Callable[..., Any], *args: Any) -> tuple[Any, int, int]:
    """``function(*args)`` on the worker thread, with when it started and ended there."""
    started = time.time_ns()
    result = function(*args)
    return result, started, time.time_ns()


async def _result_or_error(future: asyncio.Future) -> Any:
    try:
        return await future
    except Exception as exc:
        return exc


class Batcher:
    continuous = False  # one forward pass per batch (ContinuousBatcher: one step per piece, requests joining)

    def __init__(
        self,
        name: str,
        predict: Callable[[list], list],
        policy: BatchPolicy,
        *,
        max_queue: int,
        timeout_s: float,
        threads: int | None = None,
        observe: Callable[[int, float, int], None] | None = None,
        dropped: Callable[[str, int], None] | None = None,
    ):
        self.name, self.policy, self.max_queue, self.timeout_s = name, policy, max_queue, timeout_s
        self.threads = threads
        self._predict = predict
        self._observe = observe or (lambda size, seconds, depth: None)
        self._dropped = dropped or (lambda reason, count: None)  # expired, unmeetable, shed, queue_full
        # (rank, deadline, arrival, item): popped in that order; an entry no longer queued is skipped when met
        self._heap: list[tuple[int, float, int, _Pending]] = []
        self._arrivals = 0
        self._queued = [0, 0, 0, 0]  # items waiting, per rank (3: shadow traffic, service/runtime/rollouts.py)
        self._running = 0  # items in the forward pass now
        self.batch_seconds: float | None = None  # a batch's time, smoothed: what the deadline check expects
        self._wakeup = asyncio.Event()
        # torch's thread count is per calling thread (an OpenMP setting), so each model's worker keeps its own
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"model-{name}",
            initializer=functools.partial(torch.set_num_threads, threads) if threads else None,
        )
        self._side_executor: ThreadPoolExecutor | None = None  # batches of shadow copies alone, started on first use
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def depth(self) -> int:
        return sum(self._queued)

    @property
    def busy(self) -> bool:
        """Items waiting, or a batch running: callers' work that side work (a shadow's) must not slow."""
        return bool(self._running or self.depth)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Finish everything already queued, then stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)
        if self._side_executor is not None:
            self._side_executor.shutdown(wait=True)

    async def call(
        self, function: Callable, *args: Any, meta: dict | None = None, rank: int = 1, deadline: float | None = None
    ) -> Any:
        """Run ``function(*args)`` on this model's worker thread in its turn in the queue, between batches (a
        stream's planning and each of its steps): it takes a queue place and its deadline like an item."""
        (result,) = await self._enqueue([None], meta, functools.partial(function, *args), rank, deadline)
        if isinstance(result, Exception):
            raise result
        return result

    async def submit(self, items: list, meta: dict | None = None, rank: int = 1, deadline: float | None = None) -> list:
        """Queue ``items`` at priority ``rank`` (0 high, 1 normal, 2 low) with a ``deadline``
        (``time.monotonic()``; default: ``timeout_s`` from now) and wait for their outputs, in order, with the
        exception in place of an item that failed (so a batch request can say which instance); raises
        QueueFullError, DeadlineUnmeetableError or PredictionTimeoutError.

        ``meta["batch_size"]`` is set to the largest forward pass the items ran in, ``meta["batches"]`` to each
        item's :class:`BatchTiming`.
        """
        return await self._enqueue(items, meta, None, rank, deadline)

    async def _enqueue(
        self,
        items: list,
        meta: dict | None,
        call: Callable[[], Any] | None,
        rank: int,
        deadline: float | None,
        pieces: Pieces | None = None,
    ) -> list:
        if self._closing:
            raise QueueFullError(f"{self.name} is shutting down")
        now = time.monotonic()
        deadline = now + self.timeout_s if deadline is None else deadline
        self._check_deadline(len(items), rank, deadline - now)
        self._make_room(len(items), rank)
        loop = asyncio.get_running_loop()
        pending = [
            _Pending(item, loop.create_future(), call=call, rank=rank, deadline=deadline, pieces=pieces)
            for item in items
        ]
        for p in pending:
            self._arrivals += 1
            heapq.heappush(self._heap, (rank, deadline, self._arrivals, p))
        self._queued[rank] += len(pending)
        self._wakeup.set()
        try:
            # asyncio.timeout_at rather than wait_for(gather(...)): no extra tasks per request on the hot path
            async with asyncio.timeout_at(loop.time() + (deadline - now)):
                outputs = [await _result_or_error(p.future) for p in pending]
                if time.monotonic() > deadline:  # computed, but the loop got to it after the deadline: not wanted
                    raise TimeoutError
            if meta is not None:
                meta["batches"] = batches = [p.batch for p in pending]
                meta["batch_size"] = max((b.size for b in batches if b is not None), default=0)
            return outputs
        except TimeoutError:
            unanswered = sum(1 for p in pending if p.future.cancelled() or not p.future.done())
            self._dropped("expired", unanswered or len(pending))  # none: all answered, too late
            raise PredictionTimeoutError(
                f"{self.name} did not answer within the request's deadline ({max(deadline - now, 0):.3g} s left when "
                "it was queued: its X-Request-Timeout or gRPC deadline, else the model's default)"
            ) from None
        finally:  # free the places of anything not yet taken (deadline, client gone)
            for p in pending:
                if not p.future.done():
                    p.future.cancel()
                self._leave(p)

    def _leave(self, p: _Pending) -> None:
        """``p`` no longer waits in the queue (taken for a batch, dropped, shed or given up)."""
        if p.queued:
            p.queued = False
            self._queued[p.rank] -= 1

    def _check_deadline(self, count: int, rank: int, left_s: float) -> None:
        """Refuse now what the batches ahead of it (the queued items of its priority or higher, the batch
        running) cannot leave time for, by the batches' measured time."""
        if self.batch_seconds is None:
            return  # nothing measured yet
        ahead = sum(self._queued[: rank + 1])
        batches = self._batches_before_done(ahead + count)
        needed = batches * self.batch_seconds
        if needed > left_s:
            self._dropped("unmeetable", count)
            raise DeadlineUnmeetableError(
                f"the {self.name} model cannot answer within this request's deadline: {ahead} items are ahead of "
                f"it, about {batches} batches of {self.batch_seconds * 1000:.1f} ms ({needed * 1000:.0f} ms), and "
                f"its deadline leaves {max(left_s, 0) * 1000:.0f} ms; retry later or allow more time "
                "(X-Request-Timeout)"
            )

    def _measured(self, seconds: float) -> None:
        """One batch's time into ``batch_seconds``, smoothed (what the deadline check expects a batch to take)."""
        self.batch_seconds = seconds if self.batch_seconds is None else 0.8 * self.batch_seconds + 0.2 * seconds

    def _batches_before_done(self, items: int) -> int:
        """How many batch times until the last of ``items`` (the newcomers and those ahead of them) is answered."""
        return math.ceil(items / self.policy.max_batch_size) + (1 if self._running else 0)

    def _make_room(self, count: int, rank: int) -> None:
        """Places for ``count`` items: lower-priority items waiting give theirs (latest deadline first, each
        answered 503), else the newcomer is refused."""
        excess = self.depth + count - self.max_queue
        if excess <= 0:
            return
        if sum(self._queued[rank + 1 :]) >= excess:
            lower = [entry for entry in self._heap if entry[0] > rank and entry[3].queued]
            for entry in heapq.nlargest(excess, lower):
                p = entry[3]
                self._leave(p)
                p.future.set_exception(
                    QueueFullError(
                        f"the {self.name} model's queue is full and higher-priority requests took this one's place; "
                        "retry after the seconds in Retry-After"
                    )
                )
            self._dropped("shed", excess)
            return
        self._dropped("queue_full", count)
        raise QueueFullError(
            f"the {self.name} model's queue is full: {self.depth} of its {self.max_queue} "
            f"places are taken and this request needs {count}; retry after the seconds "
            "in Retry-After, or send smaller batches (the server's SERVE_MAX_QUEUE sets the size)"
        )

    def _executor_for(self, batch: list[_Pending]) -> ThreadPoolExecutor:
        """A batch of shadow copies alone runs on a thread of the lowest scheduling priority (nice 19): when callers'
        work wants the cores, the kernel gives it them at once rather than sharing them with the copies."""
        if any(p.rank < SIDE_RANK for p in batch):
            return self._executor
        if self._side_executor is None:
            self._side_executor = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"shadow-{self.name}",
                initializer=_side_thread,
                initargs=(self.threads,),
            )
        return self._side_executor

    def _next_batch(self, most: int | None = None) -> list[_Pending]:
        """The next items by priority and deadline, up to ``most`` (default: the batch size); a call waiting first
        is a batch of its own. An item whose deadline has passed is answered 504 here, never computed."""
        batch: list[_Pending] = []
        now, expired, most = time.monotonic(), 0, most or self.policy.max_batch_size
        while self._heap and len(batch) < most:
            p = self._heap[0][3]
            if p.queued and p.call is not None and batch:
                break
            heapq.heappop(self._heap)
            if not p.queued or p.future.done():
                continue
            self._leave(p)
            if p.deadline < now:
                expired += 1
                p.future.set_exception(
                    PredictionTimeoutError(
                        f"{self.name} dropped this request unanswered: its deadline passed while it waited in the queue"
                    )
                )
                continue
            batch.append(p)
            if p.call is not None:
                break
        if expired:
            self._dropped("expired", expired)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self.policy.max_wait_ms and self.depth < self.policy.max_batch_size and not self._closing:
                await asyncio.sleep(self.policy.max_wait_ms / 1000)
            while batch := self._next_batch():
                start, call = time.perf_counter(), batch[0].call
                timing = BatchTiming(len(batch), time.time_ns())
                self._running = len(batch)
                try:
                    if call is not None:
                        result, timing.run_started_ns, timing.run_ended_ns = await loop.run_in_executor(
                            self._executor, _timed, call
                        )
                        outputs = [result]
                    else:
                        outputs, timing.run_started_ns, timing.run_ended_ns = await loop.run_in_executor(
                            self._executor_for(batch), _timed, self._predict, [p.item for p in batch]
                        )
                    if len(outputs) != len(batch):
                        raise RuntimeError(f"{self.name} returned {len(outputs)} outputs for {len(batch)} inputs")
                except Exception as exc:  # the whole batch failed: every caller hears why
                    outputs = [exc] * len(batch)
                    timing.run_started_ns = timing.run_started_ns or timing.started_ns
                    timing.run_ended_ns = timing.run_ended_ns or time.time_ns()
                finally:
                    self._running = 0
                elapsed = time.perf_counter() - start
                if call is None:  # a stream's step is no forward pass of a batch
                    self._observe(len(batch), elapsed, self.depth)
                    self._measured(elapsed)
                timing.ended_ns = time.time_ns()
                for p, out in zip(batch, outputs):
                    p.batch = timing
                    if p.future.done():
                        continue
                    if isinstance(out, Exception):
                        p.future.set_exception(out)
                    else:
                        p.future.set_result(out)
            if self._closing and not self.depth:
                return
