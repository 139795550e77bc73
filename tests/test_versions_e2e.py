"""Model versions on a real server: a real model reloaded ten times under steady load of 64 clients, half
the times to a corrupted version, with nothing lost; and a change reaching every worker process."""

import asyncio
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from service import catalog
from tests.conftest import ARTIFACTS, Server, example, start_workers, version_dir
from tests.test_versions import add_version

ADMIN_KEY = "admin-key"
ADMIN = {"X-API-Key": ADMIN_KEY}
MODEL = catalog.get("fashion")
CLIENTS = 64


def rss_mb(pid: int) -> float:
    return next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:")) / 1024


class Load:
    """``CLIENTS`` clients calling ``path`` back to back on a thread, recording every answer's status,
    version and start and end times."""

    def __init__(self, url: str, path: str, body: dict):
        self.url, self.path, self.body = url, path, body
        self.answers: list[tuple[float, float, int, str | None]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _client(self, client: httpx.AsyncClient) -> None:
        while not self.stopping.is_set():
            start = time.monotonic()
            try:
                response = await client.post(self.path, json=self.body)
                status, version = response.status_code, response.headers.get("X-Model-Version")
            except httpx.HTTPError as exc:
                status, version = 0, type(exc).__name__
            self.answers.append((start, time.monotonic(), status, version))

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=self.url, timeout=30, limits=limits) as client:
            await asyncio.gather(*(self._client(client) for _ in range(CLIENTS)))

    def __enter__(self) -> "Load":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(60)


@pytest.fixture
def fashion_repo(tmp_path) -> Path:
    """An artifacts folder holding the committed fashion version only."""
    model_dir = tmp_path / "artifacts" / MODEL.folder
    model_dir.mkdir(parents=True)
    source = version_dir(ARTIFACTS / MODEL.folder)
    shutil.copytree(source, model_dir / source.name)
    return tmp_path / "artifacts"


@pytest.mark.skipif(sys.platform != "linux", reason="reads the server's memory from /proc")
def test_ten_reloads_under_load_lose_nothing_and_never_serve_a_corrupted_version(fashion_repo):
    model_dir = fashion_repo / MODEL.folder
    first = version_dir(model_dir).name
    server = Server({"SERVE_ARTIFACTS_DIR": str(fashion_repo), "SERVE_MODELS": '["fashion"]',
                     "SERVE_ADMIN_KEYS": f'["{ADMIN_KEY}"]', "SERVE_LOG_LEVEL": "WARNING"})
    live = {first: [0.0, float("inf")]}  # version -> [became default, replaced]; the corrupted never enter
    corrupted: set[str] = set()
    try:
        with Load(server.url, "/fashion", example("fashion")) as load, server.client(headers=ADMIN) as admin:
            time.sleep(3)  # warm: allocator pools and batch shapes settle before memory is read
            before = rss_mb(server.process.pid)
            current = first
            for i in range(10):
                name = f"{first}.{i + 1}"
                add_version(model_dir, name, corrupt=bool(i % 2))
                started = time.monotonic()
                answer = admin.post("/admin/models/fashion/load")
                if i % 2:
                    corrupted.add(name)
                    assert answer.status_code == 422 and f"version {name} did not load" in answer.json()["detail"]
                    assert answer.json()["detail"].endswith(f"{current} keeps serving")
                else:
                    assert answer.status_code == 200, answer.text
                    assert answer.json()["default"] == name
                    live[name] = [started, float("inf")]
                    live[current][1] = time.monotonic()
                    current = name
                time.sleep(1.5)
            after = rss_mb(server.process.pid)
            state = admin.get("/admin/models").json()["workers"][0]["models"]["fashion"]
        answers = load.answers
    finally:
        server.stop()

    assert len(answers) > 1000, len(answers)
    bad = [a for a in answers if a[2] != 200]
    assert not bad, f"{len(bad)} of {len(answers)} answers were not 200: {bad[:5]}"
    assert not corrupted & {version for *_, version in answers}
    for start, end, _, version in answers:  # each answered by a version that was live at that moment
        became, replaced = live[version]
        assert became <= end and start <= replaced, (version, start, end, became, replaced)
    assert len({version for *_, version in answers}) == 6  # the first and five good reloads all served
    assert state["default"] == current and all(state["versions"][v]["state"] == "failed" for v in corrupted)
    assert [v for v, s in state["versions"].items() if s["state"] == "ready"] == [current]  # the old ones freed
    assert abs(after - before) <= 0.10 * before, (before, after)


@pytest.mark.skipif(sys.platform != "linux", reason="finds the worker processes with pgrep")
def test_a_change_reaches_every_worker_process(fashion_repo):
    model_dir = fashion_repo / MODEL.folder
    first = version_dir(model_dir).name
    server, url = start_workers(models='["fashion"]', artifacts_dir=str(fashion_repo),
                                admin_keys=f'["{ADMIN_KEY}"]')
    try:
        for _ in range(50):  # each worker reports its versions once it has started
            if len(httpx.get(url + "/admin/models", headers=ADMIN).json()["workers"]) == 2:
                break
            time.sleep(0.1)
        assert len(httpx.get(url + "/admin/models", headers=ADMIN).json()["workers"]) == 2

        def versions_seen() -> set[str]:  # new connections, so both workers answer
            return {httpx.post(url + "/fashion", json=example("fashion")).headers["X-Model-Version"]
                    for _ in range(30)}
        assert versions_seen() == {first}
        newer = f"{first}.1"
        add_version(model_dir, newer)
        loaded = httpx.post(url + "/admin/models/fashion/load", headers=ADMIN, timeout=60)
        assert loaded.status_code == 200, loaded.text
        assert versions_seen() == {newer}  # every worker switched before the call returned
        workers = httpx.get(url + "/admin/models", headers=ADMIN).json()["workers"]
        assert len(workers) == 2 and {w["models"]["fashion"]["default"] for w in workers} == {newer}

        pinned = httpx.put(url + "/admin/models/fashion/default", json={"version": first}, headers=ADMIN, timeout=60)
        assert pinned.status_code == 200, pinned.text
        assert versions_seen() == {first}  # a rollback, everywhere
        metrics = httpx.get(url + "/metrics").text
        assert f'model_version_traffic_share{{model="fashion",version="{first}"}} 1.0' in metrics
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(45) == 0
