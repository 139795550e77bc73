"""What shadow traffic costs the callers: ``/phone-price`` and ``/fashion`` latency with every request mirrored
to a second version (share 1.0) against no shadow, in the same run, on ``python -m service`` with two workers.

The second version is the committed one copied under another version name (its manifest re-written, so its
hashes check): the same answers, the same work. Each round starts one server, measures without a shadow, turns
shadowing on through the admin API, measures again (and the other way round every other round); ``wrk`` loads
each route at ``--clients`` connections.

    python -m benchmarks.shadow [--rounds 3] [--duration 5] [--clients 8]

Writes benchmarks/results/shadow.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.load import LUA, wrk
from benchmarks.observability import free_port
from service.artifacts import MANIFEST, version_folders, write_artifact
from service.catalog import get
from service.settings import PROJECT_ROOT

RESULTS = Path(__file__).parent / "results"
ROUTES = ("phone-price", "fashion")
SHADOW = "2099.01.01.000000"
ADMIN = {"X-API-Key": "bench-admin"}


def with_second_version(target: Path) -> None:
    """A copy of the committed artifacts with each benchmarked model's version also under the name SHADOW."""
    for name in ROUTES:
        folder = get(name).folder
        (source,) = version_folders(PROJECT_ROOT / "artifacts" / folder).values()
        for version in (source.name, SHADOW):
            shutil.copytree(source, target / folder / version)
        copy = target / folder / SHADOW
        manifest = json.loads((copy / MANIFEST).read_text())
        (copy / MANIFEST).unlink()
        write_artifact(
            copy,
            name=manifest["name"],
            hyperparameters=manifest["hyperparameters"],
            metrics=manifest["metrics"],
            metrics_method=manifest["metrics_method"],
            data_files=[],
            extra=manifest["extra"],
            version=SHADOW,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--share", type=float, default=1.0, help="the share of requests offered for mirroring")
    args = parser.parse_args()
    shadowed = f"shadow {args.share:g}"
    samples: dict[str, dict[str, list[dict]]] = {side: {r: [] for r in ROUTES} for side in ("no shadow", shadowed)}
    agreement: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with_second_version(work / "artifacts")
        script = work / "post.lua"
        script.write_text(LUA)
        bodies = {}
        for name in ROUTES:
            bodies[name] = work / f"{name}.json"
            bodies[name].write_text(json.dumps(get(name).predictor_class().example))
        for round_ in range(args.rounds):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            env = {
                **os.environ,
                "SERVE_WORKERS": "2",
                "SERVE_PORT": str(port),
                "SERVE_MODELS": json.dumps(list(ROUTES)),
                "SERVE_ARTIFACTS_DIR": str(work / "artifacts"),
                "SERVE_MODEL_VERSIONS": json.dumps(
                    {
                        n: next(v for v in version_folders(work / "artifacts" / get(n).folder) if v != SHADOW)
                        for n in ROUTES
                    }
                ),
                "SERVE_ADMIN_KEYS": '["bench-admin"]',
                "SERVE_LOG_LEVEL": "WARNING",
            }
            server = subprocess.Popen([sys.executable, "-m", "service"], env=env)
            try:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    try:
                        if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.3)
                time.sleep(1)
                order = ["no shadow", shadowed] if round_ % 2 == 0 else [shadowed, "no shadow"]
                for side in order:
                    for name in ROUTES:
                        spec = {"version": SHADOW, "share": args.share} if side == shadowed else {"version": None}
                        answer = httpx.put(f"{url}/admin/models/{name}/shadow", json=spec, headers=ADMIN, timeout=120)
                        answer.raise_for_status()
                    for name in ROUTES:
                        result = wrk(f"{url}/{name}", bodies[name], script, args.clients, args.duration)
                        samples[side][name].append(result)
                        print(f"round {round_ + 1} {side} /{name}: p50 {result['p50_ms']} p99 {result['p99_ms']} ms")
                workers = httpx.get(f"{url}/admin/models", headers=ADMIN).json()["workers"]
                agreement.append({w["pid"]: {n: w["models"][n]["shadow"] for n in ROUTES} for w in workers})
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(60)

    table = {
        side: {
            name: {f: statistics.median(s[f] for s in runs) for f in ("req_per_s", "p50_ms", "p99_ms")}
            for name, runs in routes.items()
        }
        for side, routes in samples.items()
    }
    summary = {
        "command": " ".join(["python -m benchmarks.shadow", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "clients": args.clients,
        "medians": table,
        "rounds": samples,
        "shadow_status": agreement,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shadow.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n| route | shadow | req/s | p50 ms | p99 ms |\n|---|---|---:|---:|---:|")
    for name in ROUTES:
        for side in samples:
            t = table[side][name]
            print(f"| /{name} | {side} | {t['req_per_s']:.0f} | {t['p50_ms']:.2f} | {t['p99_ms']:.2f} |")


if __name__ == "__main__":
    main()
