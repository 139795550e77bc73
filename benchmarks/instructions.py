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

With ``--cache-sim`` callgrind also simulates a core's caches (its first-level caches, and as its last level
this machine's L2, each core's own): the misses per request of each, where a request's time goes beyond its
instructions (writes benchmarks/results/instructions-<route>-cache.json).

With ``--in-process`` the requests go straight to the app (its ASGI entry point, ``--clients`` at a time, in the
process that callgrind runs: no HTTP server and no client), so what is counted is the app's own work per request,
and a count repeats within about 3 k per request where one through uvicorn moves by 5-10 k (run it with
``--requests 2048``: the dump's own cost is spread over them; writes instructions-<route>-in-process.json).

    python -m benchmarks.instructions [--route phone-price] [--requests 1024] [--clients 16] [--cache-sim]
        [--in-process]

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
# callgrind's miss counts, by cache: the first level's (instructions; data read and written) and the core's L2
MISSES = {"I1": ("I1mr",), "D1": ("D1mr", "D1mw"), "L2": ("ILmr", "DLmr", "DLmw")}


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


def callgrind_control(option: str, pid: int) -> None:
    """Asks callgrind to zero (``-z``) or dump (``-d``) its counters in process ``pid``."""
    subprocess.run(["callgrind_control", option, str(pid)], check=True, capture_output=True)


async def drive_in_process(route: str, requests: int, clients: int) -> None:
    """What runs under callgrind with ``--in-process``: the app built as uvicorn would, its lifespan started, a
    warm-up, then ``requests`` POSTs to ``/route`` straight to its ASGI entry point, ``clients`` at a time, counted
    between a zero and a dump of callgrind's counters (asked of it by this process, as it waits)."""
    from service.app import create_app

    app = create_app()
    body = json.dumps(get(route).predictor_class().example).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def one() -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": f"/{route}", "raw_path": f"/{route}".encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"127.0.0.1"), *head], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        }  # fmt: skip
        answer: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            answer.append(message)

        await app(scope, receive, send)
        if answer[0]["status"] != 200:
            raise RuntimeError(f"/{route} answered {answer[0]['status']}: {answer[1:]}")

    async def load(count: int) -> None:
        for start in range(0, count, clients):  # exactly ``count``: the counts are divided by it
            await asyncio.gather(*(one() for _ in range(min(clients, count - start))))

    async with app.router.lifespan_context(app):
        await load(8 * clients)  # warm-up, not counted
        await asyncio.to_thread(callgrind_control, "-z", os.getpid())
        await load(requests)
        await asyncio.to_thread(callgrind_control, "-d", os.getpid())


def thread_events(prefix: Path) -> list[dict[str, int]]:
    """Each thread's counts (``Ir``: instructions; with the cache simulated, its misses too) in the dump callgrind
    wrote when asked (part 1), most instructions first."""
    threads = []
    for dump in prefix.parent.glob(prefix.name + ".1-*"):
        text = dump.read_text(errors="replace")
        events, totals = (re.search(rf"^{field}: (.+)$", text, re.M) for field in ("events", "totals"))
        if events and totals:
            threads.append(dict(zip(events.group(1).split(), map(int, totals.group(1).split()), strict=False)))
    return sorted(threads, key=lambda counts: -counts.get("Ir", 0))


def core_cache() -> str:
    """This machine's L2 (each core's own: what a miss past it costs is a trip to the shared L3) as valgrind's
    ``--LL`` reads it: size, ways, line."""
    index = Path("/sys/devices/system/cpu/cpu0/cache/index2")
    size = (index / "size").read_text().strip()
    size_bytes = int(size.rstrip("KM")) << (20 if size.endswith("M") else 10 if size.endswith("K") else 0)
    ways, line = ((index / name).read_text().strip() for name in ("ways_of_associativity", "coherency_line_size"))
    return f"--LL={size_bytes},{ways},{line}"


def count(
    route: str,
    env: dict[str, str],
    requests: int,
    clients: int,
    work: Path,
    name: str,
    cache_sim: bool,
    in_process: bool = False,
) -> list[dict[str, int]]:
    """Per request, each busy thread's counts (:func:`thread_events`)."""
    prefix = work / f"callgrind-{name}"
    cache = ["--cache-sim=yes", core_cache()] if cache_sim else []
    under_callgrind = [
        "valgrind", "--tool=callgrind", "--separate-threads=yes", *cache, f"--callgrind-out-file={prefix}",
        sys.executable, "-m",
    ]  # fmt: skip
    if in_process:
        subprocess.run(
            [*under_callgrind, "benchmarks.instructions", "--drive", route, str(requests), str(clients)],
            env={**server_environment(route), **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
        )  # fmt: skip
        return busy_threads(prefix, requests)
    port = free_port()
    server = subprocess.Popen(
        [
            *under_callgrind, "uvicorn", "service.app:app", "--port", str(port), "--log-level", "warning",
            "--no-access-log", "--http", "service.api.server:GuardedHttpProtocol",
        ],
        env={**server_environment(route), **env},
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_ready(server, f"http://127.0.0.1:{port}/readyz", seconds=900)
        url, body = f"http://127.0.0.1:{port}/{route}", json.dumps(get(route).predictor_class().example).encode()
        asyncio.run(send(url, body, 200, clients))  # warm-up, not counted
        callgrind_control("-z", server.pid)
        asyncio.run(send(url, body, requests, clients))
        callgrind_control("-d", server.pid)
        time.sleep(1)
        return busy_threads(prefix, requests)
    finally:
        server.terminate()
        server.wait(120)


def server_environment(route: str) -> dict[str, str]:
    """The environment a counted server runs in (its own OTEL_* and payload-record settings left out)."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SERVE_PAYLOAD"))},
        "SERVE_MODELS": json.dumps([route]),
        "SERVE_LOG_LEVEL": "WARNING",
        "SERVE_MAX_QUEUE": "4096",
    }


def busy_threads(prefix: Path, requests: int) -> list[dict[str, int]]:
    """The counts per request of the threads that worked (:func:`thread_events`)."""
    return [
        {event: round(total / requests) for event, total in counts.items()}
        for counts in thread_events(prefix)
        if counts.get("Ir", 0) > requests * 100
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--route", default="phone-price")
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--cache-sim",
        action="store_true",
        help="simulate the caches too (a core's L1s and its own L2): misses per request, next to instructions",
    )
    parser.add_argument(
        "--in-process", action="store_true", help="send the requests straight to the app, without an HTTP server"
    )
    parser.add_argument("--drive", nargs=3, metavar=("ROUTE", "REQUESTS", "CLIENTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:  # the process callgrind runs with --in-process
        route, requests, clients = args.drive
        asyncio.run(drive_in_process(route, int(requests), int(clients)))
        return
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
            events = {
                side: count(args.route, env, args.requests, args.clients, work, side, args.cache_sim, args.in_process)
                for side, env in sides.items()
            }
        finally:
            nginx.terminate()
            nginx.wait(10)
    threads = {side: [counts["Ir"] for counts in by_thread] for side, by_thread in events.items()}
    totals = {side: sum(counts) for side, counts in threads.items()}
    summary: dict = {
        "command": " ".join(["python -m benchmarks.instructions", *sys.argv[1:]]),
        "route": args.route,
        "requests": args.requests,
        "clients": args.clients,
        "instructions_per_request_by_thread": threads,
        "instructions_per_request": totals,
        "off_over_on": round(totals["off"] / totals["on"], 3),
    }
    if args.cache_sim:  # the event loop's thread (the busiest), and all threads: misses of each cache per request
        summary["misses_per_request"] = {
            side: {
                scope: {cache: sum(t.get(e, 0) for t in counted for e in names) for cache, names in MISSES.items()}
                for scope, counted in (("event_loop", by_thread[:1]), ("all_threads", by_thread))
            }
            for side, by_thread in events.items()
        }
    RESULTS.mkdir(exist_ok=True)
    kinds = ("-cache" if args.cache_sim else "") + ("-in-process" if args.in_process else "")
    name = f"instructions-{args.route}{kinds}.json"
    (RESULTS / name).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"/{args.route}, instructions per request (threads, most first):")
    for side, counts in threads.items():
        print(f"  {side:>3}: {totals[side]:>9,} = {' + '.join(f'{c:,}' for c in counts)}")
    print(f"off / on: {summary['off_over_on']:.3f} (the share of the throughput kept, were time proportional)")
    if args.cache_sim:
        print("misses per request, the event loop's thread (all threads):")
        for side, scopes in summary["misses_per_request"].items():
            loop, every = scopes["event_loop"], scopes["all_threads"]
            print("  " + f"{side:>3}: " + ", ".join(f"{c} {loop[c]:,} ({every[c]:,})" for c in MISSES))


if __name__ == "__main__":
    main()
