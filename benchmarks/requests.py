"""Cheaper requests (issue #15, item 3): the cost of the request path itself, this tree against an earlier
commit, on the no-op routes (the same schema and validation, no model) and the model routes.

Both sides are one worker process (``SERVE_WORKERS=1``, so the figures are one event loop's) with the
no-op routes on; the earlier commit runs from a temporary ``git worktree`` with the same virtual
environment. Every round starts each side in turn, in an order that alternates from round to round, and
loads each route at 1 and 64 connections with ``wrk``; each figure is the median over the rounds.

    python -m benchmarks.requests [--rounds 3] [--duration 3] [--previous 84ae355] [--out requests.json]

Writes benchmarks/results/requests.json (or --out) and prints a Markdown table with the ratio this tree / earlier.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess

from benchmarks.workers import RESULTS, ROOT, load_routes, medians, prepare, running
from tests.conftest import free_port

ROUTES = ("fashion/noop", "fashion", "phone-price/noop", "phone-price")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--previous", default="84ae355", help="the commit to compare with")
    parser.add_argument("--out", default="requests.json", help="the results file, in benchmarks/results/")
    args = parser.parse_args()

    work, previous, bodies = prepare("bench-requests-", args.previous, sorted({r.split("/")[0] for r in ROUTES}))
    sides = {"earlier": previous, "this tree": ROOT}
    samples: dict[str, dict[str, list[dict]]] = {side: {} for side in sides}
    try:
        for round_ in range(args.rounds):
            for side in list(sides)[:: 1 if round_ % 2 == 0 else -1]:
                port = free_port()
                with running(side, port, sides[side], 1, {"SERVE_BENCHMARK_ROUTES": "true"}):
                    load_routes(samples[side], side, port, ROUTES, bodies, work, args.duration)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(previous)], cwd=ROOT, capture_output=True)

    summary = medians(samples)
    RESULTS.mkdir(exist_ok=True)
    out = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "previous": args.previous,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "summary": summary,
        "samples": samples,
    }
    (RESULTS / args.out).write_text(json.dumps(out, indent=2))
    print(f"| route | clients | earlier ({args.previous}) req/s (p50 ms) | this tree | ratio | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    for key in summary["earlier"]:
        before, after = summary["earlier"][key], summary["this tree"][key]
        route, level = key.split("@")
        print(
            f"| /{route} | {level} | {before['rps']:.0f} ({before['p50_ms']:.2f}) | {after['rps']:.0f} "
            f"({after['p50_ms']:.2f}) | {after['rps'] / before['rps']:.2f}x | {before['errors'] + after['errors']} |"
        )


if __name__ == "__main__":
    main()
