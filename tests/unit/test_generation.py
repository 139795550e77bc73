"""Continuous batching in process: the ContinuousBatcher on a generating model that records every step."""

import asyncio
import time
from collections.abc import Hashable

import pytest
from pydantic import BaseModel

from service.errors import InputError, PredictionTimeoutError
from service.models.base import RunningBatch
from service.runtime.batching import Pieces
from service.runtime.generation import ContinuousBatcher
from service.settings import BatchPolicy


class Written(BaseModel):
    text: str


class Counting(RunningBatch):
    """Writes ``item`` pieces for an int item ("a0", "a1", ...); -1 is an invalid input; "boom" fails a step."""

    def __init__(self, model: "Generator"):
        self.model, self.rows = model, dict[Hashable, list]()

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, key: Hashable, item) -> None:
        if item == -1:
            raise InputError("-1 is not a length; send 0 or more", "n")
        self.rows[key] = [item, []]

    def leave(self, key: Hashable) -> None:
        del self.rows[key]
        self.model.left.append(key)

    def step(self) -> list:
        time.sleep(self.model.seconds)
        self.model.steps.append([item for item, _ in self.rows.values()])
        pieces: list = []
        for key, (item, written) in list(self.rows.items()):
            if item == "boom":
                raise RuntimeError("the step failed")
            written.append(f"{item}:{len(written)}")
            pieces.append((key, written[-1]))
            if len(written) >= item:
                pieces.append((key, Written(text=" ".join(written))))
                del self.rows[key]
        return pieces


class Generator:
    """The predictor side: a RunningBatch per worker loop, and what it saw."""

    drift = None

    def __init__(self, seconds: float = 0.0):
        self.seconds, self.steps, self.left = seconds, list[list](), list[Hashable]()

    def running_batch(self) -> Counting:
        return Counting(self)

    def run(self, batch: list) -> list:
        raise AssertionError("a generating model is stepped, never run per batch")


def batcher(model: Generator, cap: int = 4) -> ContinuousBatcher:
    return ContinuousBatcher("poem", model, BatchPolicy(max_batch_size=cap), max_queue=100, timeout_s=30)  # type: ignore[arg-type]


def run(scenario):
    return asyncio.run(scenario())


def test_a_short_request_joins_the_running_batch_and_leaves_before_a_long_one():
    model = Generator(seconds=0.002)

    async def scenario():
        b = batcher(model)
        b.start()
        long = asyncio.create_task(b.submit([40]))
        await asyncio.sleep(0.02)  # the long one is some steps in
        (short,) = await b.submit([3])
        assert not long.done(), "the short request finished while the long one still runs"
        (answer,) = await long
        await b.stop()
        return short, answer

    short, answer = run(scenario)
    assert short.text == "3:0 3:1 3:2" and answer.text.split()[-1] == "40:39"
    shared = [step for step in model.steps if step == [40, 3]]
    assert len(shared) == 3, "the short request ran exactly its 3 steps beside the long one"
    assert model.steps[0] == [40] and model.steps[-1] == [40]


def test_never_more_rows_than_the_cap_and_every_request_is_answered_in_order():
    model = Generator()

    async def scenario():
        b = batcher(model, cap=4)
        b.start()
        answers = await asyncio.gather(*(b.submit([n]) for n in range(1, 11)))
        await b.stop()
        return [a for (a,) in answers]

    answers = run(scenario)
    assert [a.text.split()[-1] for a in answers] == [f"{n}:{n - 1}" for n in range(1, 11)]
    assert max(len(step) for step in model.steps) == 4
    assert sum(len(step) for step in model.steps) == sum(range(1, 11)), "each piece written once"


def test_an_invalid_input_fails_alone_and_a_failed_step_fails_only_the_requests_running():
    model = Generator()

    async def scenario():
        b = batcher(model)
        b.start()
        bad, good = await b.submit([-1, 2])
        failed = await asyncio.gather(b.submit(["boom"]), return_exceptions=True)
        (after,) = await b.submit([2])  # a fresh running batch: the server keeps writing
        await b.stop()
        return bad, good, failed, after

    bad, good, failed, after = run(scenario)
    assert isinstance(bad, InputError) and good.text == "2:0 2:1"
    assert isinstance(failed[0][0], RuntimeError)
    assert after.text == "2:0 2:1"


def test_a_stream_gets_each_piece_as_its_step_completes_then_the_answer():
    model = Generator(seconds=0.01)

    async def scenario():
        b = batcher(model)
        b.start()
        pieces, arrivals = Pieces(), []
        await b.stream(3, pieces, None, 1, None)
        while (piece := await pieces.get()) is not None:
            arrivals.append((piece, time.perf_counter()))
        await b.stop()
        return arrivals

    arrivals = run(scenario)
    assert [p for p, _ in arrivals[:3]] == ["3:0", "3:1", "3:2"] and arrivals[3][0].text == "3:0 3:1 3:2"
    gaps = [b - a for (_, a), (_, b) in zip(arrivals, arrivals[1:3])]
    assert all(gap > 0.005 for gap in gaps), f"pieces arrived together, not step by step: {gaps}"


def test_a_stream_whose_caller_leaves_leaves_the_batch_at_the_next_step():
    model = Generator(seconds=0.005)

    async def scenario():
        b = batcher(model)
        b.start()
        pieces = Pieces()
        await b.stream(1000, pieces, None, 1, None)
        await pieces.get()
        pieces.gone = True  # what Stream.close does when the client disconnects
        steps_then = len(model.steps)
        await asyncio.sleep(0.1)
        steps_after = len(model.steps)
        (other,) = await b.submit([1])  # its place is free again
        await b.stop()
        return steps_then, steps_after, other

    steps_then, steps_after, other = run(scenario)
    assert len(model.left) == 1
    assert steps_after - steps_then <= 2, "the stream kept being written after its caller left"
    assert other.text == "1:0" and model.steps[-1] == [1], "the next request ran alone"


def test_a_request_past_its_deadline_is_answered_504_and_leaves_the_batch():
    model = Generator(seconds=0.005)

    async def scenario():
        b = batcher(model)
        b.start()
        with pytest.raises(PredictionTimeoutError):
            await b.submit([10_000], deadline=time.monotonic() + 0.05)
        await asyncio.sleep(0.05)
        steps = len(model.steps)
        await asyncio.sleep(0.05)
        idle = len(model.steps) == steps
        await b.stop()
        return idle

    assert run(scenario), "the worker kept writing an answer nobody waits for"
    assert len(model.left) == 1


def test_a_queue_wait_beyond_the_cap_is_served_by_priority():
    model = Generator(seconds=0.002)

    async def scenario():
        b = batcher(model, cap=1)
        b.start()
        busy = asyncio.create_task(b.submit([20]))
        await asyncio.sleep(0.005)
        order: list[str] = []

        async def ask(name: str, rank: int):
            await b.submit([1], rank=rank)
            order.append(name)

        await asyncio.gather(ask("low", 2), ask("normal", 1), ask("high", 0))
        await busy
        await b.stop()
        return order

    assert run(scenario) == ["high", "normal", "low"]


def test_only_complete_answers_measure_how_long_a_generation_takes():
    model = Generator(seconds=0.002)

    async def scenario():
        b = batcher(model)
        b.start()
        await b.submit([10])
        measured = b.batch_seconds
        pieces = Pieces()
        await b.stream(1000, pieces, None, 1, None)
        await pieces.get()
        pieces.gone = True  # a caller leaving after a step is no generation's time
        await asyncio.sleep(0.05)
        cut_short = b.batch_seconds
        await b.stop()
        return measured, cut_short

    measured, cut_short = run(scenario)
    assert measured is not None and measured >= 10 * 0.002 and cut_short == measured
