"""What traces and payload records cost the server, in instructions: a count that does not drift with a shared
machine's speed as requests per second do (the observability benchmark's ratios move by ±0.1 between runs here).

One uvicorn process serving ``--route`` runs under ``valgrind --tool=callgrind`` (Debian's valgrind), with
both off and then with every request traced and recorded (``batch`` mode, spans and records to a real nginx
that discards them, as in benchmarks/observability.py). After a warm-up the counters are zeroed, ``--requests``
requests are sent by ``--clients`` concurrent clients, and the counts are dumped: instructions per request for
each of the server's threads (the event loop's, the model's, the pipes' threads; the exporter and sender
processes are not counted: they do not hold the server's interpreter lock). Under valgrind a server answers
about 30 requests a second, so spans are sent per 512 as under load (OTEL_BSP_SCHEDULE_DELAY is raised) while
payload records still go every 0.5 s, about 15 at a time: their thread's count per request is higher than under
load (frames of 500).

    python -m benchmarks.instructions [--route phone-price] [--requests 1024] [--clients 16]

Needs valgrind and nginx. Writes benchmarks/results/instructions-<route>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.load import wait_ready
from benchmarks.observability import free_port, start_nginx
from service.catalog import get

RESULTS = Path(__file__).parent / "results"


async def send(url: str, body: bytes, requests: int, clients: int) -> None:
    left = requests

    async with httpx.AsyncClient(timeout=600) as client:

        async def one_client() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                answer = await client.post(url, content=body, headers={"content-type": "application/json"})
                answer.raise_for_status()

        await asyncio.gather(*(one_client() for _ in range(clients)))


def thread_counts(prefix: Path) -> list[int]:
    """Instructions per thread in the dump callgrind wrote when asked (part 1), most first."""
    counts = []
    for dump in prefix.parent.glob(prefix.name + ".1-*"):
        found = re.search(r"^totals: (\d+)", dump.read_text(errors="replace"), re.M)
        counts.append(int(found.group(1)) if found else 0)
    return sorted(counts, reverse=True)


def count(route: str, env: dict[str, str], requests: int, clients: int, work: Path, name: str) -> list[int]:
    port = free_port()
    prefix = work / f"callgrind-{name}"
    server = subprocess.Popen(
        [
            "valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={prefix}",
            sys.executable, "-m", "uvicorn", "service.app:app", "--port", str(port), "--log-level", "warning",
            "--no-access-log", "--http", "service.api.server:GuardedHttpProtocol",
        ],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SERVE_PAYLOAD"))},
            "SERVE_MODELS": json.dumps([route]),
            "SERVE_LOG_LEVEL": "WARNING",
            "SERVE_MAX_QUEUE": "4096",
            **env,
        },
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_ready(server, f"http://127.0.0.1:{port}/readyz", seconds=900)
        url, body = f"http://127.0.0.1:{port}/{route}", json.dumps(get(route).predictor_class().example).encode()
        asyncio.run(send(url, body, 200, clients))  # warm-up, not counted
        subprocess.run(["callgrind_control", "-z", str(server.pid)], check=True, capture_output=True)
        asyncio.run(send(url, body, requests, clients))
        subprocess.run(["callgrind_control", "-d", str(server.pid)], check=True, capture_output=True)
        time.sleep(1)
        return [round(c / requests) for c in thread_counts(prefix) if c > requests * 100]  # threads that worked
    finally:
        server.terminate()
        server.wait(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--route", default="phone-price")
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        work = Path(tmp)
        (work / "body").mkdir()
        nginx, sink = start_nginx(work)
        try:
            sides = {
                "off": {},
                "on": {
                    "OTEL_EXPORTER_OTLP_ENDPOINT": sink,
                    "OTEL_BSP_SCHEDULE_DELAY": "600000",  # sent per 512 spans, as under load
                    "SERVE_PAYLOAD_LOG_URL": sink + "/events",
                    "SERVE_PAYLOAD_LOG_SAMPLE": "1",
                    "SERVE_PAYLOAD_LOG_FORMAT": "batch",
                },
            }
            threads = {
                side: count(args.route, env, args.requests, args.clients, work, side) for side, env in sides.items()
            }
        finally:
            nginx.terminate()
            nginx.wait(10)
    totals = {side: sum(counts) for side, counts in threads.items()}
    summary = {
        "command": " ".join(["python -m benchmarks.instructions", *sys.argv[1:]]),
        "route": args.route,
        "requests": args.requests,
        "clients": args.clients,
        "instructions_per_request_by_thread": threads,
        "instructions_per_request": totals,
        "off_over_on": round(totals["off"] / totals["on"], 3),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"instructions-{args.route}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"/{args.route}, instructions per request (threads, most first):")
    for side, counts in threads.items():
        print(f"  {side:>3}: {totals[side]:>9,} = {' + '.join(f'{c:,}' for c in counts)}")
    print(f"off / on: {summary['off_over_on']:.3f} (the share of the throughput kept, were time proportional)")


if __name__ == "__main__":
    main()
