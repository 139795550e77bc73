"""Model versions without downtime: the versioned repository, the admin API (load, unload, pin, split),
X-Model-Version on every answer, rollback, canary, polling, and requests finishing on the version they
started on. In process, on the stub model; tests/e2e/test_versions_e2e.py reloads a real model under load."""

import asyncio
import json
import random
import shutil
from pathlib import Path

import pytest

from service.app import create_app
from service.artifacts import MANIFEST, version_folders
from service.settings import Settings
from tests.conftest import serving
from tests.stubs import DOUBLER, write_stub_artifacts

ADMIN = {"X-API-Key": "admin-key"}
CLIENT = {"X-API-Key": "client-key"}


def add_version(model_dir: Path, name: str, corrupt: bool = False, source: str | None = None) -> Path:
    """A copy of version ``source`` (default: the oldest, a good one) under a new name, its manifest saying so;
    ``corrupt``: its largest file's bytes no longer match the manifest, as a half-copied or tampered version."""
    versions = version_folders(model_dir)
    target = model_dir / name
    shutil.copytree(versions[source] if source else next(iter(versions.values())), target)
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["version"] = name
    if corrupt:
        listed = sorted(manifest["files"], key=lambda f: (target / f).stat().st_size)[-1:]
        if listed:
            data = bytearray((target / listed[0]).read_bytes())
            data[len(data) // 2] ^= 0xFF
            (target / listed[0]).write_bytes(bytes(data))
        else:  # the stub lists no file: give it one whose bytes do not match
            (target / "weights.bin").write_bytes(b"half a file")
            manifest["files"]["weights.bin"] = "0" * 64
    (target / MANIFEST).write_text(json.dumps(manifest))
    return target


@pytest.fixture
def repo(tmp_path) -> Path:
    """An artifacts folder whose stub model has one version, "1"."""
    return write_stub_artifacts(tmp_path / "artifacts", version="1")


def app_for(repo: Path, **settings):
    return create_app(
        Settings(artifacts_dir=repo, admin_keys=["admin-key"], api_keys=["client-key"], **settings), models=[DOUBLER]
    )


async def answered_by(client, path: str = "/doubler", x: float = 1) -> str:
    response = await client.post(path, json={"x": x}, headers=CLIENT)
    assert response.status_code == 200, response.text
    assert response.json() == {"y": 2 * x}
    return response.headers["X-Model-Version"]


def test_training_writes_versions_beside_each_other_and_the_newest_serves(repo):
    write_stub_artifacts(repo, version="2")
    assert list(version_folders(repo / DOUBLER.folder)) == ["1", "2"]
    assert not [p for p in (repo / DOUBLER.folder).iterdir() if p.name.startswith(".")]  # nothing half-written

    async def scenario():
        async with serving(app_for(repo)) as client:
            assert await answered_by(client) == "2"
            info = (await client.get("/models/doubler", headers=CLIENT)).json()
            assert info["version"] == "2" and info["versions"] == ["2"]

    asyncio.run(scenario())


def test_versions_sort_as_numbers():
    from service.artifacts import version_key

    names = ["10", "9", "2026.11.10.000000", "2026.11.9.000000", "2"]
    assert sorted(names, key=version_key) == ["2", "9", "10", "2026.11.9.000000", "2026.11.10.000000"]


def test_load_switches_to_a_new_version_and_a_corrupted_one_never_serves(repo):
    async def scenario():
        async with serving(app_for(repo)) as client:
            assert await answered_by(client) == "1"
            add_version(repo / DOUBLER.folder, "2")
            loaded = await client.post("/admin/models/doubler/load", headers=ADMIN)
            assert loaded.status_code == 200, loaded.text
            assert loaded.json()["default"] == "2"
            assert loaded.json()["versions"]["1"]["state"] == "available"  # unloaded, still on disk
            assert await answered_by(client) == "2"

            add_version(repo / DOUBLER.folder, "3", corrupt=True)
            refused = await client.post("/admin/models/doubler/load", headers=ADMIN)
            assert refused.status_code == 422
            assert "version 3 did not load" in refused.json()["detail"] and "sha256" in refused.json()["detail"]
            assert "2 keeps serving" in refused.json()["detail"]
            assert {await answered_by(client) for _ in range(20)} == {"2"}
            state = (await client.get("/admin/models", headers=ADMIN)).json()["workers"][0]["models"]["doubler"]
            assert state["default"] == "2" and state["versions"]["3"]["state"] == "failed"
            metrics = (await client.get("/metrics")).text
            assert 'model_version_loads_total{model="doubler",outcome="failed"} 1.0' in metrics
            assert 'model_version_loads_total{model="doubler",outcome="ready"} 1.0' in metrics
            assert 'model_version_traffic_share{model="doubler",version="2"} 1.0' in metrics
            assert 'model_version_traffic_share{model="doubler",version="1"} 0.0' in metrics
            assert 'model_version_requests_total{model="doubler",outcome="ok",version="2"}' in metrics

            # the corrupted version, repaired on disk, loads when asked again
            shutil.rmtree(repo / DOUBLER.folder / "3")
            add_version(repo / DOUBLER.folder, "3")
            assert (await client.post("/admin/models/doubler/load", headers=ADMIN)).status_code == 200
            assert await answered_by(client) == "3"

    asyncio.run(scenario())


def test_rollback_is_one_call_and_unpinning_serves_the_newest_again(repo):
    add_version(repo / DOUBLER.folder, "2")

    async def scenario():
        async with serving(app_for(repo)) as client:
            assert await answered_by(client) == "2"
            pinned = await client.put("/admin/models/doubler/default", json={"version": "1"}, headers=ADMIN)
            assert pinned.status_code == 200, pinned.text
            assert pinned.json()["pinned"] == "1" and pinned.json()["default"] == "1"
            assert await answered_by(client) == "1"
            add_version(repo / DOUBLER.folder, "3")  # pinned: a newer version on disk does not take over
            assert (await client.post("/admin/models/doubler/load", headers=ADMIN)).status_code == 200
            assert await answered_by(client) == "1"
            unpinned = await client.put("/admin/models/doubler/default", json={"version": None}, headers=ADMIN)
            assert unpinned.json()["default"] == "3"
            assert await answered_by(client) == "3"
            missing = await client.put("/admin/models/doubler/default", json={"version": "9"}, headers=ADMIN)
            assert missing.status_code == 404 and "there are: 1, 2, 3" in missing.json()["detail"]
            add_version(repo / DOUBLER.folder, "4", corrupt=True)
            bad = await client.put("/admin/models/doubler/default", json={"version": "4"}, headers=ADMIN)
            assert bad.status_code == 422 and "3 keeps serving" in bad.json()["detail"]
            assert await answered_by(client) == "3"
            state = (await client.get("/admin/models", headers=ADMIN)).json()["workers"][0]["models"]["doubler"]
            assert state["pinned"] is None  # the failed pin was taken back

    asyncio.run(scenario())


def test_a_canary_split_sends_each_version_its_share(repo):
    add_version(repo / DOUBLER.folder, "2")
    random.seed(7)

    async def scenario():
        async with serving(app_for(repo)) as client:
            split = await client.put("/admin/models/doubler/split", json={"weights": {"1": 90, "2": 10}}, headers=ADMIN)
            assert split.status_code == 200, split.text
            assert split.json()["split"] == {"1": 90, "2": 10}
            seen = [await answered_by(client) for _ in range(1000)]
            assert abs(seen.count("2") / 1000 - 0.10) <= 0.03, seen.count("2")
            assert seen.count("1") + seen.count("2") == 1000
            metrics = (await client.get("/metrics")).text
            assert 'model_version_traffic_share{model="doubler",version="2"} 0.1' in metrics
            counts = {
                v: float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                for v in ("1", "2")
                if line.startswith(f'model_version_requests_total{{model="doubler",outcome="ok",version="{v}"}}')
            }
            assert counts == {"1": seen.count("1"), "2": seen.count("2")}  # per-version metrics to compare them
            # both are loaded: either can be called by name
            assert await answered_by(client, "/doubler/versions/2") == "2"
            assert await answered_by(client, "/doubler/versions/1") == "1"
            busy = await client.post("/admin/models/doubler/unload", json={"version": "2"}, headers=ADMIN)
            assert busy.status_code == 409 and "end the split" in busy.json()["detail"]
            ended = await client.put("/admin/models/doubler/split", json={"weights": {}}, headers=ADMIN)
            assert ended.json()["split"] == {}
            assert {await answered_by(client) for _ in range(50)} == {"2"}  # the default: the newest
            bad = await client.put("/admin/models/doubler/split", json={"weights": {"2": 100}}, headers=ADMIN)
            assert bad.status_code == 422 and "two or more versions" in bad.json()["detail"]

    asyncio.run(scenario())


def test_a_version_can_be_loaded_called_by_name_and_unloaded(repo):
    add_version(repo / DOUBLER.folder, "2")

    async def scenario():
        async with serving(app_for(repo)) as client:
            absent = await client.post("/doubler/versions/1", json={"x": 1}, headers=CLIENT)
            assert absent.status_code == 404 and "loaded: 2" in absent.json()["detail"]
            loaded = await client.post("/admin/models/doubler/load", json={"version": "1"}, headers=ADMIN)
            assert loaded.status_code == 200 and loaded.json()["versions"]["1"]["state"] == "ready"
            assert await answered_by(client, "/doubler/versions/1") == "1"
            assert await answered_by(client) == "2"  # the default is unchanged
            batch = await client.post(
                "/doubler/versions/1/batch", json={"instances": [{"x": 1}, {"x": 2}]}, headers=CLIENT
            )
            assert batch.json() == {"predictions": [{"y": 2}, {"y": 4}]} and batch.headers["X-Model-Version"] == "1"
            info = (await client.get("/models/doubler", headers=CLIENT)).json()
            assert sorted(info["versions"]) == ["1", "2"] and info["version"] == "2"
            serving_one = await client.post("/admin/models/doubler/unload", json={"version": "2"}, headers=ADMIN)
            assert serving_one.status_code == 409
            unloaded = await client.post("/admin/models/doubler/unload", json={"version": "1"}, headers=ADMIN)
            assert unloaded.status_code == 200 and unloaded.json()["versions"]["1"]["state"] == "available"
            assert (await client.post("/doubler/versions/1", json={"x": 1}, headers=CLIENT)).status_code == 404

    asyncio.run(scenario())


def test_requests_already_running_finish_on_the_version_they_started_on(repo):
    async def scenario():
        async with serving(app_for(repo)) as client:
            slow = asyncio.create_task(client.post("/doubler", json={"x": 3, "sleep_ms": 400}, headers=CLIENT))
            await asyncio.sleep(0.1)  # it is running on version 1 now
            add_version(repo / DOUBLER.folder, "2")
            assert (await client.post("/admin/models/doubler/load", headers=ADMIN)).status_code == 200
            assert await answered_by(client) == "2"  # switched while the slow one still runs
            answer = await slow
            assert answer.status_code == 200 and answer.json() == {"y": 6}
            assert answer.headers["X-Model-Version"] == "1"

    asyncio.run(scenario())


def test_streams_finish_on_their_version_too(repo):
    async def scenario():
        async with serving(app_for(repo)) as client:
            async with client.stream(
                "POST", "/doubler/stream", json={"x": 12345, "sleep_ms": 60}, headers=CLIENT
            ) as stream:
                assert stream.headers["X-Model-Version"] == "1"
                add_version(repo / DOUBLER.folder, "2")
                reload = asyncio.create_task(client.post("/admin/models/doubler/load", headers=ADMIN))
                body = "".join([chunk async for chunk in stream.aiter_text()])
            assert 'event: doubler\ndata: {"y":24690.0}' in body
            assert (await reload).status_code == 200
            assert await answered_by(client) == "2"

    asyncio.run(scenario())


def test_new_versions_on_disk_are_picked_up_when_polling(repo):
    async def scenario():
        async with serving(app_for(repo, model_poll_s=0.1)) as client:
            assert await answered_by(client) == "1"
            add_version(repo / DOUBLER.folder, "1.5")
            add_version(repo / DOUBLER.folder, "2", corrupt=True)  # newer, but never served
            for _ in range(100):
                if (version := await answered_by(client)) != "1":
                    break
                await asyncio.sleep(0.05)
            assert version == "1.5"  # 2 failed: the newest good one serves
            await asyncio.sleep(0.5)  # several more polls: the failed version is not retried while unchanged
            metrics = (await client.get("/metrics")).text
            assert 'model_version_loads_total{model="doubler",outcome="failed"} 1.0' in metrics

    asyncio.run(scenario())


def test_admin_routes_take_only_admin_keys_and_are_off_without_them(repo):
    async def scenario():
        async with serving(app_for(repo)) as client:
            assert (await client.get("/admin/models")).status_code == 401
            refused = await client.get("/admin/models", headers=CLIENT)  # a client key is not an admin key
            assert refused.status_code == 401 and "SERVE_ADMIN_KEYS" in refused.json()["detail"]
            assert (await client.get("/admin/models", headers=ADMIN)).status_code == 200
            assert (await client.post("/doubler", json={"x": 1}, headers=ADMIN)).status_code == 401  # nor the reverse
            unknown = await client.post("/admin/models/nope/load", headers=ADMIN)
            assert unknown.status_code == 404 and "doubler" in unknown.json()["detail"]
        async with serving(create_app(Settings(artifacts_dir=repo), models=[DOUBLER])) as client:
            assert (await client.get("/admin/models")).status_code == 404
            assert "/admin/models" not in (await client.get("/openapi.json")).json()["paths"]

    asyncio.run(scenario())


def test_a_pinned_version_in_settings_serves_and_an_older_layout_is_explained(repo, tmp_path):
    add_version(repo / DOUBLER.folder, "2")

    async def scenario():
        async with serving(app_for(repo, model_versions={"doubler": "1"})) as client:
            assert await answered_by(client) == "1"
        async with serving(app_for(repo, traffic={"doubler": {"1": 1, "2": 1}})) as client:
            assert {await answered_by(client) for _ in range(60)} == {"1", "2"}
        flat = tmp_path / "flat"
        shutil.copytree(repo / DOUBLER.folder / "1", flat / DOUBLER.folder)  # the layout before versions
        async with serving(app_for(flat)) as client:
            ready = (await client.get("/readyz")).json()["models"]["doubler"]
            assert "holds a manifest.json itself" in ready and "doubler/<the manifest's version>/" in ready

    asyncio.run(scenario())


def test_the_v2_protocol_names_and_calls_versions(repo):
    add_version(repo / DOUBLER.folder, "2")
    body = {"id": "r1", "inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": [2.5]}]}

    async def scenario():
        async with serving(app_for(repo)) as client:
            assert (
                await client.post("/admin/models/doubler/load", json={"version": "1"}, headers=ADMIN)
            ).status_code == 200
            metadata = (await client.get("/v2/models/doubler", headers=CLIENT)).json()
            assert metadata["versions"] == ["2", "1"]  # the default first
            default = (await client.post("/v2/models/doubler/infer", json=body, headers=CLIENT)).json()
            assert default["model_version"] == "2" and default["outputs"][0]["data"] == [5.0]
            one = (await client.post("/v2/models/doubler/versions/1/infer", json=body, headers=CLIENT)).json()
            assert one["model_version"] == "1" and one["id"] == "r1"
            assert (await client.get("/v2/models/doubler/versions/1/ready", headers=CLIENT)).json()["ready"] is True
            absent = await client.post("/v2/models/doubler/versions/7/infer", json=body, headers=CLIENT)
            assert absent.status_code == 404 and "loaded: 2, 1" in absent.json()["error"]

    asyncio.run(scenario())


def test_split_weights_are_whole_numbers_in_a_sane_range(repo):
    from pydantic import ValidationError

    add_version(repo / DOUBLER.folder, "2")

    async def scenario():
        async with serving(app_for(repo)) as client:
            rules = {
                10**400: "less than or equal to 1000000",
                "50": "valid integer",
                True: "valid integer",
                0: "greater than or equal to 1",
            }  # 10**400 once made every request to the model a 500
            for bad, rule in rules.items():
                refused = await client.put(
                    "/admin/models/doubler/split", json={"weights": {"1": bad, "2": 10}}, headers=ADMIN
                )
                assert refused.status_code == 422 and rule in refused.text, (bad, refused.text)
            assert await answered_by(client) == "2"  # no split was set
            taken = await client.put(
                "/admin/models/doubler/split", json={"weights": {"1": 1_000_000, "2": 1}}, headers=ADMIN
            )
            assert taken.status_code == 200, taken.text

    asyncio.run(scenario())
    for bad in (10**400, "50", True, 0):
        with pytest.raises(ValidationError, match="traffic.doubler.1"):
            Settings(traffic={"doubler": {"1": bad, "2": 1}})


def test_a_newer_version_on_disk_waits_for_an_admin_load(repo):
    """Only a load (or polling) moves to a version put on disk after start-up: a worker that restarts would
    otherwise serve it while the others do not (tests/e2e/test_versions_e2e.py shows that on real workers)."""

    async def scenario():
        async with serving(app_for(repo)) as client:
            add_version(repo / DOUBLER.folder, "2")
            unload = await client.post("/admin/models/doubler/unload", json={"version": "9"}, headers=ADMIN)
            assert unload.status_code == 200  # any change reconciles: still not the version nobody agreed on
            assert await answered_by(client) == "1"
            assert (await client.post("/admin/models/doubler/load", headers=ADMIN)).json()["desired"]["newest"] == "2"
            assert await answered_by(client) == "2"

    asyncio.run(scenario())
