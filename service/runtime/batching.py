"""Dynamic batching for one model, with Triton's default policy and a bounded queue.

When the model is idle a request runs at once with whatever is queued, so low load adds no latency.
While a forward pass runs, new arrivals queue up and form the next batch (up to ``max_batch_size``);
``max_wait_ms`` > 0 additionally waits for a fuller batch. Model work runs on one worker thread per
model, never on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from service.errors import PredictionTimeoutError, QueueFullError
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


@dataclass(slots=True)
class _Pending:
    item: Any
    future: asyncio.Future
    batch: BatchTiming | None = None  # the forward pass this item ran in
    call: Callable[[], Any] | None = None  # instead of an item: a function run alone, in its turn (a stream's step)


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
    ):
        self.name, self.policy, self.max_queue, self.timeout_s = name, policy, max_queue, timeout_s
        self.threads = threads
        self._predict = predict
        self._observe = observe or (lambda size, seconds, depth: None)
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        # torch's thread count is per calling thread (an OpenMP setting), so each model's worker keeps its own
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"model-{name}",
            initializer=functools.partial(torch.set_num_threads, threads) if threads else None,
        )
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Finish everything already queued, then stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def call(self, function: Callable, *args: Any, meta: dict | None = None) -> Any:
        """Run ``function(*args)`` on this model's worker thread in its turn in the queue, between batches (a
        stream's planning and each of its steps): it takes a queue place and its timeout like an item."""
        (result,) = await self._enqueue([None], meta, call=functools.partial(function, *args))
        if isinstance(result, Exception):
            raise result
        return result

    async def submit(self, items: list, meta: dict | None = None) -> list:
        """Queue ``items`` and wait for their outputs, in order, with the exception in place of an item that
        failed (so a batch request can say which instance); raises QueueFullError or PredictionTimeoutError.

        ``meta["batch_size"]`` is set to the largest forward pass the items ran in, ``meta["batches"]`` to each
        item's :class:`BatchTiming`.
        """
        return await self._enqueue(items, meta)

    async def _enqueue(self, items: list, meta: dict | None, call: Callable[[], Any] | None = None) -> list:
        if self._closing:
            raise QueueFullError(f"{self.name} is shutting down")
        if len(self._queue) + len(items) > self.max_queue:
            raise QueueFullError(
                f"the {self.name} model's queue is full: {len(self._queue)} of its {self.max_queue} "
                f"places are taken and this request needs {len(items)}; retry after the seconds "
                "in Retry-After, or send smaller batches (the server's SERVE_MAX_QUEUE sets the size)"
            )
        loop = asyncio.get_running_loop()
        pending = [_Pending(item, loop.create_future(), call=call) for item in items]
        self._queue.extend(pending)
        self._wakeup.set()
        try:
            # asyncio.timeout rather than wait_for(gather(...)): no extra tasks per request on the hot path
            async with asyncio.timeout(self.timeout_s):
                outputs = [await _result_or_error(p.future) for p in pending]
            if meta is not None:
                meta["batches"] = batches = [p.batch for p in pending]
                meta["batch_size"] = max((b.size for b in batches if b is not None), default=0)
            return outputs
        except TimeoutError:
            raise PredictionTimeoutError(f"{self.name} did not answer within {self.timeout_s:g} s") from None
        finally:  # free the slots of anything not yet taken (timeout, client gone)
            for p in pending:
                if not p.future.done():
                    p.future.cancel()
            if any(p.future.cancelled() for p in pending):
                self._queue = deque(p for p in self._queue if not p.future.cancelled())

    def _next_batch(self) -> list[_Pending]:
        """The next items in the queue, up to the batch size; a call waiting first is a batch of its own."""
        batch: list[_Pending] = []
        while self._queue and len(batch) < self.policy.max_batch_size:
            if self._queue[0].call is not None and batch:
                break
            p = self._queue.popleft()
            if not p.future.done():
                batch.append(p)
                if p.call is not None:
                    break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self.policy.max_wait_ms and len(self._queue) < self.policy.max_batch_size and not self._closing:
                await asyncio.sleep(self.policy.max_wait_ms / 1000)
            while batch := self._next_batch():
                start, call = time.perf_counter(), batch[0].call
                timing = BatchTiming(len(batch), time.time_ns())
                try:
                    if call is not None:
                        result, timing.run_started_ns, timing.run_ended_ns = await loop.run_in_executor(
                            self._executor, _timed, call
                        )
                        outputs = [result]
                    else:
                        outputs, timing.run_started_ns, timing.run_ended_ns = await loop.run_in_executor(
                            self._executor, _timed, self._predict, [p.item for p in batch]
                        )
                    if len(outputs) != len(batch):
                        raise RuntimeError(f"{self.name} returned {len(outputs)} outputs for {len(batch)} inputs")
                except Exception as exc:  # the whole batch failed: every caller hears why
                    outputs = [exc] * len(batch)
                    timing.run_started_ns = timing.run_started_ns or timing.started_ns
                    timing.run_ended_ns = timing.run_ended_ns or time.time_ns()
                if call is None:  # a stream's step is no forward pass of a batch
                    self._observe(len(batch), time.perf_counter() - start, len(self._queue))
                timing.ended_ns = time.time_ns()
                for p, out in zip(batch, outputs):
                    p.batch = timing
                    if p.future.done():
                        continue
                    if isinstance(out, Exception):
                        p.future.set_exception(out)
                    else:
                        p.future.set_result(out)
            if self._closing and not self._queue:
                return
