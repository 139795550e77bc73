"""Serving runtime through the real app factory on the stub model, in process: batching, shedding, timeouts,
auth, limits, request ids, metrics and logs (SIGTERM draining on a real server:
tests/integration/test_runtime_processes.py)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re

import httpx
import pytest

from tests.conftest import serving


def _metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # exposition sorts label names
    pattern = re.compile(rf"^{re.escape(name)}\{{{re.escape(wanted)}\}} (\S+)$", re.M)
    match = pattern.search(text)
    assert match, f"{name}{{{wanted}}} not in metrics"
    return float(match.group(1))


async def _fire(client: httpx.AsyncClient, path: str, bodies: list[dict], headers: dict | None = None) -> list:
    return await asyncio.gather(*(client.post(path, json=b, headers=headers) for b in bodies))


def test_concurrent_requests_are_batched_and_each_caller_gets_its_own_answer(stub_app):
    async def scenario():
        app = stub_app(default_batching={"max_batch_size": 64, "max_wait_ms": 30})
        async with serving(app) as client:
            responses = await _fire(client, "/doubler", [{"x": i, "sleep_ms": 5} for i in range(48)])
            return responses, (await client.get("/metrics")).text

    responses, metrics = asyncio.run(scenario())
    assert [r.json() for r in responses] == [{"y": 2.0 * i} for i in range(48)]
    count = _metric(metrics, "model_batch_size_count", model="doubler")
    total = _metric(metrics, "model_batch_size_sum", model="doubler")
    assert total == 48 and count < 48, "48 concurrent requests ran in fewer forward passes"


def test_requests_in_flight_die_young_instead_of_filling_the_older_generations(stub_app):
    """With Python's default young generation (700 objects), these 320 requests ran 68 collections, 6 of them
    of the older generation that re-scans what the young ones moved there: a tenth of a small request's time."""

    async def scenario():
        async with serving(stub_app()) as client:
            before = [generation["collections"] for generation in gc.get_stats()]
            for _ in range(5):
                answers = await asyncio.gather(*(client.post("/doubler", json={"x": i}) for i in range(64)))
                assert all(answer.status_code == 200 for answer in answers)
            return [generation["collections"] - n for generation, n in zip(gc.get_stats(), before, strict=True)]

    young, older, oldest = asyncio.run(scenario())
    assert young <= 1 and older == oldest == 0


def test_a_bad_item_in_a_batch_fails_only_its_own_caller(stub_app):
    async def scenario():
        async with serving(stub_app(default_batching={"max_wait_ms": 30})) as client:
            return await _fire(client, "/doubler", [{"x": 1}, {"x": -1}, {"x": 3}])

    ok, bad, ok3 = asyncio.run(scenario())
    assert ok.json() == {"y": 2.0} and ok3.json() == {"y": 6.0}
    assert bad.status_code == 422 and bad.json()["detail"] == [
        {"loc": ["body", "x"], "msg": "x must not be negative", "type": "value_error"}
    ]


def test_errors_in_a_batch_name_each_instance(stub_app):
    async def scenario():
        async with serving(stub_app()) as client:
            return await client.post("/doubler/batch", json={"instances": [{"x": 1}, {"x": -1}, {"x": 2}, {"x": -3}]})

    response = asyncio.run(scenario())
    assert response.status_code == 422 and response.json()["detail"] == [
        {"loc": ["body", "instances", i, "x"], "msg": "x must not be negative", "type": "value_error"} for i in (1, 3)
    ]


def test_full_queue_sheds_load_with_retry_after(stub_app):
    async def scenario():
        app = stub_app(max_queue=2, default_batching={"max_batch_size": 1})
        async with serving(app) as client:
            responses = await _fire(client, "/doubler", [{"x": i, "sleep_ms": 50} for i in range(12)])
            return responses, (await client.get("/metrics")).text

    responses, metrics = asyncio.run(scenario())
    codes = [r.status_code for r in responses]
    assert 200 in codes and 503 in codes, codes
    shed = [r for r in responses if r.status_code == 503]
    assert all(r.headers["retry-after"] == "1" and "queue is full" in r.json()["detail"] for r in shed)
    assert _metric(metrics, "http_requests_total", route="/doubler", method="POST", status="503") == len(shed)


def test_slow_prediction_times_out_with_504(stub_app):
    async def scenario():
        async with serving(stub_app(request_timeout_s=0.05)) as client:
            return await client.post("/doubler", json={"x": 1, "sleep_ms": 300})

    response = asyncio.run(scenario())
    assert response.status_code == 504 and "did not answer within" in response.json()["detail"]


def test_api_keys_guard_model_routes_only(stub_app):
    async def open_ops():
        async with serving(stub_app(api_keys=["s3cret", "other"])) as client:
            denied = await client.post("/doubler", json={"x": 1})
            assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
            assert "X-API-Key" in denied.json()["detail"]
            assert (await client.post("/doubler", json={"x": 1}, headers={"X-API-Key": "wrong"})).status_code == 401
            assert (await client.post("/doubler", json={"x": 1}, headers={"X-API-Key": "s3cret"})).status_code == 200
            bearer = await client.post("/doubler", json={"x": 1}, headers={"Authorization": "Bearer other"})
            assert bearer.status_code == 200
            assert (await client.get("/healthz")).status_code == 200 and (
                await client.get("/metrics")
            ).status_code == 200

    async def closed_ops():
        async with serving(stub_app(api_keys=["k"], public_ops=False)) as client:
            for path in ("/models", "/metrics", "/readyz", "/openapi.json", "/docs", "/redoc"):
                assert (await client.get(path)).status_code == 401, path
                assert (await client.get(path, headers={"X-API-Key": "k"})).status_code == 200, path
            assert (await client.get("/healthz")).status_code == 200  # liveness probes carry no key

    asyncio.run(open_ops())
    asyncio.run(closed_ops())


def test_the_key_is_checked_before_the_body_is_read(stub_app):
    read = []

    async def body():  # records every chunk the server asks for
        for chunk in (b'{"x": ', b"1}"):
            read.append(chunk)
            yield chunk

    async def scenario():
        async with serving(stub_app(api_keys=["k"])) as client:
            denied = await client.post("/doubler", content=body(), headers={"content-type": "application/json"})
            assert denied.status_code == 401 and read == []
            unknown = await client.post("/no-such-route", content=b"{}")  # no hint which paths exist
            assert unknown.status_code == 401
            allowed = await client.post(
                "/doubler", content=body(), headers={"X-API-Key": "k", "content-type": "application/json"}
            )
            assert allowed.status_code == 200 and read == [b'{"x": ', b"1}"]

    asyncio.run(scenario())


def test_each_route_takes_the_largest_body_it_needs(stub_app):
    async def scenario():
        async with serving(stub_app()) as client:
            padded = {"x": 1.0, "sleep_ms": 0, "pad": " " * 20_000}  # larger than one instance can be
            single = await client.post("/doubler", json=padded)
            assert single.status_code == 413 and "16384 bytes for /doubler" in single.json()["detail"]
            # the largest valid batch, pretty-printed: larger than one instance may be, within the batch's limit
            batch = json.dumps({"instances": [{"x": 1 / (i + 3), "sleep_ms": 0} for i in range(256)]}, indent=8)
            assert len(batch) > 16384
            answered = await client.post("/doubler/batch", content=batch, headers={"content-type": "application/json"})
            assert answered.status_code == 200 and len(answered.json()["predictions"]) == 256

    asyncio.run(scenario())


def test_request_bodies_in_flight_are_bounded_as_a_whole(stub_app):
    async def scenario():
        async with serving(stub_app(max_inflight_body_bytes=2048)) as client:
            body = json.dumps({"x": 1, "sleep_ms": 400}).encode().ljust(1500)  # JSON allows trailing blanks
            headers = {"content-type": "application/json"}
            first = asyncio.create_task(client.post("/doubler", content=body, headers=headers))
            await asyncio.sleep(0.1)
            second = await client.post("/doubler", content=body, headers=headers)  # 1500 + 1500 > 2048
            probe = await client.get("/healthz")  # no body, never refused
            return await first, second, probe

    first, second, probe = asyncio.run(scenario())
    assert second.status_code == 503 and second.headers["retry-after"] == "1"
    assert "SERVE_MAX_INFLIGHT_BODY_BYTES" in second.json()["detail"]
    assert probe.status_code == 200 and first.status_code == 200 and first.json() == {"y": 2.0}


def test_body_limit_is_413_before_parsing(stub_app):
    async def scenario():
        async with serving(stub_app(max_body_bytes=2048)) as client:
            big = json.dumps({"instances": [{"x": 1.0, "sleep_ms": 0}] * 100}).encode()
            response = await client.post("/doubler/batch", content=big, headers={"content-type": "application/json"})
            assert response.status_code == 413 and "2048" in response.json()["detail"]

            async def chunks():  # no Content-Length: the limit is enforced while streaming
                for _ in range(10):
                    yield b" " * 1000

            streamed = await client.post("/doubler", content=chunks(), headers={"content-type": "application/json"})
            assert streamed.status_code == 413
            assert (await client.post("/doubler", json={"x": 1})).status_code == 200

    asyncio.run(scenario())


def test_request_id_round_trip_and_metrics_content(stub_app):
    async def scenario():
        async with serving(stub_app()) as client:
            mine = await client.post("/doubler", json={"x": 1}, headers={"X-Request-ID": "abc-123"})
            assert mine.headers["x-request-id"] == "abc-123"
            generated = (await client.get("/healthz")).headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", generated)
            return (await client.get("/metrics")).text

    text = asyncio.run(scenario())
    for name in (
        "http_requests_total",
        "http_request_duration_seconds_bucket",
        "model_batch_size_bucket",
        "model_inference_seconds_bucket",
        "model_queue_depth",
        "model_queue_capacity",
        "model_up",
    ):
        assert name in text, name
    assert _metric(text, "model_up", model="doubler") == 1.0
    assert _metric(text, "http_requests_total", route="/doubler", method="POST", status="200") == 1


def test_json_logs_carry_request_fields(stub_app, capsys):
    async def scenario():
        async with serving(stub_app(log_json=True)) as client:
            await client.post("/doubler", json={"x": 1}, headers={"X-Request-ID": "log-me"})

    asyncio.run(scenario())
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    entry = next(e for e in lines if e.get("request_id") == "log-me")
    assert entry["route"] == "/doubler" and entry["status"] == 200 and entry["batch_size"] == 1
    assert entry["latency_ms"] > 0


def test_a_model_that_fails_to_load_is_503_while_readiness_says_why(tmp_path):
    """An artifact folder the stub cannot read: its routes and /readyz say why; /healthz stays up."""
    from service.app import create_app
    from service.settings import Settings
    from tests.stubs import DOUBLER

    async def scenario():
        app = create_app(Settings(artifacts_dir=tmp_path), models=[DOUBLER])  # no artifact there
        async with serving(app) as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and "no version of doubler" in ready.json()["models"]["doubler"]
            response = await client.post("/doubler", json={"x": 1})
            assert response.status_code == 503 and "not available" in response.json()["detail"]
            assert (await client.get("/healthz")).status_code == 200

    asyncio.run(scenario())


@pytest.mark.parametrize("missing", ["Input", "example"])
def test_a_model_missing_a_required_part_fails_at_import_saying_what_to_write(missing):
    from pydantic import BaseModel

    from service.models.base import Predictor

    parts = {
        "Input": BaseModel,
        "Output": BaseModel,
        "example": {},
        "summary": "s",
        "setup": lambda self, a, d: None,
        "predict": lambda self, batch: batch,
    }
    del parts[missing]
    with pytest.raises(TypeError, match=rf"must set {missing}.*\n.*Input = MyInput"):
        type("Broken", (Predictor,), parts)


def test_an_example_that_does_not_validate_fails_at_import():
    from service.models.base import Predictor
    from tests.stubs import Doubled, Number

    with pytest.raises(TypeError, match="Broken.example is not a valid Number"):
        type(
            "Broken",
            (Predictor,),
            {
                "Input": Number,
                "Output": Doubled,
                "example": {"x": "many"},
                "summary": "s",
                "setup": lambda self, a, d: None,
                "predict": lambda self, batch: batch,
            },
        )


def test_uploads_are_decoded_on_the_model_worker_and_batched(stub_app):
    """The shared upload route queues the bytes; the model's decode runs on its worker thread."""
    app = stub_app(default_batching={"max_wait_ms": 30})

    async def scenario():
        async with serving(app) as client:

            def upload(text: bytes, **params):
                return client.post("/doubler/text", files={"file": ("x.txt", text, "text/plain")}, params=params)

            good, scaled, bad, number = await asyncio.gather(
                upload(b"4"), upload(b"4", times=3), upload(b"four"), client.post("/doubler", json={"x": 1})
            )
            too_many = await upload(b"4", times=11)
            return good, scaled, bad, number, too_many

    good, scaled, bad, number, too_many = asyncio.run(scenario())
    assert good.json() == {"y": 8.0} and scaled.json() == {"y": 24.0} and number.json() == {"y": 2.0}
    assert bad.status_code == 415 and bad.json() == {"detail": "the file must hold one number"}
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == ["query", "times"]
    predictor = app.state.registry.entries["doubler"].predictor
    assert predictor.decoded_on == {"model-doubler_0"} and predictor.batch_sizes[0] == 3  # 2 uploads + 1 JSON
    route = app.openapi()["paths"]["/doubler/text"]["post"]
    assert {"200", "415", "422"} <= route["responses"].keys()
    assert route["requestBody"]["content"]["multipart/form-data"]["encoding"]["file"]["contentType"] == "text/plain"


def test_streams_are_capped_per_model_and_end_at_their_deadline(stub_app):
    async def scenario():
        async with serving(stub_app(max_streams=2, stream_timeout_s=0.5)) as client:
            slow = {"x": 1234.5, "sleep_ms": 200}  # 7 pieces of 200 ms: longer than the deadline
            running = [asyncio.create_task(client.post("/doubler/stream", json=slow)) for _ in range(2)]
            await asyncio.sleep(0.1)
            refused = await client.post("/doubler/stream", json=slow)
            ordinary = await client.post("/doubler", json={"x": 1})  # shares the worker, not starved
            ended = await asyncio.gather(*running)
            again = await client.post("/doubler", json={"x": 2, "stream": True})  # the places are free again
            return refused, ordinary, ended, again

    refused, ordinary, ended, again = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "SERVE_MAX_STREAMS" in refused.json()["detail"]
    assert ordinary.status_code == 200 and ordinary.json() == {"y": 2.0}
    for response in ended:
        assert response.status_code == 200 and response.text.startswith("event: digit")
        assert response.text.rstrip().split("\n")[-2:] == [
            "event: error",
            'data: {"detail": "the stream ran longer than 0.5 s (SERVE_STREAM_TIMEOUT_S)"}',
        ]
    assert again.status_code == 200 and again.text.endswith('event: doubler\ndata: {"y":4.0}\n\n')


def test_uploads_held_in_memory_are_capped_per_model(stub_app):
    async def scenario():
        async with serving(stub_app(max_uploads=1)) as client:
            busy = asyncio.create_task(client.post("/doubler", json={"x": 1, "sleep_ms": 500}))  # holds the worker
            await asyncio.sleep(0.1)
            held = asyncio.create_task(client.post("/doubler/text", files={"file": ("n.txt", b"2")}))
            await asyncio.sleep(0.1)
            refused = await client.post("/doubler/text", files={"file": ("n.txt", b"3")})
            await asyncio.gather(busy, held)
            again = await client.post("/doubler/text", files={"file": ("n.txt", b"4")})
            return held.result(), refused, again

    held, refused, again = asyncio.run(scenario())
    assert refused.status_code == 503 and "SERVE_MAX_UPLOADS" in refused.json()["detail"]
    assert held.json() == {"y": 4.0} and again.json() == {"y": 8.0}


def test_streams_are_framed_by_the_shared_layer(stub_app):
    async def scenario():
        async with serving(stub_app()) as client:
            stream = await client.post("/doubler/stream", json={"x": 6.5})
            flag = await client.post("/doubler", json={"x": 6.5, "stream": True})
            bad = await client.post("/doubler/stream", json={"x": -1})
            batch = await client.post("/doubler/batch", json={"instances": [{"x": 1, "stream": True}]})
            return stream, flag, bad, batch

    stream, flag, bad, batch = asyncio.run(scenario())
    assert stream.headers["content-type"].startswith("text/event-stream")
    expected = "".join(f'event: digit\ndata: {{"digit": "{c}"}}\n\n' for c in "13.0")
    assert stream.text == expected + 'event: doubler\ndata: {"y":13.0}\n\n' == flag.text
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "x"]
    assert batch.status_code == 422 and batch.json()["detail"][0]["loc"] == ["body", "instances", 0, "stream"]


def test_serve_models_selects_a_subset_and_refuses_unknown_names():
    from service.app import selected_models
    from service.settings import Settings

    assert [m.name for m in selected_models(Settings(models=["poem", "fashion"]))] == ["poem", "fashion"]
    assert len(selected_models(Settings())) == 4
    with pytest.raises(ValueError, match=r"\['iris'\].*choose from"):
        selected_models(Settings(models=["iris"]))


def test_quick_and_gated_out_versions_are_never_made_the_default_on_their_own(tmp_path, capsys):
    """A --quick smoke test and a version that failed the quality gate (published with --force) stay on disk
    beside the good one, which keeps serving; /readyz and /admin/models say why; an admin can pin one."""
    from service.app import create_app
    from service.artifacts import QualityGate
    from service.settings import Settings
    from tests.stubs import DOUBLER, write_stub_artifacts

    failed = QualityGate(
        metric="accuracy",
        higher_is_better=True,
        score=0.29,
        baselines={"majority class": 0.25, "logistic regression": 0.96},
        floor=0.9,
        passed=False,
        reasons=["accuracy 0.29 is worse than logistic regression's 0.96"],
        forced=True,
    )
    write_stub_artifacts(tmp_path, version="2026.01.01.000000")
    write_stub_artifacts(tmp_path, version="2026.01.02.000000", gate=failed)
    write_stub_artifacts(tmp_path, version="2026.01.03.000000", quick=True)
    admin = {"X-API-Key": "admin-secret"}

    async def scenario(settings: Settings):
        async with serving(create_app(settings, models=[DOUBLER])) as client:
            ready = await client.get("/readyz")
            info = (await client.get("/models/doubler")).json()
            status = (await client.get("/admin/models", headers=admin)).json() if settings.admin_keys else None
            return ready, info, status

    ready, info, status = asyncio.run(scenario(Settings(artifacts_dir=tmp_path, admin_keys=["admin-secret"])))
    assert ready.status_code == 200 and info["version"] == "2026.01.01.000000" and info["quick"] is False
    note = ready.json()["notes"]["doubler"]
    assert "2026.01.02.000000" in note and "quality gate" in note and "logistic regression" in note
    assert "2026.01.03.000000" in note and "--quick" in note
    (worker,) = status["workers"]
    versions = worker["models"]["doubler"]["versions"]
    assert versions["2026.01.03.000000"]["state"] == "held back"
    assert "quality gate" in versions["2026.01.02.000000"]["reason"]

    pinned = Settings(artifacts_dir=tmp_path, model_versions={"doubler": "2026.01.03.000000"})
    ready, info, _ = asyncio.run(scenario(pinned))  # pinned: served, and marked and warned about
    assert ready.status_code == 200 and info["version"] == "2026.01.03.000000" and info["quick"] is True
    assert "serving doubler from a --quick artifact" in capsys.readouterr().err

    only_quick = tmp_path / "only-quick"
    write_stub_artifacts(only_quick, quick=True)
    ready, info, _ = asyncio.run(scenario(Settings(artifacts_dir=only_quick)))
    assert ready.status_code == 503 and info["state"] == "failed"
    assert "--quick" in ready.json()["models"]["doubler"] and "pin" in ready.json()["models"]["doubler"]


def test_no_server_path_in_answers(tmp_path):
    from service.app import create_app
    from service.settings import Settings
    from tests.stubs import DOUBLER

    async def scenario():
        async with serving(create_app(Settings(artifacts_dir=tmp_path / "nowhere"), models=[DOUBLER])) as client:
            return [
                await client.get("/readyz"),
                await client.post("/doubler", json={"x": 1}),
                await client.get("/models/doubler"),
            ]

    for response in asyncio.run(scenario()):
        assert str(tmp_path) not in response.text and "/nowhere" not in response.text, response.text
        assert "python -m training doubler" in response.text


def test_log_lines_cannot_be_forged(stub_app, capsys):
    """A CR/LF in the path stays inside one quoted field; a request id that is not a plain token is replaced."""

    async def scenario():
        async with serving(stub_app()) as client:
            spoof = await client.get("/healthz", headers={"X-Request-ID": "abc route=/forged status=200"})
            await client.get("/nothing%0D%0A2026-01-01 INFO service.access: forged status=200")
            return spoof

    spoof = asyncio.run(scenario())
    assert re.fullmatch(r"[0-9a-f]{32}", spoof.headers["x-request-id"])  # not echoed
    lines = [line for line in capsys.readouterr().err.splitlines() if "service.access" in line]
    assert len(lines) == 2 and not any("route=/forged" in line for line in lines), lines
    assert any('path="/nothing\\r\\n2026-01-01 INFO service.access: forged status=200"' in line for line in lines), (
        lines
    )


def test_validation_errors_are_capped(stub_app):
    async def scenario():
        async with serving(stub_app()) as client:
            return await client.post("/doubler", json={"x": 1, **{f"junk{i}": i for i in range(800)}})

    response = asyncio.run(scenario())
    detail = response.json()["detail"]
    assert response.status_code == 422 and len(detail) == 21 and len(response.content) < 5000
    assert detail[-1] == {
        "loc": ["body"],
        "msg": "and 780 more errors of the same request; fix these first",
        "type": "too_many_errors",
    }


@pytest.mark.parametrize(
    "settings, key, detailed",
    [
        ({}, None, False),  # no keys configured: build details stay private
        ({"api_keys": ["k"]}, None, False),  # anonymous caller
        ({"api_keys": ["k"]}, "k", True),  # a caller with a key sees them
        ({"public_model_details": True}, None, True),  # opened by the setting
    ],
)
def test_models_hide_build_details_from_anonymous_callers(stub_app, settings, key, detailed):
    async def scenario():
        async with serving(stub_app(**settings)) as client:
            return (await client.get("/models/doubler", headers={"X-API-Key": key} if key else {})).json()

    info = asyncio.run(scenario())
    assert info["version"] and "input_schema" in info and "metrics" in info  # what a client needs, always
    assert (info["libraries"] != {} and info["git_tree"] is not None) == detailed, info


def test_the_documented_largest_batch_works_under_modest_concurrency(stub_app):
    """Default settings: three clients sending 256-instance batches at once are queued, not refused."""

    async def scenario():
        async with serving(stub_app()) as client:
            body = {"instances": [{"x": i, "sleep_ms": 1} for i in range(256)]}
            return await asyncio.gather(*(client.post("/doubler/batch", json=body) for _ in range(3)))

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 3
    assert all(len(r.json()["predictions"]) == 256 for r in responses)


def test_a_full_queue_says_what_is_full_and_what_to_do(stub_app):
    async def scenario():
        async with serving(stub_app(max_queue=300)) as client:
            body = {"instances": [{"x": i, "sleep_ms": 20} for i in range(256)]}
            return await asyncio.gather(*(client.post("/doubler/batch", json=body) for _ in range(3)))

    refused = [r for r in asyncio.run(scenario()) if r.status_code == 503]
    assert refused and refused[0].headers["retry-after"] == "1"
    assert "doubler model's queue is full" in refused[0].json()["detail"]
    assert "send smaller batches" in refused[0].json()["detail"]


ONE_STEP_BODIES = [  # (Content-Type, body): the plain case, and every way a JSON body can go wrong
    ("application/json", b'{"instances": [{"x": 1}, {"x": 2.5, "sleep_ms": 0}]}'),
    ("application/json; charset=utf-8", b'{"instances": [{"x": 1}]}'),
    ("application/vnd.api+json", b'{"instances": [{"x": 1}]}'),
    ("application/json", b'{"instances": [{"x": 1}], "instances": [{"x": 4}]}'),  # the last key wins
    ("application/json", b'{"instances": [{"x": -1}, {"x": 3}]}'),  # the model's own 422
    ("application/json", b'{"instances": [{"x": "one"}, {"x": 1, "y": 2}]}'),
    ("application/json", b'{"instances": []}'),
    ("application/json", b'{"instances": [{"x": NaN}]}'),
    ("application/json", b'{"instances": [{"x": 1}'),
    ("application/json", b'{"instances": [{"x": 1}]} trailing'),
    ("application/json", b'{"instances": [{"x": "\\ud800"}]}'),
    ("application/json", b"\xff\xfe not utf-8"),
    ("application/json", '{"instances": [{"x": 1}]}'.encode("utf-16")),  # json.loads reads UTF-16, jiter not
    ("application/json", b""),
    ("text/plain", b'{"instances": [{"x": 1}]}'),
    (None, b'{"instances": [{"x": 1}]}'),
]


def test_the_one_step_json_path_answers_exactly_as_fastapi(stub_app):
    """POST /doubler/batch is read and validated in one step by pydantic-core; POST /doubler/versions/{v}/batch
    takes the same body the standard FastAPI way. Every body, good or bad, gets the same answer from both."""

    async def scenario():
        async with serving(stub_app()) as client:
            version = (await client.get("/models/doubler")).json()["version"]
            answers = []
            for content_type, body in ONE_STEP_BODIES:
                headers = {"content-type": content_type} if content_type else {}
                pair = [
                    await client.post(path, content=body, headers=headers)
                    for path in ("/doubler/batch", f"/doubler/versions/{version}/batch")
                ]
                answers.append(
                    (
                        content_type,
                        body,
                        *[
                            (r.status_code, r.headers["content-type"], r.json(), r.headers.get("x-model-version"))
                            for r in pair
                        ],
                    )
                )
            return answers

    answers = asyncio.run(scenario())
    for content_type, body, one_step, standard in answers:
        assert one_step == standard, (content_type, body)
    statuses = [one_step[0] for *_, one_step, _ in answers]
    assert statuses == [200] * 4 + [422] * 8 + [200] + [422] * 3, statuses  # UTF-16 through the fallback


def test_a_plain_json_body_skips_fastapis_dependency_solving(stub_app, monkeypatch):
    """The one-step path is the one taken: FastAPI's standard handler (which solves the endpoint's
    dependencies) runs only for a body that fails, to give its own error."""
    import fastapi.routing

    calls = []
    solve = fastapi.routing.solve_dependencies

    async def counted(*args, **kwargs):
        calls.append(kwargs["request"].url.path)
        return await solve(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counted)

    async def scenario():
        async with serving(stub_app()) as client:
            good = [
                await client.post(path, json=body)
                for path, body in [("/doubler", {"x": 1}), ("/doubler/batch", {"instances": [{"x": 2}]})]
            ]
            bad = await client.post("/doubler", json={"x": "one"})
            return good, bad

    good, bad = asyncio.run(scenario())
    assert [r.json() for r in good] == [{"y": 2.0}, {"predictions": [{"y": 4.0}]}]
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "x"]
    assert calls == ["/doubler"], calls  # the bad body only


def test_a_500_names_its_request_id_in_header_and_body_and_logs_the_traceback(stub_app, caplog):
    app = stub_app()

    async def broken() -> dict:
        raise RuntimeError("a bug in a route")

    app.add_api_route("/broken", broken)

    async def call() -> httpx.Response:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://in-process") as client:
                return await client.get("/broken", headers={"X-Request-ID": "trace-me-1"})

    service_log = logging.getLogger("service")  # it does not propagate to the root, where caplog listens
    service_log.addHandler(caplog.handler)
    try:
        response = asyncio.run(call())
    finally:
        service_log.removeHandler(caplog.handler)
    assert response.status_code == 500 and response.headers["x-request-id"] == "trace-me-1"
    assert "trace-me-1" in response.json()["detail"]
    (record,) = [r for r in caplog.records if r.name == "service.errors"]
    assert record.request_id == "trace-me-1" and record.exc_info and "a bug in a route" in str(record.exc_info[1])


def test_every_route_that_takes_a_body_declares_its_limit_and_the_middleware_uses_it(stub_app):
    """Each body-taking route declares its largest body (x-max-body-bytes, shown in the OpenAPI document): no
    path falls back to the 64 KB default by accident, and a limit follows its route, not a table of paths."""
    app = stub_app(max_body_bytes=1_000_000, benchmark_routes=True)

    async def scenario() -> tuple[dict, dict[str, int]]:
        async with serving(app) as client:
            document = (await client.get("/openapi.json")).json()
            one = {"x": 1.0, "sleep_ms": 0}
            padded = json.dumps(one).encode().ljust(20_000)  # over one instance's 16 KB, under a batch's
            statuses = {
                path: (
                    await client.post(path, content=padded, headers={"content-type": "application/json"})
                ).status_code
                for path in ("/doubler", "/doubler/versions/1", "/doubler/stream", "/doubler/noop")
            }
            batch = json.dumps({"instances": [one] * 3}).encode().ljust(20_000)
            statuses["/doubler/batch"] = (
                await client.post("/doubler/batch", content=batch, headers={"content-type": "application/json"})
            ).status_code
            return document, statuses

    document, statuses = asyncio.run(scenario())
    for path, operations in document["paths"].items():
        if "post" in operations and not path.startswith("/admin"):
            assert operations["post"].get("x-max-body-bytes"), path
    assert document["paths"]["/doubler/batch"]["post"]["x-max-body-bytes"] > 16 * 1024 * 100
    assert statuses == {
        "/doubler": 413,
        "/doubler/versions/1": 413,
        "/doubler/stream": 413,
        "/doubler/noop": 413,
        "/doubler/batch": 200,
    }, statuses


def test_streams_go_through_the_registry_like_requests(stub_app):
    """A stream is counted per version (ok, invalid), planned on the model's worker thread (never the event
    loop), and each of its steps takes a place in the model's queue."""
    app = stub_app()
    registry = app.state.registry

    async def scenario() -> tuple[str, str | None, set[str], int]:
        async with serving(app) as client:
            entry = registry.entries["doubler"]
            batcher = entry.versions[entry.default].batcher
            depths: list[int] = []
            original = batcher.call

            async def watched(function, *args, **options):  # the queue holds the step while it waits its turn
                task = asyncio.ensure_future(original(function, *args, **options))
                await asyncio.sleep(0)
                depths.append(batcher.depth)
                return await task

            batcher.call = watched
            await client.post("/doubler/stream", json={"x": 6.5})
            await client.post("/doubler/stream", json={"x": -1})
            batcher.call = original
            metrics = (await client.get("/metrics")).text
            return metrics, entry.default, entry.predictor.streamed_on, max(depths)

    metrics, version, planned_on, deepest = asyncio.run(scenario())
    assert planned_on and all(name.startswith("model-doubler") for name in planned_on), planned_on
    assert _metric(metrics, "model_version_requests_total", model="doubler", version=version, outcome="ok") == 1
    assert _metric(metrics, "model_version_requests_total", model="doubler", version=version, outcome="invalid") == 1
    assert deepest >= 1
