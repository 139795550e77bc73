"""The monitor: what a neighbour of the attack sees (a /healthz prober, a well-behaved client, the server's
memory), measured in a separate process so the attacker's own work does not distort the figures."""

from __future__ import annotations

import itertools
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from .options import HOST, MB, ROOT, Options
from .server import Server
from .stats import latency_stats, ms, percentile
from .wire import parse_head

HAVE_PSS = os.path.exists("/proc/self/smaps_rollup")


def process_tree_rss(pid: int) -> int | None:
    """Memory in bytes of ``pid`` and every descendant (via /proc/<pid>/task/*/children): the sum of their
    PSS (proportional set size: a page shared by the workers counts once in all), or of VmRSS where the
    kernel has no smaps_rollup; None once the server is gone."""
    total, seen, todo = 0, set(), [pid]
    found = False
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/smaps_rollup" if HAVE_PSS else f"/proc/{p}/status") as handle:
                for line in handle:
                    if line.startswith("Pss:" if HAVE_PSS else "VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        found = True
                        break
        except OSError:
            continue
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as handle:
                    todo.extend(int(c) for c in handle.read().split())
        except OSError:
            pass
    return total if found else None


def fresh_probe(port: int, timeout: float = 2.0) -> tuple[float, int | str]:
    """GET /healthz on a new connection, as a kubelet probes: (seconds, status or error name)."""
    t0 = time.monotonic()
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.settimeout(max(0.05, timeout - (time.monotonic() - t0)))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):  # Connection: close, so the server ends the answer by closing
                data += chunk
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError
        status, _ = parse_head(data) if data else (None, {})
        return time.monotonic() - t0, status if status is not None else "empty answer"
    except (OSError, TimeoutError) as exc:
        return time.monotonic() - t0, type(exc).__name__


def monitor_main(cfg: dict) -> None:  # pragma: no cover - runs in the child process
    """The monitor process: prints "ready", measures until a line arrives on stdin, prints the samples (JSON)."""
    stop = threading.Event()
    probes: list[tuple[float, str, float, Any]] = []  # (start, "fresh"|"keepalive", seconds, status or error)
    good: list[tuple[float, float, Any]] = []  # (start, seconds, status or error)
    rss: list[tuple[float, int | None]] = []
    in_flight = [0]
    lock = threading.Lock()
    port, pid = cfg["port"], cfg["pid"]

    def paced(period: float, action: Callable[[], None]) -> None:
        next_at = time.monotonic()
        while not stop.is_set():
            action()
            next_at += period
            now = time.monotonic()
            if next_at < now - period:  # fell behind (a slow answer): no burst to catch up
                next_at = now
            stop.wait(max(0.0, next_at - now))

    def fresh() -> None:
        t0 = time.monotonic()
        seconds, status = fresh_probe(port)
        probes.append((t0, "fresh", seconds, status))

    keepalive_client = httpx.Client(base_url=f"http://{HOST}:{port}", timeout=2.0)

    def keepalive() -> None:
        t0 = time.monotonic()
        try:
            status: Any = keepalive_client.get("/healthz").status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        probes.append((t0, "keepalive", time.monotonic() - t0, status))

    def sample() -> None:
        rss.append((time.monotonic(), process_tree_rss(pid)))

    def good_client() -> None:
        headers = {"X-API-Key": cfg["key"]} if cfg["key"] else {}
        with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=cfg["good_timeout"], headers=headers) as client:

            def call() -> None:
                t0 = time.monotonic()
                with lock:
                    in_flight[0] += 1
                try:
                    status: Any = client.post(cfg["good_path"], json=cfg["good_body"]).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                finally:
                    with lock:
                        in_flight[0] -= 1
                good.append((t0, time.monotonic() - t0, status))

            paced(cfg["good_threads"] / cfg["good_rate"], call)

    threads = [
        threading.Thread(target=paced, args=(cfg["probe_interval"], fresh), daemon=True),
        threading.Thread(target=paced, args=(0.1, keepalive), daemon=True),
        threading.Thread(target=paced, args=(0.05, sample), daemon=True),
    ]
    if cfg["good_body"] is not None:
        threads += [threading.Thread(target=good_client, daemon=True) for _ in range(cfg["good_threads"])]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 3
    while not probes and time.monotonic() < deadline:
        time.sleep(0.01)
    print("ready", flush=True)
    sys.stdin.readline()  # "stop" (or EOF: the parent is gone)
    stop.set()
    for thread in threads:
        thread.join(timeout=2)
    json.dump(
        {"probes": list(probes), "good": list(good), "rss": list(rss), "good_in_flight_at_stop": in_flight[0]},
        sys.stdout,
    )
    sys.stdout.flush()


class Monitor:
    """The monitor as a child process (``python -c``: independent of how this module was started), so the
    attacker's own work does not delay its measurements; samples come back as JSON on its stdout."""

    def __init__(
        self, server: Server, key: str | None, good_path: str, good_body: dict | None, opts: Options, work: Path
    ):
        self.cfg = {
            "port": server.port,
            "pid": server.pid,
            "key": key,
            "good_path": good_path,
            "good_body": good_body,
            "good_rate": opts.good_rate,
            "good_threads": 4,
            "good_timeout": 10.0,
            "probe_interval": opts.probe_interval_s,
        }
        self.errors = open(work / "monitor.log", "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                (
                    "import json, sys; from benchmarks.abuse.monitor import monitor_main; "
                    "monitor_main(json.loads(sys.argv[1]))"
                ),
                json.dumps(self.cfg),
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
        )
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        line = self.process.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.process.kill()
            self.process.wait()
            self.errors.close()
            raise RuntimeError(f"the monitor process did not start: {(work / 'monitor.log').read_text()[-500:]}")

    def stop(self) -> dict:
        try:
            out, _ = self.process.communicate(b"stop\n", timeout=30)
            return json.loads(out)
        except (subprocess.TimeoutExpired, ValueError) as exc:
            self.process.kill()
            self.process.wait()
            return {"probes": [], "good": [], "rss": [], "error": f"the monitor did not answer: {type(exc).__name__}"}
        finally:
            self.errors.close()


def summarize_samples(samples: dict, t_start: float, t_end: float) -> dict[str, Any]:
    """Figures over the attack window [t_start, t_end] (t_end includes the settle) and the baseline before it."""

    def window(rows, lo, hi):
        return [r for r in rows if lo <= r[0] <= hi]

    out: dict[str, Any] = {}
    for kind in ("fresh", "keepalive"):
        for label, (lo, hi) in (("during", (t_start, t_end)), ("baseline", (0, t_start))):
            rows = [r for r in window(samples.get("probes", []), lo, hi) if r[1] == kind]
            failures = [r for r in rows if r[3] != 200 or r[2] > 2.0]
            ok_times = [r[2] for r in rows if r[3] == 200]
            stats = latency_stats([r[2] for r in rows])
            stats["ok_p99_ms"] = ms(percentile(ok_times, 99))
            stats["failures"] = len(failures)
            stats["failure_kinds"] = dict(Counter(str(r[3]) for r in failures))
            stats["longest_gap_ms"] = ms(max((b[0] - a[0] for a, b in itertools.pairwise(rows)), default=None))
            name = "healthz" if kind == "fresh" else "healthz_keepalive"
            out[name if label == "during" else f"{name}_baseline"] = stats
    rows = window(samples.get("good", []), t_start, t_end)
    statuses = Counter(str(r[2]) for r in rows)
    non_2xx = {k: v for k, v in statuses.items() if not (k.isdigit() and 200 <= int(k) < 300)}
    out["good_client"] = {
        "requests": len(rows),
        "statuses": dict(statuses),
        "non_2xx": non_2xx,
        "non_2xx_count": sum(non_2xx.values()),
        **{k: v for k, v in latency_stats([r[1] for r in rows]).items() if k != "n"},
        "in_flight_at_stop": samples.get("good_in_flight_at_stop"),
    }
    base = [r[1] for r in samples.get("good", []) if r[0] < t_start and str(r[2]).startswith("2")]
    out["good_client_baseline"] = latency_stats(base)
    rss = samples.get("rss", [])
    before = [r[1] for r in rss if r[0] < t_start and r[1]]
    during = [r[1] for r in window(rss, t_start, t_end) if r[1]]
    out["rss_mb"] = {
        "before": round(before[-1] / MB, 1) if before else None,
        "peak": round(max(during) / MB, 1) if during else None,
        "after": round(during[-1] / MB, 1) if during else None,
        "samples": len(during),
    }
    if before and during:  # rises over the level just before the attack; "after": at the end of the settle
        out["rss_mb"]["peak_rise"] = round((max(during) - before[-1]) / MB, 1)
        out["rss_mb"]["end_rise"] = round((during[-1] - before[-1]) / MB, 1)
    # every 0.5 s from the attack's start (negative: the baseline), to tell a plateau from a leak
    timeline, next_at = [], None
    for t, value in rss:
        if value and (next_at is None or t >= next_at):
            timeline.append([round(t - t_start, 1), round(value / MB, 1)])
            next_at = t + 0.5
    out["rss_timeline_mb"] = timeline
    return out
