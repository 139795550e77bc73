"""The v2 protocol's REST routes beside the JSON routes (issue #16): the same request as
``POST /{model}`` (JSON), ``POST /v2/models/{model}/infer`` with JSON tensors, and with binary tensors
(Triton's extension: a 28x28 image as 784 bytes instead of ~3 KB of digits), for /fashion and /phone-price,
at 1 and 64 connections, with ``wrk`` against one fresh ``python -m service`` (default workers). Rounds
rotate the order of the three forms; each figure is the median over the rounds.

    python -m benchmarks.v2 [--rounds 3] [--duration 3]

Writes benchmarks/results/v2.json and prints a Markdown table.
"""

import argparse
import json
import statistics
import struct
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.load import LUA, wrk
from benchmarks.workers import ROOT, pss_mb, start
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
        header = json.dumps({"inputs": [{**t, "parameters": {"binary_data_size": len(d)}} for t, d in zip(tensors, data)],
                             "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
        v2_binary = work / f"{name}.v2.bin"
        v2_binary.write_bytes(header + b"".join(data))
        out[f"{name} v2 binary"] = (f"/v2/models/{name}/infer", v2_binary,
                                    {"HEADER_LENGTH": str(len(header)), "CONTENT_TYPE": "application/octet-stream"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-v2-"))
    (work / "wrk.lua").write_text(LUA)
    cells = bodies(work)
    port = free_port()
    process = start("this tree", port, ROOT, None)
    samples: dict[str, list[dict]] = {}
    try:
        keys = list(cells)
        for round_ in range(args.rounds):
            for key in keys[round_ % len(keys):] + keys[:round_ % len(keys)]:
                path, body, env = cells[key]
                for level in (1, 64):
                    result = wrk(f"http://127.0.0.1:{port}{path}", body, work / "wrk.lua", level, args.duration, env)
                    samples.setdefault(f"{key} @{level}", []).append(result)
                    print(key, level, result, flush=True)
        memory = pss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(60)
    summary = {key: {"rps": statistics.median(r["requests"] / r["seconds"] for r in runs),
                     "p50_ms": statistics.median(r["p50_ms"] for r in runs), "errors": sum(r["errors"] for r in runs)}
               for key, runs in samples.items()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "v2.json").write_text(json.dumps({"rounds": args.rounds, "duration_s": args.duration, "pss_mb": memory,
                                                 "summary": summary, "samples": samples}, indent=2))
    print("| request | 1 client req/s (p50 ms) | 64 clients req/s (p50 ms) | errors |")
    print("|---|---|---|---|")
    for key in cells:
        one, many = summary[f"{key} @1"], summary[f"{key} @64"]
        print(f"| {key} | {one['rps']:.0f} ({one['p50_ms']:.2f}) | {many['rps']:.0f} ({many['p50_ms']:.2f}) | "
              f"{one['errors'] + many['errors']} |")


if __name__ == "__main__":
    main()
