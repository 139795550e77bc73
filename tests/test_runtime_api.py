"""Serving runtime over real uvicorn servers: batching, shedding, timeouts, auth, limits, metrics, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time

import httpx
import pytest

from tests.conftest import running_server
from tests.test_tabular_api import PHONE


def _variants(n: int) -> list[dict]:
    """n different phones, so each caller can be matched to its own answer."""
    return [dict(PHONE, ram=300 + 40 * i, battery_power=600 + 10 * i) for i in range(n)]


async def _fire(url: str, path: str, bodies: list[dict], headers: dict | None = None) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=200)) as client:
        return await asyncio.gather(*(client.post(path, json=b, headers=headers) for b in bodies))


def _metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # exposition sorts label names
    pattern = re.compile(rf"^{re.escape(name)}\{{{re.escape(wanted)}\}} (\S+)$", re.M)
    match = pattern.search(text)
    assert match, f"{name}{{{wanted}}} not in metrics"
    return float(match.group(1))


def test_concurrent_requests_are_batched_and_each_caller_gets_its_own_answer(client):
    phones = _variants(48)
    expected = [client.post("/phone-price", json=p).json() for p in phones]  # one at a time
    with running_server(default_batching='{"max_batch_size": 64, "max_wait_ms": 30}') as server:
        responses = asyncio.run(_fire(server.url, "/phone-price", phones))
        for response, alone in zip(responses, expected):  # batched float maths may differ in the 6th decimal
            assert response.json()["price_range"] == alone["price_range"]
            assert response.json()["probabilities"] == pytest.approx(alone["probabilities"], abs=1e-4)
        metrics = httpx.get(server.url + "/metrics").text
    count = _metric(metrics, "model_batch_size_count", model="phone-price")
    total = _metric(metrics, "model_batch_size_sum", model="phone-price")
    assert total == 48 and count < 48, "48 concurrent requests ran in fewer forward passes"


def test_full_queue_sheds_load_with_retry_after():
    with running_server(max_queue="2", default_batching='{"max_batch_size": 1, "max_wait_ms": 300}') as server:
        responses = asyncio.run(_fire(server.url, "/phone-price", _variants(12)))
        metrics = httpx.get(server.url + "/metrics").text
    codes = [r.status_code for r in responses]
    assert 200 in codes and 503 in codes, codes
    shed = [r for r in responses if r.status_code == 503]
    assert all(r.headers["retry-after"] == "1" and "queue is full" in r.json()["detail"] for r in shed)
    assert _metric(metrics, "http_requests_total", route="/phone-price", method="POST", status="503") == len(shed)


def test_slow_prediction_times_out_with_504():
    with running_server(request_timeout_s="0.05", default_batching='{"max_batch_size": 8, "max_wait_ms": 300}') as server:
        response = httpx.post(server.url + "/phone-price", json=PHONE, timeout=10)
    assert response.status_code == 504 and "did not answer within" in response.json()["detail"]


def test_api_keys_guard_model_routes_only():
    with running_server(api_keys='["s3cret", "other"]') as server, server.client() as client:
        denied = client.post("/phone-price", json=PHONE)
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
        assert "X-API-Key" in denied.json()["detail"]
        assert client.post("/phone-price", json=PHONE, headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.post("/phone-price", json=PHONE, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.post("/phone-price", json=PHONE, headers={"Authorization": "Bearer other"}).status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200
    with running_server(api_keys='["k"]', public_ops="false") as server, server.client() as client:
        assert client.get("/models").status_code == 401 and client.get("/metrics").status_code == 401
        assert client.get("/healthz").status_code == 200  # liveness probes carry no key
        assert client.get("/models", headers={"X-API-Key": "k"}).status_code == 200


def test_body_limit_is_413_before_parsing(server):
    with running_server(max_body_bytes="2048") as small:
        big = json.dumps({"instances": [PHONE] * 20}).encode()
        response = httpx.post(small.url + "/phone-price/batch", content=big, headers={"content-type": "application/json"})
        assert response.status_code == 413 and "2048" in response.json()["detail"]

        def chunks():  # no Content-Length: the limit is enforced while streaming
            for _ in range(10):
                yield b" " * 1000
        streamed = httpx.post(small.url + "/phone-price", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        assert httpx.post(small.url + "/phone-price", json=PHONE).status_code == 200


def test_request_id_round_trip_and_metrics_content(client):
    mine = client.post("/phone-price", json=PHONE, headers={"X-Request-ID": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"
    generated = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    text = client.get("/metrics").text
    for name in ("http_requests_total", "http_request_duration_seconds_bucket", "model_batch_size_bucket",
                 "model_inference_seconds_bucket", "model_queue_depth", "model_up"):
        assert name in text, name
    assert _metric(text, "model_up", model="phone-price") == 1.0
    assert _metric(text, "http_requests_total", route="/phone-price", method="POST", status="200") >= 1


def test_json_logs_carry_request_fields():
    with running_server(log_json="true") as server:
        httpx.post(server.url + "/phone-price", json=PHONE, headers={"X-Request-ID": "log-me"})
        time.sleep(0.2)
        lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    entry = next(e for e in lines if e.get("request_id") == "log-me")
    assert entry["route"] == "/phone-price" and entry["status"] == 200 and entry["batch_size"] == 1
    assert entry["latency_ms"] > 0


def test_sigterm_finishes_accepted_requests():
    phones = _variants(40)
    with running_server(default_batching='{"max_batch_size": 64, "max_wait_ms": 500}') as server:
        async def scenario():
            async with httpx.AsyncClient(base_url=server.url, timeout=30,
                                         limits=httpx.Limits(max_connections=100)) as client:
                tasks = [asyncio.create_task(client.post("/phone-price", json=p)) for p in phones]
                await asyncio.sleep(0.25)  # all sent; the batcher is still waiting out its 500 ms
                server.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                responses = await asyncio.gather(*tasks)
                return responses, time.monotonic() - signalled
        responses, after_signal = asyncio.run(scenario())
        assert server.process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    assert [r.status_code for r in responses] == [200] * len(phones)
    assert after_signal > 0.1, "the requests were still queued when SIGTERM arrived"
    assert "Shutting down" in server.output()
