"""Shared fixtures and helpers: the data folder (skip with a reason when absent), real uvicorn servers, and the
in-process app on the stub model (tests/e2e/conftest.py adds the shared server on the real models).

A test's kind is its folder, and its marker comes from there: tests/unit (in process, stub model or small
artifacts), tests/integration (one real server process on the stub model or a small artifact, or a quick
subprocess) and tests/e2e (the real models, real clients, training runs, abuse suite, fuzzing, browser).
``make test-fast`` runs the first two; training runs are marked ``slow`` as well, in their files.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import pytest

from service import catalog
from service.app import create_app
from service.artifacts import version_folders
from service.runtime.registry import ModelEntry, open_model
from service.settings import Settings
from tests.stubs import DOUBLER, write_stub_artifacts
from training.common import DATA_DIR_ENV, default_data_dir

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
TESTS = Path(__file__).resolve().parent
KINDS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its kind, the folder it is in; a test outside the three folders is an error."""
    for item in items:
        try:
            kind = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:  # collected from outside tests/ (a path given on the command line): no kind
            continue
        if kind not in KINDS:
            raise pytest.UsageError(f"{item.nodeid}: a test belongs in tests/unit, tests/integration or tests/e2e")
        item.add_marker(getattr(pytest.mark, kind))


def example(name: str) -> dict:
    """The declared example input of a model in the catalog."""
    return catalog.get(name).predictor_class().example


def version_dir(model_dir: Path) -> Path:
    """The newest version in a model's folder (the committed artifacts hold one version per model)."""
    versions = version_folders(model_dir)
    assert versions, f"no version in {model_dir}"
    return list(versions.values())[-1]


def committed(name: str) -> ModelEntry:
    """A model loaded on the CPU from the committed artifacts, outside a server."""
    return open_model(catalog.get(name), ARTIFACTS)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = default_data_dir()
    if not path.is_dir():
        pytest.skip(f"dataset folder {path} not found: set ${DATA_DIR_ENV} to run the data-dependent tests")
    return path


@pytest.fixture(scope="session")
def quick_artifacts(tmp_path_factory, data_dir):
    """``quick_artifacts(name)``: an artifacts folder where ``python -m training <name> --quick`` has run
    (once per session, whichever tests ask)."""
    from training.__main__ import main

    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp(f"quick-{name}")
            main([name, "--quick", "--out", str(out), "--data-dir", str(data_dir), "--device", "cpu"])
            done[name] = out
        return done[name]

    return get


def need_data(data_dir: Path, *parts: str) -> Path:
    path = data_dir.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} not found: set ${DATA_DIR_ENV} to the folder that holds {'/'.join(parts)}")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def start_workers(workers: int = 2, **settings: str) -> tuple[subprocess.Popen, str]:
    """``python -m service`` with ``workers`` worker processes and SERVE_* ``settings`` on a free port, and its
    URL, once /readyz answers 200 and every worker is up (stop it with SIGTERM)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "SERVE_WORKERS": str(workers),
        "SERVE_PORT": str(port),
        **{f"SERVE_{k.upper()}": v for k, v in settings.items()},
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200 and len(children(server.pid)) == workers:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.kill()
    raise RuntimeError(f"python -m service with {workers} workers was not ready within 90 s")


class Server:
    """A uvicorn process serving ``app`` (an import path; a factory when ``factory``) on a free port, with
    settings from environment variables."""

    def __init__(self, env: dict[str, str], app: str = "service.app:app", factory: bool = False, cwd: Path = ROOT):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"server-{self.port}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - the server's output for its lifetime; closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                app,
                *(["--factory"] if factory else []),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--timeout-graceful-shutdown",
                "30",
                "--http",
                "service.api.server:GuardedHttpProtocol",
            ],
            cwd=cwd,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        output = self.output()
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{output}")

    def output(self) -> str:
        return self.log_path.read_text()

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


@contextmanager
def running_server(app: str = "service.app:app", factory: bool = False, **settings: str):
    """Start a server with SERVE_* settings given as keyword arguments (e.g. api_keys='["k"]')."""
    server = Server({f"SERVE_{k.upper()}": str(v) for k, v in settings.items()}, app, factory)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def stub_artifacts(tmp_path_factory) -> Path:
    return write_stub_artifacts(tmp_path_factory.mktemp("stub-artifacts"))


@pytest.fixture
def stub_app(stub_artifacts):
    """``stub_app(**settings)``: the real app factory serving only the stub model, in this process."""

    def make(**settings):
        return create_app(Settings(artifacts_dir=stub_artifacts, **settings), models=[DOUBLER])

    return make


@asynccontextmanager
async def serving(app) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``app``'s start-up and shutdown around an httpx client that calls it in this event loop."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process", timeout=30) as client:
            yield client


@pytest.fixture
def artifacts_copy(tmp_path) -> Path:
    """A private copy of the committed artifacts that a test may tamper with."""
    target = tmp_path / "artifacts"
    shutil.copytree(ARTIFACTS, target)
    return target
