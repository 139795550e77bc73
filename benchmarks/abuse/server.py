"""The server under test: a fresh ``python -m service`` per attack on a free loopback port, and the
file-descriptor limits (the attacker raises its own; the server keeps the one it would have had)."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from .options import HOST, ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


ORIGINAL_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_nofile() -> int:
    """Raise this process's soft file-descriptor limit to the hard one (the attacker needs many sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class ServerError(RuntimeError):
    pass


class Server:
    """``python -m service`` on a free loopback port with SERVE_* settings, its output in ``work``."""

    def __init__(self, settings: dict[str, str], work: Path, nofile: int | None = None):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.grpc_port = int(settings["SERVE_GRPC_PORT"]) if settings.get("SERVE_GRPC_PORT") else None
        self.log_path = work / "server.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - the server's output for its lifetime; closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SERVE_LOG_LEVEL": "WARNING", **settings}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", HOST, "--port", str(self.port)],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        # The server keeps the descriptor limit it would have had, not the attacker's raised one (set while it
        # is still importing, long before it opens its socket).
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.nofile = min(nofile or ORIGINAL_NOFILE[0], hard)
        try:
            resource.prlimit(self.process.pid, resource.RLIMIT_NOFILE, (self.nofile, hard))
        except (OSError, ValueError):
            self.nofile = soft

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, key: str | None, timeout: float = 180.0) -> dict[str, Any]:
        """Wait until /readyz answers 200 or 503 (models load before the server listens, so either is final)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        headers = {"X-API-Key": key} if key else {}
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerError(f"server exited with {self.process.returncode}: {self.log_tail(15)}")
            try:
                response = httpx.get(self.url + "/readyz", headers=headers, timeout=5)
                if response.status_code in (200, 503):
                    try:
                        body = response.json()
                    except ValueError:
                        body = {"text": response.text[:300]}
                    return {"status": response.status_code, "body": body}
                last = f"{response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(0.25)
        raise ServerError(
            f"/readyz did not answer 200 or 503 within {timeout:g} s (last: {last}); log: {self.log_tail(15)}"
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            self.log.flush()
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_summary(self) -> dict[str, Any]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        errors = [line for line in text.splitlines() if re.search(r"\b(ERROR|CRITICAL|Traceback)\b", line)]
        return {
            "lines": text.count("\n"),
            "error_lines": len(errors),
            "first_errors": errors[:5],
            "tail": text.splitlines()[-8:],
        }

    def stop(self) -> int | None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()
        return self.process.returncode
