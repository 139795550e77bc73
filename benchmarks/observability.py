"""What traces and payload records cost: /phone-price and /fashion at 64 clients with both off, and with
both on (every request traced and recorded: the SDK's default always-on sampler, SERVE_PAYLOAD_LOG_SAMPLE=1).

The "on" server sends its spans over OTLP/HTTP and its records as CloudEvents to a real nginx (Debian's
package), which takes every POST and discards it: the receiving end costs little and is a separate process,
as a collector and a log sink are in production (on another machine there; on this 2-core one it takes its
share of the same cores, so the ratio is, if anything, pessimistic). Load comes from ``wrk`` (1 thread).

Each of ``--rounds`` rounds starts a fresh server per side, one at a time, in swapped order every other
round, and loads each route for ``--duration`` seconds; each figure is the median over the rounds, and the
ratio is given both as the ratio of the medians and as the median of each round's ratio. With
``--keep-servers`` both servers start once, are warmed up, and are loaded in turn each round, one route after
the other (a pair of figures ``--duration`` seconds apart rather than a minute: on a shared machine whose speed
drifts, the steadier ratio); each load's CPU time per request is read too (Linux's schedstat), the server's and its
child processes' (the span exporter and payload sender, at the lowest priority: on a machine whose cores the
load keeps busy they may run partly after it, and a figure then reads low).
The "on" server's records sent and dropped (``payload_log_*_total``) are reported with it. With ``--pin`` each
server process (all its threads) has CPU 0 to itself, and wrk, nginx and the servers' child processes share the
others: what the server itself adds, where its children and the load have room of their own.

    python -m benchmarks.observability [--rounds 3] [--duration 5] [--payload-format binary] [--keep-servers]
        [--routes phone-price,fashion] [--pin]

Needs nginx (``apt-get install nginx-light``) and wrk. Writes
benchmarks/results/observability-<parts>-<format>[-ratio<r>][-kept][-pinned][-<routes>].json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.load import LUA, start_server, wrk
from service.catalog import get

RESULTS = Path(__file__).parent / "results"
ROUTES = ("phone-price", "fashion")  # the default --routes
CLIENTS = 64

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    client_max_body_size 64m;
    server {{
        listen 127.0.0.1:{port};
        location /v1/traces {{ default_type application/x-protobuf; return 200 ""; }}
        location / {{ return 202; }}
    }}
}}
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_nginx(work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=work, port=port))
    process = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            httpx.post(url + "/ready", content=b"x", timeout=1)
            return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("nginx did not start")


def run_ns(pid: int) -> int:
    """The CPU time a process has run, all its threads together (ns: Linux's schedstat, finer than clock ticks)."""
    return sum(int((task / "schedstat").read_text().split()[0]) for task in Path(f"/proc/{pid}/task").iterdir())


def children(pid: int) -> list[int]:
    """A server process's child processes (the span exporter and the payload sender)."""
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def cpu_ns(pid: int) -> tuple[int, int]:
    """The CPU time of a server process, and of its child processes."""
    return run_ns(pid), sum(run_ns(child) for child in children(pid))


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of a process on ``cpus``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def standard_error(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def counter(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}{{{wanted}}} (\S+)$" if labels else rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--payload-format", choices=["binary", "structured", "batch"], default="binary")
    parser.add_argument(
        "--trace-ratio",
        type=float,
        default=None,
        help="sample traces with parentbased_traceidratio at this ratio (default: the SDK's, every request)",
    )
    parser.add_argument("--parts", default="traces,payloads", help="what the 'on' server turns on (comma-separated)")
    parser.add_argument(
        "--keep-servers",
        action="store_true",
        help="start each side's server once and load them in turn every round (default: fresh servers each round)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the server process on CPU 0 alone; wrk, nginx and the server's child processes on the others",
    )
    parser.add_argument("--routes", default=",".join(ROUTES), help="the routes loaded, each server serving them all")
    args = parser.parse_args()
    routes = tuple(args.routes.split(","))
    parts = set(args.parts.split(","))
    others = set(range(os.cpu_count() or 1)) - {0}
    if args.pin and not others:
        parser.error("--pin needs at least two CPUs: the server on one, the rest on the others")
    if args.pin:  # this process's children (nginx, wrk, the servers until they are pinned) inherit it
        os.sched_setaffinity(0, others)

    with tempfile.TemporaryDirectory(prefix="bench-observability-") as tmp:
        work = Path(tmp)
        (work / "body").mkdir()
        script = work / "post.lua"
        script.write_text(LUA)
        bodies = {}
        for name in routes:
            bodies[name] = work / f"{name}.json"
            bodies[name].write_text(json.dumps(get(name).predictor_class().example))
        nginx, sink = start_nginx(work)
        sides = {
            "off": {},
            "on": {
                **({"OTEL_EXPORTER_OTLP_ENDPOINT": sink} if "traces" in parts else {}),
                **(
                    {
                        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                        "OTEL_TRACES_SAMPLER_ARG": str(args.trace_ratio),
                    }
                    if args.trace_ratio is not None
                    else {}
                ),
                **(
                    {
                        "SERVE_PAYLOAD_LOG_URL": sink + "/events",
                        "SERVE_PAYLOAD_LOG_SAMPLE": "1",
                        "SERVE_PAYLOAD_LOG_FORMAT": args.payload_format,
                    }
                    if "payloads" in parts
                    else {}
                ),
            },
        }
        samples: dict[str, dict[str, list[float]]] = {side: {r: [] for r in routes} for side in sides}
        # with --keep-servers: each load's CPU µs per request, the server's and its children's
        cpu_us: dict[str, dict[str, dict[str, list[float]]]] = {
            side: {r: {"server": [], "children": []} for r in routes} for side in sides
        }
        payload_reasons = ("queue_full", "sink_error", "sender_down")  # payload_log_dropped_total's
        records = {"sent": 0.0, **{f"dropped_{reason}": 0.0 for reason in payload_reasons}, "requests": 0}
        spans = {"sent": 0.0, "dropped": 0.0}

        def load(side: str, port: int, names: tuple[str, ...] = routes, pid: int | None = None) -> None:
            for name in names:
                before = cpu_ns(pid) if pid else (0, 0)
                result = wrk(f"http://127.0.0.1:{port}/{name}", bodies[name], script, CLIENTS, args.duration)
                samples[side][name].append(result["req_per_s"])
                if pid:  # CPU per request: the server's, and its children's (the exporter's and the sender's)
                    after = cpu_ns(pid)
                    for part, spent in zip(("server", "children"), (b - a for a, b in zip(before, after)), strict=True):
                        cpu_us[side][name][part].append(round(spent / 1000 / result["requests"], 1))
                if side == "on":
                    records["requests"] += result["requests"]
                print(f"{side:>3} /{name}: {result['req_per_s']:.0f} req/s", flush=True)

        def count(port: int) -> None:
            """The "on" server's records and spans, sent and dropped, added up."""
            time.sleep(1)  # what the sender still holds goes out
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            records["sent"] += counter(text, "payload_log_sent_total")
            for reason in payload_reasons:
                records[f"dropped_{reason}"] += counter(text, "payload_log_dropped_total", reason=reason)
            spans["sent"] += counter(text, "trace_spans_sent_total")
            spans["dropped"] += sum(
                counter(text, "trace_spans_dropped_total", reason=reason)
                for reason in ("queue_full", "export_error", "sender_down")
            )

        def start(side: str) -> tuple[int, subprocess.Popen]:
            port = free_port()
            server = start_server(port, env={"SERVE_MODELS": json.dumps(list(routes)), **sides[side]})
            if args.pin:
                pin(server.pid, {0})
                for child in children(server.pid):
                    pin(child, others)
            return port, server

        def order(round_: int) -> list[str]:
            return list(sides) if round_ % 2 == 0 else list(reversed(list(sides)))

        try:
            if args.keep_servers:  # both up all along, loaded in turn: the pairs are seconds apart, not minutes
                servers = {side: start(side) for side in sides}
                try:
                    for side, (port, _) in servers.items():  # warm-up, not sampled (its records are counted)
                        for name in routes:
                            warm = wrk(f"http://127.0.0.1:{port}/{name}", bodies[name], script, CLIENTS, 2)
                            records["requests"] += warm["requests"] if side == "on" else 0
                    for round_ in range(args.rounds):
                        print(f"round {round_ + 1}", flush=True)
                        for name in routes:  # each route's pair back to back: seconds apart, not a route's length
                            for side in order(round_):
                                load(side, servers[side][0], (name,), servers[side][1].pid)
                    count(servers["on"][0])
                finally:
                    for _, server in servers.values():
                        server.terminate()
                        server.wait(60)
            else:
                for round_ in range(args.rounds):
                    print(f"round {round_ + 1}", flush=True)
                    for side in order(round_):
                        port, server = start(side)
                        try:
                            load(side, port)
                            if side == "on":
                                count(port)
                        finally:
                            server.terminate()
                            server.wait(60)
        finally:
            nginx.terminate()
            nginx.wait(10)

    medians = {side: {r: statistics.median(v) for r, v in by_route.items()} for side, by_route in samples.items()}
    ratios = {r: round(medians["on"][r] / medians["off"][r], 3) for r in routes}
    # each round's on/off, measured a minute apart at most: steadier than the ratio of medians where the machine drifts
    round_ratios = {
        r: round(statistics.median(on / off for on, off in zip(samples["on"][r], samples["off"][r], strict=True)), 3)
        for r in routes
    }
    # the geometric mean of the rounds' on/off, with its standard error: what several runs' rounds pool into
    logs = {
        r: [math.log(on / off) for on, off in zip(samples["on"][r], samples["off"][r], strict=True)] for r in routes
    }
    geometric = {
        r: [round(math.exp(statistics.mean(v)), 3), round(math.exp(statistics.mean(v)) * standard_error(v), 3)]
        for r, v in logs.items()
    }
    cpu = {
        side: {r: {part: statistics.median(v) for part, v in parts_.items() if v} for r, parts_ in by_route.items()}
        for side, by_route in cpu_us.items()
    }
    summary = {
        "command": " ".join(["python -m benchmarks.observability", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "clients": CLIENTS,
        "duration_s": args.duration,
        "pinned": args.pin,
        "on": sorted(parts),
        "payload_format": args.payload_format,
        "trace_ratio": args.trace_ratio if args.trace_ratio is not None else 1.0,
        "req_per_s": samples,
        "median_req_per_s": medians,
        "on_over_off": ratios,
        "median_round_on_over_off": round_ratios,
        "geometric_mean_round_on_over_off": geometric,
        # the median load's CPU µs per request (--keep-servers only): what traces and records cost in CPU, a figure
        # the machine's drifting speed moves less than requests a second
        "cpu_us_per_request": cpu if args.keep_servers else None,
        "cpu_us_per_request_rounds": cpu_us if args.keep_servers else None,
        "payload_records": {**records, "expected": 2 * records["requests"]},
        # four spans per request (its own, queue, batch, forward) when every request is traced
        "spans": {**spans, "requests": records["requests"]},
    }
    RESULTS.mkdir(exist_ok=True)
    ratio = "" if args.trace_ratio is None else f"-ratio{args.trace_ratio:g}"
    kept = "-kept" if args.keep_servers else ""
    pinned = "-pinned" if args.pin else ""
    some = "" if routes == ROUTES else "-" + "-".join(routes)
    name = f"observability-{'-'.join(sorted(parts))}-{args.payload_format}{ratio}{kept}{pinned}{some}.json"
    (RESULTS / name).write_text(json.dumps(summary, indent=2) + "\n")
    print(
        "\n| route | off req/s | on req/s | on / off | median round's on / off | geometric mean |"
        "\n|---|---:|---:|---:|---:|---:|"
    )
    for r in routes:
        print(
            f"| /{r} | {medians['off'][r]:.0f} | {medians['on'][r]:.0f} | {ratios[r]:.2f} | {round_ratios[r]:.2f} "
            f"| {geometric[r][0]:.3f} ± {geometric[r][1]:.3f} |"
        )
    if args.keep_servers:
        print("\nCPU µs per request (medians): server, children (exporter and sender)")
        for r in routes:
            off, on = cpu["off"][r], cpu["on"][r]
            print(f"/{r}: off {off['server']:.0f}, {off['children']:.0f} · on {on['server']:.0f}, {on['children']:.0f}")
    print(f"\npayload records (on): {json.dumps(summary['payload_records'])}")
    print(f"spans (on): {json.dumps(summary['spans'])}")


if __name__ == "__main__":
    main()
