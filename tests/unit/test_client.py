"""The shipped client (client/__init__.py) in process on the stub model, for its logic: retries after
Retry-After, batching, streams, errors (every real route: tests/e2e/test_client_real_routes.py)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from client import AsyncClient, ServiceError
from tests.conftest import serving
from tests.unit.test_runtime_api import _metric


def test_async_client_retries_503s_after_retry_after_and_keeps_order(stub_app):
    app = stub_app(max_queue=2, default_batching={"max_batch_size": 1})

    async def scenario():
        async with (
            serving(app),
            AsyncClient(
                "http://in-process", transport=httpx.ASGITransport(app=app), retries=20, max_wait_s=0.05
            ) as client,
        ):
            answers = await asyncio.gather(*(client.predict("doubler", {"x": i, "sleep_ms": 20}) for i in range(10)))
            metrics = (await client._http.get("/metrics")).text
            return answers, metrics

    answers, metrics = asyncio.run(scenario())
    assert answers == [{"y": 2.0 * i} for i in range(10)]
    assert _metric(metrics, "http_requests_total", route="/doubler", method="POST", status="503") > 0, (
        "the queue was full at times, and the client retried"
    )


def test_async_client_batches_streams_and_errors(stub_app):
    app = stub_app()

    async def scenario():
        async with (
            serving(app),
            AsyncClient("http://in-process", transport=httpx.ASGITransport(app=app)) as client,
        ):
            many = await client.predict_many("doubler", ({"x": i} for i in range(600)), batch_size=256)
            events = [event async for event in client.stream("doubler", {"x": 4.5})]
            upload = await client.upload("doubler", b"2", route="text", times=5)
            with pytest.raises(ServiceError) as bad:
                await client.predict("doubler", {"x": -1})
            with pytest.raises(ServiceError) as bad_stream:
                [event async for event in client.stream("doubler", {"x": -1})]
            return many, events, upload, bad.value, bad_stream.value

    many, events, upload, bad, bad_stream = asyncio.run(scenario())
    assert many == [{"y": 2.0 * i} for i in range(600)]
    assert events == [("digit", {"digit": c}) for c in "9.0"] + [("doubler", {"y": 9.0})]
    assert upload == {"y": 20.0}
    assert bad.status == 422 and bad.detail[0]["loc"] == ["body", "x"]
    assert bad_stream.status == 422
