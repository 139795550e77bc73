"""Guarded canaries on the stub model, in process: a canary failing on a fifth of its inputs is rolled back by
the server within its window while 64 clients keep sending, and answers nothing after; a healthy one is
promoted after its time; the verdict's arithmetic on its own."""

import asyncio
import time
from contextlib import asynccontextmanager

import httpx

from service.app import create_app
from service.runtime.registry import Desired
from service.runtime.rollouts import Stats, verdict
from service.settings import Settings
from tests.stubs import DOUBLER, write_stub_artifacts

STABLE, CANARY = "2026.01.01.000000", "2026.01.02.000000"
ADMIN = {"X-API-Key": "admin"}


@asynccontextmanager
async def serving(app):
    """The app's start-up and shutdown around a client that gets a 500 for an unexpected error, as a caller
    over HTTP does (the canary's bug), rather than the exception itself."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process", timeout=30) as client:
            yield client


def two_versions(tmp_path, canary_fails: bool, canary: dict | None = None):
    write_stub_artifacts(tmp_path, version=STABLE)
    write_stub_artifacts(
        tmp_path, version=CANARY, hyperparameters=canary or ({"fail_every": 5} if canary_fails else {})
    )
    settings = Settings(artifacts_dir=tmp_path, admin_keys=["admin"], model_versions={"doubler": STABLE})
    return create_app(settings, models=[DOUBLER])


def test_a_failing_canary_is_rolled_back_within_its_window_under_load(tmp_path):
    app = two_versions(tmp_path, canary_fails=True)

    async def scenario():
        answers: list[tuple[float, int, str]] = []
        async with serving(app) as client:
            split = await client.put(
                "/admin/models/doubler/split",
                json={
                    "weights": {STABLE: 80, CANARY: 20},
                    "guard": {"max_error_ratio": 0.02, "window_s": 5, "min_requests": 20},
                },
                headers=ADMIN,
            )
            assert split.status_code == 200, split.text
            start = time.monotonic()
            rolled_back_at: list[float] = []

            def sending() -> bool:
                """For the 5 s window at most, and half a second past the rollback (what comes after it)."""
                now = time.monotonic() - start
                return now < 5 and not (rolled_back_at and now > rolled_back_at[0] + 0.5)

            async def watcher() -> None:
                while sending() and not rolled_back_at:
                    admin = await client.get("/admin/models", headers=ADMIN)
                    if admin.json()["workers"][0]["models"]["doubler"]["split"] == {}:
                        rolled_back_at.append(time.monotonic() - start)
                    await asyncio.sleep(0.1)

            async def sender(n: int) -> None:
                i = n
                while sending():  # the guard acts within a second or two
                    i += 64
                    answer = await client.post("/doubler", json={"x": i})
                    answers.append(
                        (time.monotonic() - start, answer.status_code, answer.headers.get("x-model-version"))
                    )

            await asyncio.gather(watcher(), *(sender(n) for n in range(64)))
            status = (await client.get("/admin/models", headers=ADMIN)).json()["workers"][0]["models"]["doubler"]
            metrics = (await client.get("/metrics")).text
        return answers, status, metrics

    answers, status, metrics = asyncio.run(scenario())
    (decision,) = status["canary_decisions"]
    assert decision["decision"] == "rolled_back" and decision["version"] == CANARY
    assert "error ratio" in decision["reason"] and "max_error_ratio 0.02" in decision["reason"]
    assert status["split"] == {} and status["default"] == STABLE and status["pinned"] == STABLE
    failed_at = [t for t, code, version in answers if code == 500]
    assert failed_at, "the canary failed some requests first"
    last_canary = max(t for t, _, version in answers if version == CANARY)
    assert last_canary < 4.5  # out of the split within its 5 s window
    # answered after it (a canary's failure carries no version header: its last 500s may land after its last 200)
    after = [version for t, code, version in answers if t > last_canary and code == 200]
    assert after and set(after) == {STABLE}  # nothing answered by it after the rollback
    assert f'model_canary_decisions_total{{decision="rolled_back",model="doubler",version="{CANARY}"}} 1.0' in metrics


def test_a_healthy_canary_is_promoted_after_its_time(tmp_path):
    app = two_versions(tmp_path, canary_fails=False)

    async def scenario():
        async with serving(app) as client:
            await client.put(
                "/admin/models/doubler/split",
                json={"weights": {STABLE: 50, CANARY: 50}, "guard": {"max_error_ratio": 0.02, "promote_after_s": 1.0}},
                headers=ADMIN,
            )
            for _ in range(30):  # 2.4 s: the watcher's pass after the first second promotes it
                await client.post("/doubler", json={"x": 1})
                await asyncio.sleep(0.08)
            return (await client.get("/admin/models", headers=ADMIN)).json()["workers"][0]["models"]["doubler"]

    status = asyncio.run(scenario())
    assert [d["decision"] for d in status["canary_decisions"]] == ["promoted"]
    assert status["default"] == CANARY and status["split"] == {}


def test_the_verdict_waits_for_enough_requests_and_compares_latency():
    desired = Desired(split={"A": 90, "B": 10}, guard={"max_p99_ratio": 1.5, "min_requests": 20}, guard_since=0.0)
    assert verdict(desired, {"A": Stats(100, 0, 0.010), "B": Stats(19, 0, 0.100)}, 1.0) is None  # too few yet
    decision, version, reason = verdict(desired, {"A": Stats(100, 0, 0.010), "B": Stats(20, 0, 0.016)}, 1.0)
    assert (decision, version) == ("rolled_back", "B") and "1.60x" in reason
    assert verdict(desired, {"A": Stats(100, 0, 0.010), "B": Stats(20, 0, 0.014)}, 1.0) is None


def test_a_canary_that_answers_differently_is_rolled_back_for_its_agreement(tmp_path):
    app = two_versions(tmp_path, canary_fails=False, canary={"offset": 1})  # every answer 1 off the stable's

    async def scenario():
        async with serving(app) as client:
            await client.put(
                "/admin/models/doubler/split",
                json={"weights": {STABLE: 50, CANARY: 50}, "guard": {"min_agreement": 0.9, "min_requests": 10}},
                headers=ADMIN,
            )
            for i in range(60):
                await client.post("/doubler", json={"x": i})
                await asyncio.sleep(0.03)
            return (await client.get("/admin/models", headers=ADMIN)).json()["workers"][0]["models"]["doubler"]

    status = asyncio.run(scenario())
    (decision,) = status["canary_decisions"]
    assert decision["decision"] == "rolled_back" and "min_agreement 0.9" in decision["reason"]
    assert status["default"] == STABLE and status["split"] == {}


def test_shadow_traffic_is_compared_and_never_answers_a_caller(tmp_path):
    app = two_versions(tmp_path, canary_fails=True)  # the shadow fails on every x divisible by 5

    async def scenario():
        async with serving(app) as client:
            put = await client.put(
                "/admin/models/doubler/shadow", json={"version": CANARY, "share": 1.0}, headers=ADMIN
            )
            assert put.status_code == 200, put.text
            answers = []
            for wave in range(5):  # 20 at a time: within the cap on mirrored items in flight, so none is shed
                xs = range(20 * wave + 1, 20 * wave + 21)
                answers += await asyncio.gather(*(client.post("/doubler", json={"x": x}) for x in xs))
                await asyncio.sleep(0.2)  # the mirrored copies finish on the side
            status = (await client.get("/admin/models", headers=ADMIN)).json()["workers"][0]["models"]["doubler"]
            ended = await client.put("/admin/models/doubler/shadow", json={"version": None}, headers=ADMIN)
            metrics = (await client.get("/metrics")).text
        return answers, status, ended.json(), metrics

    answers, status, ended, metrics = asyncio.run(scenario())
    assert {a.status_code for a in answers} == {200}  # the shadow's bug never reaches a caller
    assert {a.headers["x-model-version"] for a in answers} == {STABLE}
    compared = status["shadow"][CANARY]
    assert compared["agree"] == 80 and compared["error"] == 20 and compared["agreement"] == 1.0
    assert compared["p50_ms"] is not None and status["desired"]["shadow"] == {"version": CANARY, "share": 1.0}
    assert (
        ended["desired"]["shadow"] is None
        and CANARY not in ended["versions"]
        or (ended["versions"][CANARY]["state"] != "ready")
    )
    assert f'model_shadow_requests_total{{model="doubler",outcome="error",version="{CANARY}"}} 20.0' in metrics
