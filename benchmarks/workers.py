"""Worker-process benchmark (issue #15): the commit before the worker processes, this tree with one worker,
this tree with its default worker count, and a bare FastAPI route doing the same fashion model call.

Each side is a fresh ``python -m service`` (the previous commit runs from a temporary ``git worktree``
with the same virtual environment); every round starts each side in turn, in an order that rotates from
round to round, and loads each route at 1 and 64 connections with ``wrk`` (a separate C process). Each
figure is the median over the rounds. Memory is the PSS of the server's processes summed, read from
``/proc/<pid>/smaps_rollup`` after the round's load. Any non-2xx answer or socket error is counted.

    python -m benchmarks.workers [--rounds 3] [--duration 3] [--previous c84aad2]

Writes benchmarks/results/workers.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.load import LUA, example, wait_ready, wrk
from service.catalog import get
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ROUTES = ("phone-price", "fashion", "house-price")
LEVELS = (1, 64)

BARE_APP = '''
"""The fashion model behind one plain FastAPI route: the same validation and predict call, no batching."""
from fastapi import FastAPI
from service.models.fashion import FashionImage, FashionPrediction
from tests.conftest import committed

predictor = committed("fashion").predictor
app = FastAPI()

@app.post("/fashion")
def fashion(item: FashionImage) -> FashionPrediction:  # sync: FastAPI runs it on its thread pool
    return predictor.run([item])[0]
'''


@contextmanager
def running(
    side: str, port: int, folder: Path, workers: int | None, settings: dict | None = None
) -> Iterator[subprocess.Popen]:
    """A fresh server for the block (``side`` "bare": the bare FastAPI route), with ``settings`` added to
    its environment; stopped when the block ends, however it ends."""
    process = start(side, port, folder, workers, settings)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(60)


def start(side: str, port: int, folder: Path, workers: int | None, settings: dict | None = None) -> subprocess.Popen:
    env = {
        **os.environ,
        "SERVE_LOG_LEVEL": "WARNING",
        "SERVE_PORT": str(port),
        "PYTHONPATH": str(folder),
        **(settings or {}),
    }
    env.pop("SERVE_WORKERS", None)
    if workers:
        env["SERVE_WORKERS"] = str(workers)
    if side == "bare":
        command = [sys.executable, "-m", "uvicorn", "bare_fashion:app", "--port", str(port), "--log-level", "warning"]
        env["PYTHONPATH"] = f"{folder}:{ROOT}"
    else:
        command = [sys.executable, "-m", "service", "--port", str(port)]
    process = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_ready(process, f"http://127.0.0.1:{port}{'/docs' if side == 'bare' else '/readyz'}")


def pss_mb(pid: int) -> float:
    """PSS of ``pid`` and its children: a page the workers share counts once across them."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    total = 0
    for p in [pid, *map(int, children)]:
        with open(f"/proc/{p}/smaps_rollup") as handle:
            total += next(int(line.split()[1]) for line in handle if line.startswith("Pss:"))
    return total / 1024


def prepare(prefix: str, commit: str, names: list[str]) -> tuple[Path, Path, dict[str, Path]]:
    """A temporary folder holding ``commit`` checked out in ``previous/`` (a git worktree: remove it when
    done), the wrk script, and each named model's example as a body file."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    previous = work / "previous"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(previous), commit], cwd=ROOT, check=True, capture_output=True
    )
    (work / "wrk.lua").write_text(LUA)
    bodies = {}
    for name in names:
        bodies[name] = work / f"{name}.json"
        bodies[name].write_text(json.dumps(example(get(name))))
    return work, previous, bodies


def medians(samples: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, dict]]:
    """Per side and cell: the median req/s and p50 over the rounds, and the errors of all of them."""
    return {
        side: {
            key: {
                "rps": statistics.median(r["requests"] / r["seconds"] for r in runs),
                "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                "errors": sum(r["errors"] for r in runs),
            }
            for key, runs in cells.items()
        }
        for side, cells in samples.items()
    }


def load_routes(
    cells: dict[str, list[dict]], side: str, port: int, routes, bodies: dict[str, Path], work: Path, duration: int
) -> None:
    """``wrk`` on each route (``model`` or ``model/noop``, with that model's body) at each level; each result
    goes to ``cells["route@level"]``."""
    for route in routes:
        for level in LEVELS:
            result = wrk(
                f"http://127.0.0.1:{port}/{route}", bodies[route.split("/")[0]], work / "wrk.lua", level, duration
            )
            cells.setdefault(f"{route}@{level}", []).append(result)
            print(side, route, level, result, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--previous", default="c84aad2", help="the commit before the worker processes")
    args = parser.parse_args()

    work, previous, bodies = prepare("bench-workers-", args.previous, list(ROUTES))
    (work / "bare_fashion.py").write_text(BARE_APP)
    sides = {
        "previous": (previous, None),
        "new, 1 worker": (ROOT, 1),
        "new, default": (ROOT, None),
        "bare FastAPI": (work, None),
    }
    samples: dict[str, dict[str, list[dict]]] = {side: {} for side in sides}
    memory: dict[str, list[float]] = {side: [] for side in sides}
    order = list(sides)
    try:
        for round_ in range(args.rounds):
            for side in order[round_ % len(order) :] + order[: round_ % len(order)]:
                folder, workers = sides[side]
                port = free_port()
                with running("bare" if side == "bare FastAPI" else side, port, folder, workers) as process:
                    load_routes(
                        samples[side],
                        side,
                        port,
                        ("fashion",) if side == "bare FastAPI" else ROUTES,
                        bodies,
                        work,
                        args.duration,
                    )
                    memory[side].append(pss_mb(process.pid))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(previous)], cwd=ROOT, capture_output=True)

    summary = medians(samples)
    for side in summary:
        summary[side]["pss_mb"] = statistics.median(memory[side])
    RESULTS.mkdir(exist_ok=True)
    out = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "previous": args.previous,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "summary": summary,
        "samples": samples,
        "pss_mb": memory,
    }
    (RESULTS / "workers.json").write_text(json.dumps(out, indent=2))
    keys = [f"{name}@{level}" for name in ROUTES for level in LEVELS]
    print("| side | " + " | ".join(f"{k} req/s (p50 ms)" for k in keys) + " | PSS MB | errors |")
    print("|---" * (len(keys) + 3) + "|")
    for side, cells in summary.items():
        row = [f"{cells[k]['rps']:.0f} ({cells[k]['p50_ms']:.2f})" if k in cells else "-" for k in keys]
        errors = sum(c["errors"] for k, c in cells.items() if k != "pss_mb")
        print(f"| {side} | " + " | ".join(row) + f" | {cells['pss_mb']:.0f} | {errors} |")


if __name__ == "__main__":
    main()
