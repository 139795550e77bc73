"""Latency while model versions are reloaded: ``/fashion`` at 64 clients with no reload, against the same
load while an admin loads a new version every ``--every`` seconds (every other one corrupted, so it is
refused while the old one keeps serving), in alternating rounds on one server (``python -m service``, its
default worker count). Goal (issue #17): p99 during reloads within 2x of p99 without.

    python -m benchmarks.versions --rounds 3 --duration 10

Prints a table and writes benchmarks/results/versions.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from tests.test_versions import add_version

from benchmarks.load import LUA, RESULTS, wait_ready, wrk
from service.catalog import get
from tests.conftest import ARTIFACTS, free_port, version_dir

MODEL = get("fashion")
ADMIN = {"X-API-Key": "bench-admin"}


def reload_loop(url: str, model_dir: Path, first: str, every: float, stop: threading.Event, log: list) -> None:
    """Add a version and load it every ``every`` seconds until ``stop``; every other one is corrupted."""
    while not stop.wait(every):
        name = f"{first}.{len(log) + 1}"
        corrupt = len(log) % 2 == 1
        add_version(model_dir, name, corrupt=corrupt, source=first)
        started = time.perf_counter()
        status = httpx.post(url + "/admin/models/fashion/load", headers=ADMIN, timeout=120).status_code
        log.append(
            {"version": name, "corrupt": corrupt, "status": status, "seconds": round(time.perf_counter() - started, 3)}
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds of each wrk run")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between reloads")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed (apt-get install wrk)")

    work = Path(tempfile.mkdtemp(prefix="bench-versions-"))
    model_dir = work / "artifacts" / MODEL.folder
    source = version_dir(ARTIFACTS / MODEL.folder)
    shutil.copytree(source, model_dir / source.name)
    script, body = work / "post.lua", work / "fashion.json"
    script.write_text(LUA)
    body.write_text(json.dumps(MODEL.predictor_class().example))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "SERVE_PORT": str(port),
        "SERVE_MODELS": '["fashion"]',
        "SERVE_LOG_LEVEL": "WARNING",
        "SERVE_ARTIFACTS_DIR": str(work / "artifacts"),
        "SERVE_ADMIN_KEYS": json.dumps([ADMIN["X-API-Key"]]),
    }
    server = wait_ready(subprocess.Popen([sys.executable, "-m", "service"], env=env), url + "/readyz")
    samples: dict[str, list[dict]] = {"steady": [], "reloading": []}
    reloads: list[dict] = []
    try:
        wrk(url + "/fashion", body, script, 64, 3)  # warm-up
        for round_ in range(args.rounds):
            for side in ("steady", "reloading") if round_ % 2 == 0 else ("reloading", "steady"):
                stop = threading.Event()
                thread = (
                    threading.Thread(target=reload_loop, args=(url, model_dir, source.name, args.every, stop, reloads))
                    if side == "reloading"
                    else None
                )
                if thread:
                    thread.start()
                samples[side].append(wrk(url + "/fashion", body, script, 64, args.duration))
                if thread:
                    stop.set()
                    thread.join()
                print(side, samples[side][-1], flush=True)
    finally:
        server.terminate()
        server.wait(60)
        shutil.rmtree(work, ignore_errors=True)

    summary = {
        side: {
            key: round(statistics.median(s[key] for s in runs), 3)
            for key in ("req_per_s", "p50_ms", "p99_ms", "errors")
        }
        for side, runs in samples.items()
    }
    summary["p99_ratio"] = round(summary["reloading"]["p99_ms"] / summary["steady"]["p99_ms"], 2)
    good = [r for r in reloads if not r["corrupt"]]
    result = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs), {platform.processor() or platform.machine()}",
        "command": "python -m benchmarks.versions " + " ".join(sys.argv[1:]),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "reload_every_s": args.every,
        "summary": summary,
        "samples": samples,
        "reloads": {
            "count": len(reloads),
            "good_200": sum(r["status"] == 200 for r in good),
            "corrupted_422": sum(r["status"] == 422 for r in reloads if r["corrupt"]),
            "good_load_seconds_median": statistics.median(r["seconds"] for r in good) if good else None,
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "versions.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n| /fashion, 64 clients | req/s | p50 ms | p99 ms | non-2xx |\n|---|---|---|---|---|")
    for side in ("steady", "reloading"):
        s = summary[side]
        print(f"| {side} | {s['req_per_s']:,.0f} | {s['p50_ms']} | {s['p99_ms']} | {s['errors']:.0f} |")
    print(f"\np99 during reloads / without: {summary['p99_ratio']}x; reloads: {result['reloads']}")


if __name__ == "__main__":
    main()
