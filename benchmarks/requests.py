"""Cheaper requests (issue #15, item 3): the cost of the request path itself, this tree against an earlier
commit, on the no-op routes (the same schema and validation, no model) and the model routes.

Both sides are one worker process (``SERVE_WORKERS=1``, so the figures are one event loop's) with the
no-op routes on; the earlier commit runs from a temporary ``git worktree`` with the same virtual
environment. Every round starts each side in turn, in an order that alternates from round to round, and
loads each route at 1 and 64 connections with ``wrk``; each figure is the median over the rounds.

    python -m benchmarks.requests [--rounds 3] [--duration 3] [--previous 84ae355]

Writes benchmarks/results/requests.json and prints a Markdown table with the ratio this tree / earlier.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchmarks.load import LUA, example, wrk
from benchmarks.workers import RESULTS, ROOT, start
from service.catalog import get
from tests.conftest import free_port

ROUTES = ("fashion/noop", "fashion", "phone-price/noop", "phone-price")
LEVELS = (1, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--previous", default="84ae355", help="the commit to compare with")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-requests-"))
    previous = work / "previous"
    subprocess.run(["git", "worktree", "add", "--detach", str(previous), args.previous], cwd=ROOT, check=True,
                   capture_output=True)
    (work / "wrk.lua").write_text(LUA)
    bodies = {}
    for route in ROUTES:
        name = route.split("/")[0]
        bodies[name] = work / f"{name}.json"
        bodies[name].write_text(json.dumps(example(get(name))))
    sides = {"earlier": previous, "this tree": ROOT}
    samples: dict[str, dict[str, list[dict]]] = {side: {} for side in sides}
    os.environ["SERVE_BENCHMARK_ROUTES"] = "true"
    try:
        for round_ in range(args.rounds):
            for side in list(sides)[::1 if round_ % 2 == 0 else -1]:
                port = free_port()
                process = start(side, port, sides[side], 1)
                try:
                    for route in ROUTES:
                        for level in LEVELS:
                            result = wrk(f"http://127.0.0.1:{port}/{route}", bodies[route.split("/")[0]],
                                         work / "wrk.lua", level, args.duration)
                            samples[side].setdefault(f"/{route}@{level}", []).append(result)
                            print(side, route, level, result, flush=True)
                finally:
                    process.terminate()
                    process.wait(60)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(previous)], cwd=ROOT, capture_output=True)

    summary = {side: {key: {"rps": statistics.median(r["requests"] / r["seconds"] for r in runs),
                            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                            "errors": sum(r["errors"] for r in runs)}
                      for key, runs in cells.items()} for side, cells in samples.items()}
    RESULTS.mkdir(exist_ok=True)
    out = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "previous": args.previous, "rounds": args.rounds,
           "duration_s": args.duration, "summary": summary, "samples": samples}
    (RESULTS / "requests.json").write_text(json.dumps(out, indent=2))
    print(f"| route | clients | earlier ({args.previous}) req/s (p50 ms) | this tree | ratio | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    for key in summary["earlier"]:
        before, after = summary["earlier"][key], summary["this tree"][key]
        route, level = key.split("@")
        print(f"| {route} | {level} | {before['rps']:.0f} ({before['p50_ms']:.2f}) | {after['rps']:.0f} "
              f"({after['p50_ms']:.2f}) | {after['rps'] / before['rps']:.2f}x | {before['errors'] + after['errors']} |")


if __name__ == "__main__":
    main()
