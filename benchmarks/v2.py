"""The v2 protocol's REST routes beside the JSON routes (issue #16): the same request as
``POST /{model}`` (JSON), ``POST /v2/models/{model}/infer`` with JSON tensors, and with binary tensors
(Triton's extension: a 28x28 image as 784 bytes instead of ~3 KB of digits), for /fashion and /phone-price,
at 1 and 64 connections, with ``wrk`` against one fresh ``python -m service`` (default workers), and the same
tensors over gRPC (``SERVE_GRPC_PORT``) with Triton's ``perf_analyzer`` (C++, from the ``tritonclient`` wheel)
as the load generator. Rounds rotate the order of the forms; each figure is the median over the rounds.
After the rounds, ``perf_analyzer`` runs a short concurrency sweep (1, 4, 16, 64) on /fashion over HTTP and
gRPC, and any error fails the run. A last row loads a gRPC servicer that does no work at all
(``benchmarks/grpc_noop.py``, as many processes as the service's workers): grpcio's own ceiling here.

    python -m benchmarks.v2 [--rounds 3] [--duration 3]

perf_analyzer needs ``apt-get install libb64-0d`` and ``pip install nvidia-cuda-runtime-cu12`` (it links
libcudart even on a CPU-only machine); without it the gRPC rows and the sweep are left out, saying why.
Writes benchmarks/results/v2.json and prints a Markdown table.
"""

import argparse
import csv
import importlib.util
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.load import LUA, wrk
from benchmarks.workers import ROOT, pss_mb, running
from service.catalog import get
from tests.conftest import free_port

RESULTS = ROOT / "benchmarks" / "results"


def bodies(work: Path) -> dict[str, tuple[str, Path, dict]]:
    """(path, body file, extra env for wrk) per (model, form)."""
    out = {}
    for name in ("fashion", "phone-price"):
        example = get(name).predictor_class().example
        plain = work / f"{name}.json"
        plain.write_text(json.dumps(example))
        out[f"{name} JSON route"] = (f"/{name}", plain, {})
        if name == "fashion":
            tensors = [{"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28]}]
            data = [np.array(example["pixels"], np.uint8).tobytes()]
            json_tensors = [{**tensors[0], "data": np.array(example["pixels"]).reshape(-1).tolist()}]
        else:  # JSON: one named tensor per feature; binary: the 20 features packed in one [1, 20] tensor
            named = [{"name": k, "datatype": "FP64", "shape": [1]} for k in example]
            json_tensors = [{**t, "data": [v]} for t, v in zip(named, example.values())]
            tensors = [{"name": "features", "datatype": "FP64", "shape": [1, len(example)]}]
            data = [struct.pack(f"<{len(example)}d", *map(float, example.values()))]
        v2_json = work / f"{name}.v2.json"
        v2_json.write_text(json.dumps({"inputs": json_tensors}))
        out[f"{name} v2 JSON"] = (f"/v2/models/{name}/infer", v2_json, {})
        header = json.dumps(
            {
                "inputs": [{**t, "parameters": {"binary_data_size": len(d)}} for t, d in zip(tensors, data)],
                "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
            }
        ).encode()
        tensor = tensors[0]  # perf_analyzer's input data: the same tensor, sent as gRPC raw contents
        content = (
            np.array(example["pixels"], np.float32).reshape(-1).tolist()
            if name == "fashion"
            else [float(v) for v in example.values()]
        )
        grpc_data = work / f"{name}.pa.json"
        # perf_analyzer sends the datatype the metadata declares: pixels FP32 [1, 28, 28], features FP64 [1, 20]
        grpc_data.write_text(json.dumps({"data": [{tensor["name"]: {"content": content, "shape": tensor["shape"]}}]}))
        out[f"{name} v2 gRPC"] = (name, grpc_data, {"grpc": True})
        v2_binary = work / f"{name}.v2.bin"
        v2_binary.write_bytes(header + b"".join(data))
        out[f"{name} v2 binary"] = (
            f"/v2/models/{name}/infer",
            v2_binary,
            {"HEADER_LENGTH": str(len(header)), "CONTENT_TYPE": "application/octet-stream"},
        )
    return out


def perf_analyzer_env() -> tuple[str, dict] | str:
    """The perf_analyzer binary and its environment, or why it cannot run here."""
    binary = shutil.which("perf_analyzer") or str(Path(sys.executable).parent / "perf_analyzer")
    if not Path(binary).is_file():
        return "no perf_analyzer binary (it comes with the tritonclient wheel)"
    env = dict(os.environ)
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except ModuleNotFoundError:  # no "nvidia" package at all
        spec = None
    if spec and spec.submodule_search_locations:
        lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
        env["LD_LIBRARY_PATH"] = f"{lib}:{env.get('LD_LIBRARY_PATH', '')}"
    check = subprocess.run([binary, "--version"], capture_output=True, text=True, env=env, check=False)
    if "error while loading shared libraries" in check.stderr:
        return f"perf_analyzer cannot start: {check.stderr.strip()}"
    return binary, env


def perf_analyzer(
    pa: tuple[str, dict], protocol: str, port: int, model: str, data: Path, levels: str, window_ms: int, work: Path
) -> list[dict]:
    """One perf_analyzer run (closed loop, ``levels`` as its concurrency range); a row per level. Three
    windows of window_ms each (any spread is taken as stable: the rounds, not perf_analyzer, average)."""
    out = work / "pa.csv"
    command = [
        pa[0],
        "-m",
        model,
        "-u",
        f"127.0.0.1:{port}",
        "-i",
        protocol,
        "--concurrency-range",
        levels,
        "-p",
        str(window_ms),
        "--stability-percentage",
        "999",
        "--input-data",
        str(data),
        "-f",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=pa[1], timeout=600, check=False)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(
            f"perf_analyzer failed ({done.returncode}): {' '.join(command)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    rows = []
    for row in csv.DictReader(out.open()):
        rows.append(
            {
                "concurrency": int(row["Concurrency"]),
                "req_per_s": float(row["Inferences/Second"]),
                "p50_ms": int(row["p50 latency"]) / 1000,
                "p99_ms": int(row["p99 latency"]) / 1000,
                "errors": 0,
            }
        )  # perf_analyzer stops with an error on any failed request
    out.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-v2-"))
    (work / "wrk.lua").write_text(LUA)
    cells = bodies(work)
    pa = perf_analyzer_env()
    if isinstance(pa, str):
        print(f"no gRPC rows and no sweep: {pa}", flush=True)
        cells = {k: v for k, v in cells.items() if not v[2].get("grpc")}
    port, grpc_port, noop_port = free_port(), free_port(), free_port()
    noop = None
    if not isinstance(pa, str):  # grpcio's ceiling: a servicer that does no work, as many processes as workers
        noop = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.grpc_noop",
                "--port",
                str(noop_port),
                "--workers",
                str(len(os.sched_getaffinity(0))),
            ],
            cwd=ROOT,
            start_new_session=True,
        )
        cells["phone-price gRPC, no-op servicer (grpcio's ceiling)"] = (
            "phone-price",
            cells["phone-price v2 gRPC"][1],
            {"grpc": True, "port": noop_port},
        )
    samples: dict[str, list[dict]] = {}
    sweep: dict[str, list[dict]] = {}
    try:
        with running("this tree", port, ROOT, None, {"SERVE_GRPC_PORT": str(grpc_port)}) as process:
            keys = list(cells)
            for round_ in range(args.rounds):
                for key in keys[round_ % len(keys) :] + keys[: round_ % len(keys)]:
                    path, body, env = cells[key]
                    for level in (1, 64):
                        if env.get("grpc"):
                            (result,) = perf_analyzer(
                                pa,
                                "grpc",
                                env.get("port", grpc_port),
                                path,
                                body,
                                str(level),
                                args.duration * 1000 // 3,
                                work,
                            )
                        else:
                            result = wrk(
                                f"http://127.0.0.1:{port}{path}", body, work / "wrk.lua", level, args.duration, env
                            )
                        samples.setdefault(f"{key} @{level}", []).append(result)
                        print(key, level, result, flush=True)
            if not isinstance(pa, str):
                for protocol, at in (("http", port), ("grpc", grpc_port)):
                    sweep[protocol] = [
                        perf_analyzer(pa, protocol, at, "fashion", cells["fashion v2 gRPC"][1], str(c), 1000, work)[0]
                        for c in (1, 4, 16, 64)
                    ]
                    print("perf_analyzer sweep", protocol, sweep[protocol], flush=True)
            memory = pss_mb(process.pid)
    finally:
        if noop is not None:
            os.killpg(noop.pid, signal.SIGTERM)
    summary = {
        key: {
            "rps": statistics.median(
                r["req_per_s"] if "concurrency" in r else r["requests"] / r["seconds"] for r in runs
            ),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
        }
        for key, runs in samples.items()
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "v2.json").write_text(
        json.dumps(
            {
                "rounds": args.rounds,
                "duration_s": args.duration,
                "pss_mb": memory,
                "summary": summary,
                "samples": samples,
                "perf_analyzer_sweep": sweep or pa,
            },
            indent=2,
        )
    )
    print("| request | 1 client req/s (p50 ms) | 64 clients req/s (p50 ms) | errors |")
    print("|---|---|---|---|")
    for key in cells:
        one, many = summary[f"{key} @1"], summary[f"{key} @64"]
        print(
            f"| {key} | {one['rps']:.0f} ({one['p50_ms']:.2f}) | {many['rps']:.0f} ({many['p50_ms']:.2f}) | "
            f"{one['errors'] + many['errors']} |"
        )
    for protocol, rows in sweep.items():
        print(
            f"perf_analyzer /fashion over {protocol}: "
            + ", ".join(f"{r['concurrency']}: {r['req_per_s']:.0f} req/s (p50 {r['p50_ms']:.2f} ms)" for r in rows)
        )


if __name__ == "__main__":
    main()
