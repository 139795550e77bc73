"""Continuous batching for ``/poem`` against one poem at a time, in the same run, one worker process each.

Three sides, each a fresh ``python -m service`` (``SERVE_MODELS='["poem"]'``, ``SERVE_WORKERS=1``, its own port):

- "continuous": this tree with its default settings (a running batch of up to 64 poems, one character a step);
- "one at a time": this tree with ``SERVE_BATCHING='{"poem": {"max_batch_size": 1}}'`` (the same code, one poem
  at a time);
- "before": the code at ``--baseline-ref`` (a temporary ``git worktree``, the same virtual environment, serving
  that tree's own committed artifacts), as the product was; ``--baseline-ref ""`` leaves it out.

Every side gets ``SERVE_MAX_STREAMS=128``: the baseline's default, 4, would refuse most of 64 streams, and at
exactly 64 a client that reopens at once can be refused too (see MAX_STREAMS). Each round measures every side in
turn, one server at a time (stopped with SIGTERM before the next starts, so they never share the cores), in an
order that rotates from round to round. Per side: ``wrk`` (1 thread) posts ``{"line_num": 2, "line_length": 5}``
(unseeded: every poem differs, 24 characters) to ``POST /poem`` at 1, 8 and 64 connections after a warm-up,
giving poems/s and p50/p99 latency; then 64 asyncio clients (httpx) open ``POST /poem/stream`` with the same
body again and again, timing the first ``event: char`` line and reading each stream to its end. For each of
those the server's mean items per forward pass (``model_batch_size``: rows per step for the continuous batcher)
and its CPU time are read before and after, and the streams' client reports its own CPU time (it shares the 2
cores with the server). Each figure is the median over the rounds; every round's figures are kept in the JSON.
Non-2xx answers are counted (wrk: status >= 400, plus socket errors; the streams: any non-2xx status, an
unfinished stream, a transport error) and must be 0.

    python -m benchmarks.generation [--rounds 2] [--duration 8] [--baseline-ref a0a2af9]

Writes benchmarks/results/generation.json and prints a Markdown table with the ratios the targets name.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx
import torch

from benchmarks.load import LUA, wait_ready, wrk
from benchmarks.observability import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BODY = {"line_num": 2, "line_length": 5}
LEVELS = (1, 8, 64)
STREAMS = 64
# The server frees a stream's place once its response has ended, a moment after the client has read the last
# event: a client reopening at once can find all 64 still taken (503). Room for those (the client holds 64 at most).
MAX_STREAMS = 2 * STREAMS
WARM_UP_S = 2
FIGURES = (
    *("req_per_s", "p50_ms", "p99_ms", "streams_per_s", "ttfc_p50_ms", "ttfc_p99_ms"),
    *("items_per_pass", "server_cpu_share", "client_cpu_share"),
)
CONTINUOUS, ONE, BEFORE = "continuous", "one at a time", "before"
SETTINGS = {CONTINUOUS: {}, ONE: {"SERVE_BATCHING": json.dumps({"poem": {"max_batch_size": 1}})}, BEFORE: {}}
# The ratios the targets name: (what, numerator, denominator, at least or at most, target); each side's figure
# as (side, "cell:figure") in its medians.
RATIOS = [
    ("poems/s at 64 clients, continuous / before", (CONTINUOUS, "64:req_per_s"), (BEFORE, "64:req_per_s"), ">=", 5),
    ("poems/s at 64 clients, continuous / one at a time", (CONTINUOUS, "64:req_per_s"), (ONE, "64:req_per_s"), ">=", 5),
    ("poems/s, continuous, 64 clients / 1 client", (CONTINUOUS, "64:req_per_s"), (CONTINUOUS, "1:req_per_s"), ">=", 4),
    ("p50 at 1 client, continuous / before", (CONTINUOUS, "1:p50_ms"), (BEFORE, "1:p50_ms"), "<=", 1.1),
    ("p50 at 1 client, continuous / one at a time", (CONTINUOUS, "1:p50_ms"), (ONE, "1:p50_ms"), "<=", 1.1),
]


@contextmanager
def server(folder: Path, settings: dict[str, str]) -> Iterator[tuple[str, int]]:
    """A fresh ``python -m service`` run from ``folder`` serving the poem model alone, with ``settings`` added to
    its environment (this one's SERVE_* and OTEL_* left out); its URL and process id (one worker: uvicorn runs in
    that process) for the block, stopped with SIGTERM after."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SERVE_", "OTEL_"))},
        "PYTHONPATH": str(folder),
        "SERVE_MODELS": '["poem"]',
        "SERVE_WORKERS": "1",
        "SERVE_PORT": str(port),
        "SERVE_MAX_STREAMS": str(MAX_STREAMS),
        "SERVE_LOG_LEVEL": "WARNING",
        **settings,
    }
    process = subprocess.Popen([sys.executable, "-m", "service"], cwd=folder, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url + "/readyz")
    try:
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 when there are no values)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else 0.0


async def one_stream(client: httpx.AsyncClient, firsts: list[float], refusals: dict[str, str]) -> str:
    """One ``POST /poem/stream`` read to its end; the time to its first ``event: char`` line goes to ``firsts``.
    Returns how it ended: "complete" (the whole poem came last), "incomplete", "status <code>" (a non-2xx answer,
    its first body kept in ``refusals``) or "transport_error"."""
    start, last = time.perf_counter(), None
    try:
        async with client.stream("POST", "/poem/stream", json=BODY) as response:
            if not 200 <= response.status_code < 300:
                refusals.setdefault(str(response.status_code), (await response.aread()).decode(errors="replace"))
                return f"status {response.status_code}"
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    if last is None and line == "event: char":
                        firsts.append(time.perf_counter() - start)
                    last = line[len("event: ") :]
    except httpx.HTTPError:
        return "transport_error"
    return "complete" if last == "poem" else "incomplete"


async def streams(url: str, tasks: int, seconds: float) -> dict:
    """``tasks`` clients opening streams one after another for ``seconds``: time to the first character
    (p50/p99 ms), streams completed per second, how the others ended, and the CPU this client took."""
    firsts: list[float] = []
    ends: Counter[str] = Counter()
    refusals: dict[str, str] = {}
    limits = httpx.Limits(max_connections=tasks, max_keepalive_connections=tasks)

    async def client_loop(client: httpx.AsyncClient, deadline: float) -> None:
        while time.perf_counter() < deadline:
            ends[await one_stream(client, firsts, refusals)] += 1

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client_loop(client, start + seconds) for _ in range(tasks)))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "streams": ends["complete"],
        "seconds": round(elapsed, 3),
        "streams_per_s": round(ends["complete"] / elapsed, 1),
        "ttfc_p50_ms": round(percentile(firsts, 50) * 1000, 3),
        "ttfc_p99_ms": round(percentile(firsts, 99) * 1000, 3),
        "client_cpu_share": round(cpu / elapsed, 2),  # of one core: how busy this Python client was
        "errors": sum(n for end, n in ends.items() if end != "complete"),
        "ends": dict(ends),
        "refusals": refusals,
    }


def measure(url: str, pid: int, body: Path, script: Path, seconds: int) -> dict:
    """One side's figures: ``wrk`` at each level (after a warm-up), then the streams; each with what the server
    did meanwhile (:func:`observed`)."""
    warm_up = wrk(url + "/poem", body, script, 8, WARM_UP_S)
    post = partial(wrk, url + "/poem", body, script)
    figures = {str(level): observed(url, pid, partial(post, level, seconds)) for level in LEVELS}
    figures["streams"] = observed(url, pid, lambda: asyncio.run(streams(url, STREAMS, seconds)))
    figures["warm_up_errors"] = warm_up["errors"]
    return figures


def observed(url: str, pid: int, run: Callable[[], dict]) -> dict:
    """``run()``'s figures plus, over the time it ran, the server's ``items_per_pass`` (the mean of its
    ``model_batch_size`` histogram: items per forward pass; for the continuous batcher, rows per step) and
    ``server_cpu_share`` (the CPU time of process ``pid`` over the wall time, in cores)."""
    (total, count), cpu, start = passes(url), cpu_seconds(pid), time.perf_counter()
    figures = run()
    figures["server_cpu_share"] = round((cpu_seconds(pid) - cpu) / (time.perf_counter() - start), 2)
    total_after, count_after = passes(url)
    figures["items_per_pass"] = round((total_after - total) / (count_after - count), 2) if count_after > count else None
    return figures


def passes(url: str) -> tuple[float, float]:
    """The server's ``model_batch_size`` histogram: (sum, count)."""
    totals = {"sum": 0.0, "count": 0.0}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        for kind in totals:
            if name.startswith(f"model_batch_size_{kind}{{"):
                totals[kind] += float(value)
    return totals["sum"], totals["count"]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def medians(rounds: list[dict]) -> dict:
    """Per ``cell:figure`` (``64:req_per_s``, ``streams:ttfc_p99_ms``, ...): the median over the rounds; errors
    summed instead."""
    cells = [cell for cell in rounds[0] if isinstance(rounds[0][cell], dict)]
    out = {}
    for cell in cells:
        for figure in FIGURES:
            values = [r[cell].get(figure) for r in rounds]
            if None not in values:
                out[f"{cell}:{figure}"] = round(statistics.median(values), 3)
        out[f"{cell}:errors"] = sum(r[cell]["errors"] for r in rounds)
    out["warm_up_errors"] = sum(r["warm_up_errors"] for r in rounds)
    return out


def ratios(summary: dict[str, dict], samples: dict[str, list[dict]]) -> list[dict]:
    """The ratios the targets name, of the medians, with each round's own beside them."""
    out = []
    for name, (top, top_key), (bottom, bottom_key), bound, target in RATIOS:
        if top in summary and bottom in summary:
            value = summary[top][top_key] / summary[bottom][bottom_key]
            rounds = [figure(a, top_key) / figure(b, bottom_key) for a, b in zip(samples[top], samples[bottom])]
            out.append(
                {
                    "ratio": name,
                    "value": round(value, 3),
                    "target": f"{bound} {target:g}",
                    "met": value >= target if bound == ">=" else value <= target,
                    "rounds": [round(r, 3) for r in rounds],
                }
            )
    return out


def figure(sample: dict, key: str) -> float:
    """``key`` ("cell:figure") of one round's sample."""
    cell, name = key.split(":")
    return sample[cell][name]


def table(summary: dict[str, dict], found: list[dict]) -> str:
    """The medians (poems/s and latency; what the server and the streams' client did meanwhile) and the ratios."""
    return "\n\n".join([figures_table(summary), server_table(summary), ratios_table(found)])


def figures_table(summary: dict[str, dict]) -> str:
    head = " | ".join(f"{clients(c)} poems/s | p50 / p99 ms" for c in LEVELS)
    rows = [
        f"| side | {head} | {STREAMS} streams: first char p50 / p99 ms | streams/s | non-2xx, errors |",
        "|---|" + "---:|" * (2 * len(LEVELS) + 3),
    ]
    for side, s in summary.items():
        cells = [f"{s[f'{c}:req_per_s']:.1f} | {s[f'{c}:p50_ms']:.1f} / {s[f'{c}:p99_ms']:.1f}" for c in LEVELS]
        errors = sum(v for k, v in s.items() if k.endswith("errors"))
        first = f"{s['streams:ttfc_p50_ms']:.1f} / {s['streams:ttfc_p99_ms']:.1f}"
        rows.append(f"| {side} | {' | '.join(cells)} | {first} | {s['streams:streams_per_s']:.1f} | {errors} |")
    return "\n".join(rows)


def server_table(summary: dict[str, dict]) -> str:
    head = " | ".join(clients(c) for c in LEVELS)
    rows = [
        f"| side: items per forward pass, server CPU (cores) | {head} | {STREAMS} streams | streams' client CPU |",
        "|---|" + "---:|" * (len(LEVELS) + 2),
    ]
    for side, s in summary.items():
        cells = [f"{s.get(f'{c}:items_per_pass')}, {s[f'{c}:server_cpu_share']:.2f}" for c in [*LEVELS, "streams"]]
        rows.append(f"| {side} | {' | '.join(cells)} | {s['streams:client_cpu_share']:.2f} |")
    return "\n".join(rows)


def ratios_table(found: list[dict]) -> str:
    rows = ["| ratio (medians) | value | target | met | per round |", "|---|---:|---|---|---|"]
    for r in found:
        met, rounds = "yes" if r["met"] else "NO", ", ".join(f"{v:.2f}" for v in r["rounds"])
        rows.append(f"| {r['ratio']} | {r['value']:.2f} | {r['target']} | {met} | {rounds} |")
    return "\n".join(rows)


def clients(level: int) -> str:
    return f"{level} client{'s' if level > 1 else ''}"


def checkout(ref: str, work: Path) -> Path:
    """``ref`` checked out in ``work/before`` (a git worktree: remove it when done)."""
    folder = work / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(folder), ref], cwd=ROOT, check=True, capture_output=True)
    return folder


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def progress(round_: int, side: str, sample: dict) -> None:
    poems = {level: sample[str(level)]["req_per_s"] for level in LEVELS}
    first = sample["streams"]
    print(
        f"round {round_ + 1} {side}: poems/s {poems}, first char p50 {first['ttfc_p50_ms']:.1f} ms, "
        f"p99 {first['ttfc_p99_ms']:.1f} ms, {first['errors'] + sum(sample[str(c)]['errors'] for c in LEVELS)} errors",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run and of the streams")
    parser.add_argument("--baseline-ref", default="a0a2af9", help='the code before continuous batching ("": none)')
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")

    work = Path(tempfile.mkdtemp(prefix="bench-generation-"))
    body, script = work / "poem.json", work / "post.lua"
    body.write_text(json.dumps(BODY))
    script.write_text(LUA)
    folders = {CONTINUOUS: ROOT, ONE: ROOT}
    if args.baseline_ref:
        folders[BEFORE] = checkout(args.baseline_ref, work)
    samples: dict[str, list[dict]] = {side: [] for side in folders}
    order = list(folders)
    try:
        for round_ in range(args.rounds):
            for side in order[round_ % len(order) :] + order[: round_ % len(order)]:
                with server(folders[side], SETTINGS[side]) as (url, pid):
                    samples[side].append(measure(url, pid, body, script, args.duration))
                progress(round_, side, samples[side][-1])
    finally:
        if BEFORE in folders:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(folders[BEFORE])], cwd=ROOT, capture_output=True
            )
        shutil.rmtree(work, ignore_errors=True)

    summary = {side: medians(runs) for side, runs in samples.items()}
    found = ratios(summary, samples)
    out = {
        "command": " ".join(["python -m benchmarks.generation", *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "commit": git("rev-parse", "HEAD"),
        "baseline_ref": args.baseline_ref,
        "baseline_commit": git("rev-parse", args.baseline_ref) if args.baseline_ref else None,
        "body": BODY,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "settings": {side: {"SERVE_MAX_STREAMS": str(MAX_STREAMS), **SETTINGS[side]} for side in folders},
        "medians": summary,
        "ratios": found,
        "samples": samples,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generation.json").write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(table(summary, found))


if __name__ == "__main__":
    main()
