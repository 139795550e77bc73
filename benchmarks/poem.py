"""Poem latency: whole 4-row, 7-character poems through HTTP, one request at a time, against a real server.

Sends ``--requests`` sequential POST /poem requests with random seeds (after a few warm-up ones) and,
for comparison, times the same poems through ``predict`` in-process and the first event of
POST /poem/stream (time to first character). Then the same for regulated verse (``meter: "regulated"``,
the default classic strictness, pattern at random: issue #18) on the same server in the same run.

    python -m benchmarks.poem [--requests 100]

Prints median/p95 and writes benchmarks/results/poem.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time

import httpx
import torch

from benchmarks.load import RESULTS, start_server
from service import catalog
from service.models.poem import MAX_SEED, PoemRequest
from service.runtime.registry import open_model
from service.settings import Settings

BODY = {"line_num": 4, "line_length": 7, "rhyme": True, "temperature": 0.8, "top_k": 0}
REGULATED = {**BODY, "meter": "regulated"}
TARGET_MS = 80.0
REGULATED_TARGET_MS = 60.0


def summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 2),
        "p95_ms": round(ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))], 2),
        "min_ms": round(ms[0], 2),
        "max_ms": round(ms[-1], 2),
    }


def over_http(url: str, seeds: list[int], bodies: list[dict]) -> list[tuple[dict, dict]]:
    """Per body: (POST /poem latency, POST /poem/stream time to the first character event). The bodies take
    turns request by request, so a busier moment of the machine weighs on each alike."""
    whole: list[list[float]] = [[] for _ in bodies]
    first: list[list[float]] = [[] for _ in bodies]
    with httpx.Client(base_url=url, timeout=30) as client:
        for seed in seeds[:5]:  # warm-up: first calls pay for lazy initialisation
            for body in bodies:
                client.post("/poem", json=dict(body, seed=seed)).raise_for_status()
        for seed in seeds:
            for times, body in zip(whole, bodies):
                start = time.perf_counter()
                response = client.post("/poem", json=dict(body, seed=seed))
                times.append(time.perf_counter() - start)
                response.raise_for_status()
        for seed in seeds[:20]:
            for times, body in zip(first, bodies):
                start = time.perf_counter()
                with client.stream("POST", "/poem/stream", json=dict(body, seed=seed)) as response:
                    response.raise_for_status()
                    lines = response.iter_lines()
                    next(lines)
                    times.append(time.perf_counter() - start)
                    for _ in lines:  # drain the rest of the poem before the next request
                        pass
    return [(summary(w), summary(f)) for w, f in zip(whole, first)]


def in_process(seeds: list[int], bodies: list[dict]) -> list[dict]:
    """The same poems through predict() alone: the model's share of the HTTP latency (bodies taking turns)."""
    predictor = open_model(catalog.get("poem"), Settings().artifacts_dir).predictor
    torch.set_num_threads(predictor.threads or torch.get_num_threads())  # as on the model's worker thread
    times: list[list[float]] = [[] for _ in bodies]
    for seed in seeds:
        for spent, body in zip(times, bodies):
            start = time.perf_counter()
            predictor.run([PoemRequest(**body, seed=seed)])
            spent.append(time.perf_counter() - start)
    return [summary(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    rng = random.Random()
    seeds = [rng.randrange(MAX_SEED + 1) for _ in range(args.requests)]

    server = start_server(args.port, {"max_batch_size": 64})
    try:
        (http, first_char), (regulated, regulated_first) = over_http(
            f"http://127.0.0.1:{args.port}", seeds, [BODY, REGULATED]
        )
    finally:
        server.terminate()
        server.wait(30)
    threads = torch.get_num_threads()  # before in_process sets the worker's count
    local, local_regulated = in_process(seeds, [BODY, REGULATED])
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": threads,
        },
        "request": BODY,
        "sequential_requests": args.requests,
        "target_median_ms": TARGET_MS,
        "http_poem": http,
        "http_stream_first_char": first_char,
        "in_process_predict": local,
        "regulated_request": REGULATED,
        "regulated_target_median_ms": REGULATED_TARGET_MS,
        "http_poem_regulated": regulated,
        "http_stream_first_char_regulated": regulated_first,
        "in_process_predict_regulated": local_regulated,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "poem.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    verdict = "meets" if http["median_ms"] < TARGET_MS else "MISSES"
    print(
        f"POST /poem, 4 rows x 7 characters: median {http['median_ms']} ms, p95 {http['p95_ms']} ms "
        f"({verdict} the {TARGET_MS:.0f} ms target); in-process median {results['in_process_predict']['median_ms']} ms"
    )
    verdict = "meets" if regulated["median_ms"] < REGULATED_TARGET_MS else "MISSES"
    print(
        f'regulated (meter "regulated"), same run: median {regulated["median_ms"]} ms, '
        f"p95 {regulated['p95_ms']} ms "
        f"({verdict} the {REGULATED_TARGET_MS:.0f} ms target); in-process median "
        f"{results['in_process_predict_regulated']['median_ms']} ms"
    )


if __name__ == "__main__":
    main()
