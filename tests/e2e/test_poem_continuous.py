"""Continuous batching end to end, against ``python -m service`` (two workers, gRPC on): 100 seeded poems asked
one at a time, then asked again by 64 concurrent clients among unseeded and regulated ones, through /poem,
/poem/stream, /poem/batch, v2 REST and gRPC, are byte-identical; and the poems did share steps."""

from __future__ import annotations

import asyncio
import json
import random
import signal

import httpx
import numpy as np
import pytest

from tests.conftest import free_port, start_workers
from tests.unit.test_runtime_api import _metric

KINDS = [
    {},
    {"line_num": 4, "line_length": 7, "top_k": 30},
    {"meter": "regulated", "line_num": 2},
    {"meter": "regulated", "line_num": 4, "line_length": 7},
    {"acrostic": "江山如画", "temperature": 1.1},
]
V2_TYPES = {"BYTES": str, "INT64": int, "FP64": float, "BOOL": bool}


@pytest.fixture(scope="module")
def service():
    grpc_port = free_port()
    process, url = start_workers(2, models='["poem"]', grpc_port=str(grpc_port))
    try:
        yield url, grpc_port
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def seeded(count: int) -> list[dict]:
    rng = random.Random(7)
    return [dict(KINDS[i % len(KINDS)], seed=rng.randrange(2**53)) for i in range(count)]


def v2_inputs(body: dict, types: dict[str, str]) -> list[dict]:
    return [{"name": k, "datatype": types[k], "shape": [1], "data": [v]} for k, v in body.items()]


async def ask(client: httpx.AsyncClient, path: str, body: dict, types: dict[str, str]) -> str:
    """The poem one path writes for ``body``."""
    if path == "/poem/stream":
        chars, last = [], None
        async with client.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    last = json.loads(line[6:])
                    chars.append(last.get("char", ""))
        assert last is not None and "".join(chars) == last["poem"]
        return last["poem"]
    if path == "/poem/batch":
        response = await client.post(path, json={"instances": [body, {k: v for k, v in body.items() if k != "seed"}]})
        assert response.status_code == 200, response.text
        return response.json()["predictions"][0]["poem"]
    if path == "/v2/models/poem/infer":
        response = await client.post(path, json={"inputs": v2_inputs(body, types)})
        assert response.status_code == 200, response.text
        return {o["name"]: o["data"][0] for o in response.json()["outputs"]}["poem"]
    response = await client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()["poem"]


def grpc_poems(port: int, bodies: list[dict], types: dict[str, str]) -> list[str]:
    import tritonclient.grpc as triton_grpc

    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
    poems = []
    for body in bodies:
        inputs = []
        for name, value in body.items():
            tensor = triton_grpc.InferInput(name, [1], types[name])
            kind = {"BYTES": object, "INT64": np.int64, "FP64": np.float64, "BOOL": np.bool_}[types[name]]
            tensor.set_data_from_numpy(np.array([str(value).encode() if kind is object else value], dtype=kind))
            inputs.append(tensor)
        poems.append(client.infer("poem", inputs).as_numpy("poem")[0].decode())
    return poems


def test_seeded_poems_are_byte_identical_alone_and_among_64_clients_on_every_path(service):
    url, grpc_port = service
    with httpx.Client(base_url=url, timeout=60) as client:
        types = {i["name"]: i["datatype"] for i in client.get("/v2/models/poem").json()["inputs"]}
        bodies = seeded(100)
        alone = [client.post("/poem", json=body).json()["poem"] for body in bodies]
        before = client.get("/metrics").text

    paths = ["/poem"] * 6 + ["/poem/stream"] * 2 + ["/poem/batch", "/v2/models/poem/infer"]
    jobs = [(i, paths[i % len(paths)], body) for i, body in enumerate(bodies)]
    rng = random.Random(3)
    jobs += [(None, "/poem", {k: v for k, v in rng.choice(KINDS).items()}) for _ in range(100)]  # unseeded
    rng.shuffle(jobs)

    async def load() -> dict[int, str]:
        queue: asyncio.Queue = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)
        got: dict[int, str] = {}

        async def client_loop(client: httpx.AsyncClient) -> None:
            while not queue.empty():
                i, path, body = queue.get_nowait()
                poem = await ask(client, path, body, types)
                if i is not None:
                    got[i] = poem

        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            grpc_bodies = bodies[:10]
            grpc = asyncio.create_task(asyncio.to_thread(grpc_poems, grpc_port, grpc_bodies, types))
            await asyncio.gather(*(client_loop(client) for _ in range(64)))
            got.update({1000 + i: poem for i, poem in enumerate(await grpc)})
        return got

    got = asyncio.run(load())
    assert [got[i] for i in range(100)] == alone
    assert [got[1000 + i] for i in range(10)] == alone[:10], "gRPC"

    after = httpx.get(url + "/metrics").text
    steps = _metric(after, "model_batch_size_count", model="poem") - _metric(
        before, "model_batch_size_count", model="poem"
    )
    rows = _metric(after, "model_batch_size_sum", model="poem") - _metric(before, "model_batch_size_sum", model="poem")
    assert rows / steps > 4, f"{rows:g} characters in {steps:g} steps: 64 clients' poems hardly shared a step"
