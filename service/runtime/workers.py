"""Several worker processes on one port, sharing one copy of the weights.

``python -m service`` with ``SERVE_WORKERS`` > 1 runs gunicorn's arbiter with uvicorn workers. The app,
and with it every model, is built and loaded once in the arbiter before it forks (``preload_app``): the
workers start with the weights already in memory, in pages they share copy-on-write, and only start
their batchers. torch runs single-threaded until the fork (its OpenMP pool must not exist before one) and
the loaded objects are frozen out of the garbage collector, whose scans would otherwise write to (and so
copy) every shared page. gunicorn replaces a worker that dies and drains every worker on SIGTERM.

Model versions changed at run time (service/runtime/control.py) reach every worker through a shared folder: the
workers apply each change to their own copies, loaded after the fork (so a new version is not shared).

Metrics come from every worker: prometheus-client's multiprocess mode keeps each worker's values in files
under ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` adds them up, whichever worker answers.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from gunicorn.app.base import BaseApplication
from uvicorn_worker import UvicornWorker

from service.settings import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, lowered by a cgroup (v2 or v1) CPU quota, as in a
    container limited to fewer cores than the host has."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    try:
        limit, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        quota = None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        try:
            quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            quota = quota_us / int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text()) if quota_us > 0 else None
        except (OSError, ValueError):
            pass
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


# Each worker listens on a socket of its own, bound with SO_REUSEPORT, so that the kernel spreads new
# connections evenly over the workers. On gunicorn's one shared socket, the worker that wakes first accepts
# the whole burst (asyncio accepts up to its backlog per wake-up): 64 keep-alive clients connecting at once
# could all land on one worker, which then served them on one core while the other idled (measured: 5,336
# req/s against 9,900 when they spread). Linux only; elsewhere the workers share gunicorn's socket.
OWN_SOCKETS = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class GuardedUvicornWorker(UvicornWorker):
    """uvicorn's gunicorn worker with our connection limits (service/api/server.py), on its own listening socket."""

    CONFIG_KWARGS = {"loop": "auto", "http": "service.api.server:GuardedHttpProtocol"}

    def run(self) -> None:
        if OWN_SOCKETS:
            self.sockets = [listening_socket(host, port, self.cfg.backlog) for host, port in self.cfg.address]
        super().run()


def close_shared_sockets(arbiter) -> None:
    """gunicorn's when_ready hook (before the first fork): with a socket per worker, nothing may listen on
    the arbiter's, or the kernel would route a share of the connections to a socket nobody accepts from."""
    if OWN_SOCKETS:
        for listener in arbiter.LISTENERS:
            listener.close()
        arbiter.LISTENERS = []


class PreforkServer(BaseApplication):
    """gunicorn, configured from our settings instead of its command line."""

    def __init__(self, settings: Settings, workers: int):
        self.settings, self.workers = settings, workers
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        for key, value in {
            "bind": f"{s.host}:{s.port}",
            "workers": self.workers,
            "worker_class": "service.runtime.workers.GuardedUvicornWorker",
            "preload_app": True,
            "keepalive": math.ceil(s.keep_alive_s),
            "graceful_timeout": 30,
            "timeout": 60,
            "loglevel": "warning",
            "child_exit": forget_worker_metrics,
            "when_ready": close_shared_sockets,
        }.items():
            self.cfg.set(key, value)

    def load(self):
        import torch  # imported here, after the metrics directory is set

        from service.app import create_app

        torch.set_num_threads(1)  # no OpenMP pool before the fork; each worker sets its own threads
        app = create_app(self.settings)
        app.state.registry.load_all()  # once, here: the workers' start-up finds the models loaded
        gc.collect()
        gc.freeze()
        return app


def forget_worker_metrics(server, worker) -> None:
    """gunicorn's child_exit hook: a dead worker's live gauges (queue depth, open connections, model_up) are
    deleted, so a SIGKILLed worker's last queue depth does not stay in sum(model_queue_depth) for good."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def serve(settings: Settings, workers: int) -> None:
    """Run ``workers`` processes on settings.host:settings.port until SIGTERM; metrics in a fresh folder."""
    folder = tempfile.mkdtemp(prefix="serve-metrics-")
    os.environ[MULTIPROC_ENV] = folder  # before prometheus_client is imported anywhere
    control = settings.control_dir or Path(tempfile.mkdtemp(prefix="serve-versions-"))  # see service/runtime/control.py
    try:
        PreforkServer(settings.model_copy(update={"control_dir": control}), workers).run()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if settings.control_dir is None:
            shutil.rmtree(control, ignore_errors=True)
