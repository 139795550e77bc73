"""Continuous batching for ``/poem`` against one poem at a time, in the same run, one worker process each.

Three sides, each a fresh ``python -m service`` (``SERVE_MODELS='["poem"]'``, ``SERVE_WORKERS=1``, its own port):

- "continuous": this tree with its default settings (a running batch of up to 64 poems, one character a step);
- "one at a time": this tree with ``SERVE_BATCHING='{"poem": {"max_batch_size": 1}}'`` (the same code, one poem
  at a time);
- "before": the code at ``--baseline-ref`` (a temporary ``git worktree``, the same virtual environment, serving
  that tree's own committed artifacts), as the product was; ``--baseline-ref ""`` leaves it out.

Every side gets ``SERVE_MAX_STREAMS=64`` (the default, 4, would refuse most of the 64 streams). Each round
measures every side in turn, one server at a time (stopped with SIGTERM before the next starts, so they never
share the cores), in an order that rotates from round to round. Per side: ``wrk`` (1 thread) posts
``{"line_num": 2, "line_length": 5}`` (unseeded: every poem differs, 24 characters) to ``POST /poem`` at 1, 8
and 64 connections after a warm-up, giving poems/s and p50/p99 latency; then 64 asyncio clients (httpx) open
``POST /poem/stream`` with the same body again and again, timing the first ``event: char`` line and reading
each stream to its end. Each figure is the median over the rounds; every round's figures are kept in the JSON.
Non-2xx answers (wrk: status >= 400 plus socket errors) are counted and must be 0.

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
from collections.abc import Iterator
from contextlib import contextmanager
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
WARM_UP_S = 2
CONTINUOUS, ONE, BEFORE = "continuous", "one at a time", "before"
SETTINGS = {CONTINUOUS: {}, ONE: {"SERVE_BATCHING": json.dumps({"poem": {"max_batch_size": 1}})}, BEFORE: {}}
# (name, numerator side, numerator figure, denominator side, denominator figure, target, "min" or "max")
RATIOS = [
    ("poems/s at 64 clients, continuous / before", CONTINUOUS, "64:req_per_s", BEFORE, "64:req_per_s", 5.0, "min"),
    ("poems/s at 64 clients, continuous / one at a time", CONTINUOUS, "64:req_per_s", ONE, "64:req_per_s", 5.0, "min"),
    (
        "poems/s, continuous at 64 clients / at 1 client",
        CONTINUOUS,
        "64:req_per_s",
        CONTINUOUS,
        "1:req_per_s",
        4.0,
        "min",
    ),
    ("p50 at 1 client, continuous / before", CONTINUOUS, "1:p50_ms", BEFORE, "1:p50_ms", 1.10, "max"),
    ("p50 at 1 client, continuous / one at a time", CONTINUOUS, "1:p50_ms", ONE, "1:p50_ms", 1.10, "max"),
]


@contextmanager
def server(folder: Path, settings: dict[str, str]) -> Iterator[str]:
    """A fresh ``python -m service`` run from ``folder`` serving the poem model alone, with ``settings`` added to
    its environment (this one's SERVE_* and OTEL_* left out); its URL for the block, stopped with SIGTERM after."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SERVE_", "OTEL_"))},
        "PYTHONPATH": str(folder),
        "SERVE_MODELS": '["poem"]',
        "SERVE_WORKERS": "1",
        "SERVE_PORT": str(port),
        "SERVE_MAX_STREAMS": str(STREAMS),
        "SERVE_LOG_LEVEL": "WARNING",
        **settings,
    }
    process = subprocess.Popen([sys.executable, "-m", "service"], cwd=folder, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url + "/readyz")
    try:
        yield url
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


async def streams(url: str, clients: int, seconds: float) -> dict:
    """``clients`` tasks opening streams one after another for ``seconds``: time to the first character
    (p50/p99 ms), streams completed per second and how the others ended."""
    firsts: list[float] = []
    ends: Counter[str] = Counter()
    refusals: dict[str, str] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(client: httpx.AsyncClient, deadline: float) -> None:
        while time.perf_counter() < deadline:
            ends[await one_stream(client, firsts, refusals)] += 1

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client, start + seconds) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {
        "streams": ends["complete"],
        "seconds": round(elapsed, 3),
        "streams_per_s": round(ends["complete"] / elapsed, 1),
        "ttfc_p50_ms": round(percentile(firsts, 50) * 1000, 3),
        "ttfc_p99_ms": round(percentile(firsts, 99) * 1000, 3),
        "errors": sum(n for end, n in ends.items() if end != "complete"),
        "ends": dict(ends),
        "refusals": refusals,
    }


def measure(url: str, body: Path, script: Path, seconds: int) -> dict:
    """One side's figures: ``wrk`` at each level (after a warm-up), then the streams."""
    warm_up = wrk(url + "/poem", body, script, 8, WARM_UP_S)
    figures = {str(level): wrk(url + "/poem", body, script, level, seconds) for level in LEVELS}
    figures["streams"] = asyncio.run(streams(url, STREAMS, seconds))
    figures["warm_up_errors"] = warm_up["errors"]
    return figures


def medians(rounds: list[dict]) -> dict:
    """Per ``cell:figure`` (``64:req_per_s``, ``streams:ttfc_p99_ms``, ...): the median over the rounds; errors
    summed instead."""
    cells = [cell for cell in rounds[0] if isinstance(rounds[0][cell], dict)]
    out = {}
    for cell in cells:
        for figure in ("req_per_s", "p50_ms", "p99_ms", "streams_per_s", "ttfc_p50_ms", "ttfc_p99_ms"):
            if figure in rounds[0][cell]:
                out[f"{cell}:{figure}"] = round(statistics.median(r[cell][figure] for r in rounds), 3)
        out[f"{cell}:errors"] = sum(r[cell]["errors"] for r in rounds)
    out["warm_up_errors"] = sum(r["warm_up_errors"] for r in rounds)
    return out


def ratios(summary: dict[str, dict], samples: dict[str, list[dict]]) -> list[dict]:
    """The ratios the targets name, from the medians, with each round's own (the sides of a round ran minutes
    apart)."""
    out = []
    for name, top, top_key, bottom, bottom_key, target, kind in RATIOS:
        if top not in summary or bottom not in summary:
            continue
        value = summary[top][top_key] / summary[bottom][bottom_key]
        per_round = [
            round(figure(a, top_key) / figure(b, bottom_key), 3) for a, b in zip(samples[top], samples[bottom])
        ]
        met = value >= target if kind == "min" else value <= target
        out.append({"ratio": name, "value": round(value, 3), "target": f"{'>=' if kind == 'min' else '<='} {target:g}"})
        out[-1].update({"met": met, "rounds": per_round})
    return out


def figure(sample: dict, key: str) -> float:
    cell, name = key.split(":")
    return sample[cell][name]


def table(summary: dict[str, dict], found: list[dict]) -> str:
    head = " | ".join(f"{c} client{'s' if c > 1 else ''} poems/s | p50 / p99 ms" for c in LEVELS)
    rows = [
        f"| side | {head} | {STREAMS} streams: first char p50 / p99 ms | streams/s | non-2xx, errors |",
        "|---|" + "---:|" * (2 * len(LEVELS) + 3),
    ]
    for side, s in summary.items():
        cells = " | ".join(
            f"{s[f'{c}:req_per_s']:.1f} | {s[f'{c}:p50_ms']:.1f} / {s[f'{c}:p99_ms']:.1f}" for c in LEVELS
        )
        errors = sum(v for k, v in s.items() if k.endswith("errors"))
        rows.append(
            f"| {side} | {cells} | {s['streams:ttfc_p50_ms']:.1f} / {s['streams:ttfc_p99_ms']:.1f} | "
            f"{s['streams:streams_per_s']:.1f} | {errors} |"
        )
    rows += ["", "| ratio (medians) | value | target | met | per round |", "|---|---:|---|---|---|"]
    for r in found:
        rows.append(
            f"| {r['ratio']} | {r['value']:.2f} | {r['target']} | {'yes' if r['met'] else 'NO'} | "
            f"{', '.join(f'{v:.2f}' for v in r['rounds'])} |"
        )
    return "\n".join(rows)


def checkout(ref: str, work: Path) -> Path:
    """``ref`` checked out in ``work/before`` (a git worktree: remove it when done)."""
    folder = work / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(folder), ref], cwd=ROOT, check=True, capture_output=True)
    return folder


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True).stdout.strip()


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
                with server(folders[side], SETTINGS[side]) as url:
                    samples[side].append(measure(url, body, script, args.duration))
                summary_line = {c: samples[side][-1][str(c)]["req_per_s"] for c in LEVELS}
                streams_ = samples[side][-1]["streams"]
                print(
                    f"round {round_ + 1} {side}: poems/s {summary_line}, first char p50 {streams_['ttfc_p50_ms']:.1f} "
                    f"ms, p99 {streams_['ttfc_p99_ms']:.1f} ms",
                    flush=True,
                )
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
        "settings": {side: {"SERVE_MAX_STREAMS": str(STREAMS), **SETTINGS[side]} for side in folders},
        "medians": summary,
        "ratios": found,
        "samples": samples,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generation.json").write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(table(summary, found))


if __name__ == "__main__":
    main()
