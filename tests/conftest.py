"""Shared fixtures: the data folder (skip with a reason when absent) and a real uvicorn server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from training.common import DATA_DIR_ENV, default_data_dir

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = default_data_dir()
    if not path.is_dir():
        pytest.skip(f"dataset folder {path} not found: set ${DATA_DIR_ENV} to run the data-dependent tests")
    return path


def need_data(data_dir: Path, *parts: str) -> Path:
    path = data_dir.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} not found: set ${DATA_DIR_ENV} to the folder that holds {'/'.join(parts)}")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A uvicorn process serving service.app:app on a free port, with settings from environment variables."""

    def __init__(self, env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"server-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", str(self.port),
             "--timeout-graceful-shutdown", "30"],
            cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)
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
def running_server(**settings: str):
    """Start a server with SERVE_* settings given as keyword arguments (e.g. api_keys='["k"]')."""
    server = Server({f"SERVE_{k.upper()}": str(v) for k, v in settings.items()})
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server():
    """One server on the committed artifacts, shared by the tests that do not change settings."""
    with running_server() as srv:
        yield srv


@pytest.fixture(scope="session")
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture
def artifacts_copy(tmp_path) -> Path:
    """A private copy of the committed artifacts that a test may tamper with."""
    target = tmp_path / "artifacts"
    shutil.copytree(ARTIFACTS, target)
    return target
