"""Priorities under overload: a bulk key floods ``/poem`` while an interactive key sends a few requests, against
``python -m service`` with two worker processes; once with the keys' priorities (interactive high, bulk low)
and once with both normal, in the same run, alternating, fresh servers each round.

Load comes from two ``wrk`` processes at once (one per key): the bulk one at 64 connections (several times
what the server answers without a queue), the interactive one at 2. Each figure is the median over the rounds.
A third phase sends the bulk flood with ``X-Request-Timeout: 0.25`` and counts what was answered in time and
what was refused or dropped.

    python -m benchmarks.overload [--rounds 3] [--duration 8]

Writes benchmarks/results/overload.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.observability import free_port
from service.catalog import get

RESULTS = Path(__file__).parent / "results"
WEB, BULK = "web-key", "bulk-key"
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = os.getenv("API_KEY")
if os.getenv("TIMEOUT") then wrk.headers["X-Request-Timeout"] = os.getenv("TIMEOUT") end
wrk.body = io.open(os.getenv("BODY_FILE"), "rb"):read("*a")
function done(summary, latency, requests)
  io.write(string.format(
    'RESULT {"requests": %d, "seconds": %.3f, "non_2xx": %d, "p50_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f}\\n',
    summary.requests, summary.duration / 1e6, summary.errors.status, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3))
end
"""


def start(keys: list[dict]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "SERVE_WORKERS": "2",
        "SERVE_PORT": str(port),
        "SERVE_MODELS": '["poem"]',
        "SERVE_API_KEYS": json.dumps(keys),
        "SERVE_LOG_LEVEL": "WARNING",
    }
    server = subprocess.Popen([sys.executable, "-m", "service"], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                time.sleep(1)  # both workers up
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.kill()
    raise RuntimeError("the server did not start")


def wrk(url: str, key: str, connections: int, seconds: int, script: Path, body: Path, timeout: str | None = None):
    env = {**os.environ, "API_KEY": key, "BODY_FILE": str(body), **({"TIMEOUT": timeout} if timeout else {})}
    return subprocess.Popen(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "-s", str(script), url + "/poem"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def result(process: subprocess.Popen) -> dict:
    out, _ = process.communicate()
    line = next(text for text in out.splitlines() if text.startswith("RESULT "))
    figures = json.loads(line[len("RESULT ") :])
    figures["req_per_s"] = round(figures["requests"] / figures["seconds"], 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8)
    args = parser.parse_args()
    modes = {
        "priorities": [
            {"key": WEB, "name": "web", "priority": "high"},
            {"key": BULK, "name": "bulk", "priority": "low"},
        ],
        "no priorities": [{"key": WEB, "name": "web"}, {"key": BULK, "name": "bulk"}],
    }
    samples: dict[str, list[dict]] = {mode: [] for mode in modes}
    deadlines: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        script, body = Path(tmp) / "post.lua", Path(tmp) / "poem.json"
        script.write_text(LUA)
        body.write_text(json.dumps({**get("poem").predictor_class().example, "line_num": 4}))
        for round_ in range(args.rounds):
            for mode in modes if round_ % 2 == 0 else reversed(list(modes)):
                server, url = start(modes[mode])
                try:
                    bulk = wrk(url, BULK, 64, args.duration, script, body)
                    time.sleep(1)
                    web = wrk(url, WEB, 2, args.duration - 2, script, body)
                    sample = {"web": result(web), "bulk": result(bulk)}
                    if mode == "priorities":
                        deadlines.append(result(wrk(url, BULK, 64, 4, script, body, timeout="0.25")))
                finally:
                    server.send_signal(signal.SIGTERM)
                    server.wait(60)
                samples[mode].append(sample)
                print(
                    f"round {round_ + 1} {mode}: web p99 {sample['web']['p99_ms']:.0f} ms, "
                    f"bulk p99 {sample['bulk']['p99_ms']:.0f} ms",
                    flush=True,
                )

    def median(mode: str, who: str, figure: str) -> float:
        return statistics.median(s[who][figure] for s in samples[mode])

    table = {
        mode: {who: {f: median(mode, who, f) for f in ("req_per_s", "p50_ms", "p99_ms")} for who in ("web", "bulk")}
        for mode in modes
    }
    summary = {
        "command": " ".join(["python -m benchmarks.overload", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "medians": table,
        "rounds": samples,
        "deadline_0.25s_flood": deadlines,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overload.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n| mode | key | req/s | p50 ms | p99 ms |\n|---|---|---:|---:|---:|")
    for mode in modes:
        for who in ("web", "bulk"):
            t = table[mode][who]
            print(f"| {mode} | {who} | {t['req_per_s']:.0f} | {t['p50_ms']:.0f} | {t['p99_ms']:.0f} |")
    for d in deadlines:
        print(f"deadline 0.25 s flood: {d['requests']} answers, {d['non_2xx']} not 200, p99 {d['p99_ms']:.0f} ms")


if __name__ == "__main__":
    main()
