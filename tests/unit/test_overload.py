"""Overload control in process: the batcher's priorities, deadlines and shedding on a model that records what
it computed; the shared token buckets; the key settings; X-Request-Timeout and 429s through the real app."""

import asyncio
import multiprocessing
import time

import pytest
from pydantic import ValidationError

from service.errors import DeadlineUnmeetableError, InputRejected, PredictionTimeoutError, QueueFullError
from service.runtime.batching import Batcher
from service.runtime.quotas import RateLimits
from service.settings import ApiKey, BatchPolicy, Settings
from tests.conftest import serving

HIGH, NORMAL, LOW = 0, 1, 2


class Recorder:
    """A model that takes ``seconds`` per batch and remembers every item it computed, in order."""

    def __init__(self, seconds: float):
        self.seconds, self.computed = seconds, []

    def __call__(self, items: list) -> list:
        time.sleep(self.seconds)
        self.computed.extend(items)
        return [f"answer {i}" for i in items]


def batcher(model: Recorder, max_batch: int = 1, max_queue: int = 100, dropped=None) -> Batcher:
    return Batcher(
        "m", model, BatchPolicy(max_batch_size=max_batch), max_queue=max_queue, timeout_s=30, dropped=dropped
    )


async def started(b: Batcher) -> Batcher:
    b.start()
    return b


def test_high_priority_is_served_before_low_that_came_first():
    model = Recorder(0.02)

    async def scenario():
        b = await started(batcher(model))
        first = asyncio.create_task(b.submit(["busy"], rank=NORMAL))  # keeps the model busy while the rest queue
        await asyncio.sleep(0.005)
        low = [asyncio.create_task(b.submit([f"low{i}"], rank=LOW)) for i in range(3)]
        await asyncio.sleep(0)
        high = [asyncio.create_task(b.submit([f"high{i}"], rank=HIGH)) for i in range(3)]
        await asyncio.gather(first, *low, *high)
        await b.stop()

    asyncio.run(scenario())
    assert model.computed == ["busy", "high0", "high1", "high2", "low0", "low1", "low2"]


def test_earliest_deadline_first_within_a_priority():
    model = Recorder(0.02)

    async def scenario():
        b = await started(batcher(model))
        now = time.monotonic()
        first = asyncio.create_task(b.submit(["busy"]))
        await asyncio.sleep(0.005)
        late = asyncio.create_task(b.submit(["late"], deadline=now + 5))
        soon = asyncio.create_task(b.submit(["soon"], deadline=now + 1))
        await asyncio.gather(first, late, soon)
        await b.stop()

    asyncio.run(scenario())
    assert model.computed == ["busy", "soon", "late"]


def test_an_expired_request_is_never_computed():
    model, drops = Recorder(0.05), []

    async def scenario():
        b = await started(batcher(model, dropped=lambda reason, n: drops.append((reason, n))))
        busy = asyncio.create_task(b.submit(["busy"]))
        await asyncio.sleep(0.005)
        started_at = time.monotonic()
        with pytest.raises(PredictionTimeoutError, match="deadline"):
            await b.submit(["too late"], deadline=time.monotonic() + 0.02)  # the busy batch takes 50 ms
        waited = time.monotonic() - started_at
        await busy
        await asyncio.sleep(0.1)  # the model is free again: the expired item would run now if it were still queued
        await b.stop()
        return waited

    waited = asyncio.run(scenario())
    assert "too late" not in model.computed and model.computed == ["busy"]
    assert waited < 0.045  # answered at its deadline, not when the model got to it
    assert ("expired", 1) in drops


def test_a_deadline_the_queue_cannot_meet_is_refused_on_arrival():
    model, drops = Recorder(0.02), []

    async def scenario():
        b = await started(batcher(model, dropped=lambda reason, n: drops.append((reason, n))))
        await b.submit(["warm-up"])  # a measured batch time: 20 ms
        queue = [asyncio.create_task(b.submit([f"q{i}"])) for i in range(10)]  # about 200 ms of work
        await asyncio.sleep(0)
        t = time.monotonic()
        with pytest.raises(DeadlineUnmeetableError, match="10 items are ahead"):
            await b.submit(["hopeless"], deadline=time.monotonic() + 0.05)
        refused_after = time.monotonic() - t
        ok = await b.submit(["patient"], deadline=time.monotonic() + 5)
        await asyncio.gather(*queue)
        await b.stop()
        return refused_after, ok

    refused_after, ok = asyncio.run(scenario())
    assert refused_after < 0.01 and ok == ["answer patient"]
    assert "hopeless" not in model.computed and ("unmeetable", 1) in drops


def test_a_full_queue_sheds_low_priority_for_high_and_refuses_low():
    model = Recorder(0.03)

    async def scenario():
        b = await started(batcher(model, max_queue=4))
        busy = asyncio.create_task(b.submit(["busy"]))
        await asyncio.sleep(0.005)
        low = [asyncio.create_task(b.submit([f"low{i}"], rank=LOW)) for i in range(4)]  # fills the queue
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="queue is full"):
            await b.submit(["one more low"], rank=LOW)
        high = await asyncio.gather(*(b.submit([f"high{i}"], rank=HIGH) for i in range(2)))
        lows = [(await t)[0] for t in low]
        await busy
        await b.stop()
        return high, lows

    high, lows = asyncio.run(scenario())
    assert high == [["answer high0"], ["answer high1"]]
    shed = [out for out in lows if isinstance(out, QueueFullError)]
    assert len(shed) == 2 and "higher-priority requests took" in str(shed[0])
    assert "low2" not in model.computed and "low3" not in model.computed  # the latest low ones gave their places


# -- rate limits -------------------------------------------------------------------------------------------


def test_token_bucket_counts_instances_refills_and_says_so():
    key = ApiKey(key="secret", name="jobs", rate_per_s=10, burst=20)
    limits = RateLimits([key, ApiKey(key="other", name="web")])
    first = limits.take(key, 15)
    assert first.allowed and first.headers == {"RateLimit-Policy": '"jobs";q=20;w=2', "RateLimit": '"jobs";r=5;t=2'}
    refused = limits.take(key, 10)
    assert not refused.allowed and 0.4 < refused.retry_after_s <= 0.5
    time.sleep(0.5)
    assert limits.take(key, 10).allowed  # 5 left + 0.5 s x 10/s
    with pytest.raises(InputRejected, match="at most 20 at once"):
        limits.take(key, 21)


def _take_in_child(limits: RateLimits, key: ApiKey) -> None:
    limits.take(key, 8)


def test_buckets_are_shared_with_forked_workers():
    key = ApiKey(key="secret", name="jobs", rate_per_s=0.001, burst=10)
    limits = RateLimits([key])
    child = multiprocessing.get_context("fork").Process(target=_take_in_child, args=(limits, key))
    child.start()
    child.join(10)
    assert child.exitcode == 0
    assert limits.take(key, 2).allowed and not limits.take(key, 1).allowed  # the child took 8 of the 10


def test_key_settings_accept_strings_and_objects():
    settings = Settings(
        api_keys=["plain", {"key": "k1", "name": "web", "priority": "high"}, {"key": "k2", "rate_per_s": 50}]
    )
    plain, web, jobs = settings.api_keys
    assert (plain.name, plain.priority, plain.rate_per_s) == ("key-1", "normal", None)
    assert (web.name, web.priority) == ("web", "high") and (jobs.name, jobs.capacity) == ("key-3", 50)
    assert "k2" not in repr(jobs)  # the secret never reaches a log line through repr
    with pytest.raises(ValidationError, match="same key"):
        Settings(api_keys=["same", {"key": "same", "name": "x"}])
    with pytest.raises(ValidationError):
        Settings(api_keys=[{"key": "k", "priority": "urgent"}])


# -- through the app ---------------------------------------------------------------------------------------


def test_request_timeout_header_is_checked_and_rate_limits_answer_429(stub_app):
    keys = [
        {"key": "web-key", "name": "web", "priority": "high"},
        {"key": "jobs-key", "name": "jobs", "rate_per_s": 1, "burst": 3},
    ]

    async def scenario():
        async with serving(stub_app(api_keys=keys)) as client:
            web, jobs = {"X-API-Key": "web-key"}, {"X-API-Key": "jobs-key"}
            bad = await client.post("/doubler", json={"x": 1}, headers={**web, "X-Request-Timeout": "soon"})
            zero = await client.post("/doubler", json={"x": 1}, headers={**web, "X-Request-Timeout": "0"})
            fine = await client.post("/doubler", json={"x": 1}, headers={**web, "X-Request-Timeout": "2.5"})
            late = await client.post(
                "/doubler", json={"x": 1, "sleep_ms": 300}, headers={**web, "X-Request-Timeout": "0.1"}
            )
            batch = await client.post("/doubler/batch", json={"instances": [{"x": 1}] * 3}, headers=jobs)
            over = await client.post("/doubler", json={"x": 1}, headers=jobs)
            other = await client.post("/doubler", json={"x": 1}, headers=web)
            metrics = (await client.get("/metrics")).text
        return bad, zero, fine, late, batch, over, other, metrics

    bad, zero, fine, late, batch, over, other, metrics = asyncio.run(scenario())
    assert bad.status_code == zero.status_code == 400 and "X-Request-Timeout" in bad.json()["detail"]
    assert fine.status_code == 200 and late.status_code == 504
    assert batch.status_code == 200 and batch.headers["RateLimit"] == '"jobs";r=0;t=3'
    assert over.status_code == 429 and over.headers["Retry-After"] == "1"
    assert over.headers["RateLimit-Policy"] == '"jobs";q=3;w=3' and "over its rate" in over.json()["detail"]
    assert other.status_code == 200 and "RateLimit" not in other.headers  # an unlimited key
    assert 'api_key_instances_total{key_name="jobs",outcome="limited"} 1.0' in metrics
    assert 'api_key_instances_total{key_name="jobs",outcome="admitted"} 3.0' in metrics
    assert "jobs-key" not in metrics
