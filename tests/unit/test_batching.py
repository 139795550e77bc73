"""The batcher on its own: policy, ordering, load shedding, timeouts, per-item errors, draining."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from service.models.base import InputError
from service.runtime.batching import SIDE_RANK, Batcher, PredictionTimeoutError, QueueFullError
from service.settings import BatchPolicy


class Recorder:
    """A predict function that doubles numbers, records batch sizes, and can be slowed down."""

    def __init__(self, delay: float = 0.0):
        self.batches: list[list[int]] = []
        self.delay = delay
        self.threads: set[str] = set()

    def __call__(self, items: list[int]) -> list:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        time.sleep(self.delay)
        return [InputError(f"bad {x}") if x < 0 else x * 2 for x in items]


def run(coro):
    return asyncio.run(coro)


async def _with_batcher(predict, policy=None, max_queue=100, timeout_s=5.0, body=None):
    batcher = Batcher("test", predict, policy or BatchPolicy(), max_queue=max_queue, timeout_s=timeout_s)
    batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.stop()


def test_idle_request_runs_alone_and_off_the_event_loop():
    recorder = Recorder()

    async def body(batcher):
        return await batcher.submit([21])

    assert run(_with_batcher(recorder, body=body)) == [42]
    assert recorder.batches == [[21]]
    assert recorder.threads == {"model-test_0"}


def test_arrivals_during_a_forward_pass_form_the_next_batch_and_keep_their_order():
    recorder = Recorder(delay=0.05)

    async def body(batcher):
        first = asyncio.create_task(batcher.submit([0]))
        await asyncio.sleep(0.01)  # the first pass is running now
        rest = await asyncio.gather(*(batcher.submit([i]) for i in range(1, 9)))
        return [await first, *rest]

    results = run(_with_batcher(recorder, body=body))
    assert results == [[2 * i] for i in range(9)]
    assert recorder.batches[0] == [0] and recorder.batches[1] == list(range(1, 9))


def test_max_batch_size_and_max_wait():
    recorder = Recorder()

    async def body(batcher):
        return await asyncio.gather(*(batcher.submit([i]) for i in range(10)))

    run(_with_batcher(recorder, BatchPolicy(max_batch_size=4, max_wait_ms=30), body=body))
    assert [len(b) for b in recorder.batches] == [4, 4, 2]


def test_full_queue_sheds_load_at_once():
    async def body(batcher):
        waiting = asyncio.create_task(batcher.submit([1, 2, 3]))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="queue is full"):
            await batcher.submit([4])
        return await waiting

    assert run(_with_batcher(Recorder(), BatchPolicy(max_wait_ms=50), max_queue=3, body=body)) == [2, 4, 6]


def test_timeout_frees_the_slot():
    recorder = Recorder(delay=0.2)

    async def body(batcher):
        slow = asyncio.create_task(batcher.submit([1]))  # occupies the worker for 0.2 s
        await asyncio.sleep(0.01)
        batcher.timeout_s = 0.05
        with pytest.raises(PredictionTimeoutError):
            await batcher.submit([2])
        assert batcher.depth == 0  # the timed-out item left the queue
        batcher.timeout_s = 5.0
        return await slow

    assert run(_with_batcher(recorder, body=body)) == [2]
    assert [2] not in recorder.batches  # never computed


def test_a_bad_item_fails_only_its_own_caller():
    async def body(batcher):
        return await asyncio.gather(batcher.submit([1]), batcher.submit([-1]), batcher.submit([3, -4, 5]))

    ok1, (bad,), (ok3, bad4, ok5) = run(_with_batcher(Recorder(), BatchPolicy(max_wait_ms=20), body=body))
    assert (ok1, ok3, ok5) == ([2], 6, 10) and isinstance(bad, InputError) and str(bad4) == "bad -4"


def test_stop_finishes_queued_work():
    recorder = Recorder(delay=0.02)

    async def main():
        batcher = Batcher("test", recorder, BatchPolicy(max_batch_size=2), max_queue=100, timeout_s=5)
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit([i])) for i in range(6)]
        await asyncio.sleep(0)
        await batcher.stop()
        with pytest.raises(QueueFullError, match="shutting down"):
            await batcher.submit([9])
        return await asyncio.gather(*tasks)

    assert run(main()) == [[2 * i] for i in range(6)]


def test_each_worker_keeps_its_own_torch_thread_count():
    import torch

    async def body():
        one = Batcher("one", Recorder(), BatchPolicy(), max_queue=10, timeout_s=5.0, threads=1)
        two = Batcher("two", Recorder(), BatchPolicy(), max_queue=10, timeout_s=5.0, threads=2)
        one.start()
        two.start()
        try:
            return await one.call(torch.get_num_threads), await two.call(torch.get_num_threads)
        finally:
            await one.stop()
            await two.stop()

    main_threads = torch.get_num_threads()
    assert run(body()) == (1, 2)
    assert torch.get_num_threads() == main_threads


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice values are a Linux feature")
def test_shadow_copies_alone_run_on_a_lowest_priority_thread_and_callers_never_do():
    niceness: dict[str, int] = {}

    def predict(items: list) -> list:
        niceness[items[0]] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return items

    async def body(batcher):
        await batcher.submit(["copy"], rank=SIDE_RANK)
        await batcher.submit(["caller"], rank=1)
        await batcher.submit(["copy again"], rank=SIDE_RANK)

    run(_with_batcher(predict, body=body))
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert niceness == {"copy": 19, "caller": base, "copy again": 19}
