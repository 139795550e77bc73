"""The Open Inference Protocol v2 over REST, called with KServe's own client (``kserve.InferenceRESTClient``,
``protocol="v2"``) against a live server: health (the client reads the body), model readiness, and
inference on all four models, JSON and binary tensors; the answers equal the JSON routes'.

KServe's client runs in a child process (this file run as a script): the ``kserve`` package registers its
own ``inference`` protobuf messages when imported, and so does ``tritonclient.grpc`` (tests/e2e/test_v2.py), with
the same names: one process cannot import both (protobuf refuses the second as a duplicate).
"""

import json
import subprocess
import sys

import numpy as np
import pytest

MODELS = ("phone-price", "house-price", "fashion", "poem")
NUMPY = {"BYTES": np.object_, "FP64": np.float64, "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8}


# ---------------------------------------------------------------- the client side (child process)


def kserve_calls(job: dict) -> dict:
    """Every call of ``job`` with KServe's client; outputs as lists (BYTES decoded), errors as status and text."""
    import asyncio

    import httpx
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

    url = job["url"]

    def tensors(case: dict) -> list:
        inputs = []
        for field in case["fields"]:
            values = [row.get(field["name"]) for row in case["rows"]]
            if None in values or field["datatype"] not in NUMPY:  # left out: the model's default
                continue
            if field["datatype"] == "BYTES":
                array = np.array([str(v).encode() for v in values], dtype=np.object_)
            else:
                array = np.array(values, dtype=NUMPY[field["datatype"]])
            tensor = InferInput(field["name"], list(array.shape), field["datatype"])
            tensor.set_data_from_numpy(array, binary_data=case["binary"])
            inputs.append(tensor)
        return inputs

    async def run() -> dict:
        out: dict = {}
        async with InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60)) as kserve:
            out["live"] = await kserve.is_server_live(url)
            out["ready"] = await kserve.is_server_ready(url)
            out["model_ready"] = {name: await kserve.is_model_ready(url, name) for name in [*MODELS, "no-such-model"]}
            out["infer"] = {}
            for key, case in job["cases"].items():
                request = InferRequest(
                    case["model"],
                    tensors(case),
                    request_id=key,
                    request_outputs=[
                        RequestedOutput(name, {"binary_data": case["binary"]}) for name in case["outputs"]
                    ],
                )
                try:
                    response = await kserve.infer(url, request, model_name=case["model"])
                except httpx.HTTPStatusError as exc:
                    out["infer"][key] = {"status": exc.response.status_code, "error": str(exc)}
                    continue
                outputs = {}
                for o in response.outputs:
                    values = o.as_numpy().tolist()
                    outputs[o.name] = [v.decode() if isinstance(v, bytes) else v for v in values]
                out["infer"][key] = {
                    "id": response.id,
                    "model_name": response.model_name,
                    "outputs": outputs,
                    "datatypes": {o.name: o.datatype for o in response.outputs},
                }
        return out

    return asyncio.run(run())


if __name__ == "__main__":
    json.dump(kserve_calls(json.load(sys.stdin)), sys.stdout)
    sys.exit(0)


# ---------------------------------------------------------------- the tests (pytest process)

from tests.conftest import example  # noqa: E402 - here, as the child process above needs none of the project


def rows_of(name: str) -> list[dict]:
    if name == "poem":
        return [{**example(name), "seed": 5}, {**example(name), "seed": 11}]
    if name == "fashion":
        pixels = np.zeros((3, 28, 28), np.uint8)
        pixels[0] = np.array(example("fashion")["pixels"], np.uint8)
        pixels[1, 4:24, 9:19] = 220
        pixels[2, 8:20, 4:24] = 150
        return [{"pixels": p.tolist()} for p in pixels]
    return [example(name), {**example(name), **({"ram": 3900} if name == "phone-price" else {"LotArea": 20000})}]


@pytest.fixture(scope="module")
def kserve(server, client) -> dict:
    """What KServe's client got from the live server, and the cases it sent."""
    cases = {}
    for name in MODELS:
        meta = client.get(f"/v2/models/{name}").json()
        fields = meta["inputs"]
        if name == "fashion":
            fields = [{"name": "pixels", "datatype": "UINT8"}]
        for binary in (False, True):
            cases[f"{name}-{'binary' if binary else 'json'}"] = {
                "model": name,
                "rows": rows_of(name),
                "fields": fields,
                "binary": binary,
                "outputs": [o["name"] for o in meta["outputs"]],
            }
    phone = client.get("/v2/models/phone-price").json()
    cases["bad-ram"] = {
        "model": "phone-price",
        "rows": [{**example("phone-price"), "ram": -5}],
        "fields": phone["inputs"],
        "binary": True,
        "outputs": [],
    }
    cases["no-model"] = {**cases["bad-ram"], "model": "nope"}
    job = {"url": server.url, "cases": cases}
    done = subprocess.run(
        [sys.executable, __file__], input=json.dumps(job), capture_output=True, text=True, check=False, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return {"job": job, **json.loads(done.stdout)}


def test_health_and_model_readiness(kserve):
    assert kserve["live"] is True and kserve["ready"] is True
    assert kserve["model_ready"] == {**{name: True for name in MODELS}, "no-such-model": False}


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("name", MODELS)
def test_infer_answers_as_the_json_route(kserve, client, name, binary):
    key = f"{name}-{'binary' if binary else 'json'}"
    got = kserve["infer"][key]
    assert "error" not in got, got.get("error")
    assert got["id"] == key and got["model_name"] == name
    case = kserve["job"]["cases"][key]
    expected = client.post(f"/{name}/batch", json={"instances": case["rows"]}).json()["predictions"]
    assert set(got["outputs"]) == set(case["outputs"])
    for output, values in got["outputs"].items():
        want = [e[output] for e in expected]
        if got["datatypes"][output] == "BYTES":
            assert values == [w if isinstance(w, str) else json.dumps(w, ensure_ascii=False) for w in want], output
        else:
            assert np.allclose(np.array(values, dtype=np.float64), np.array(want, dtype=np.float64)), output
    if name != "poem":  # two or three different inputs: not one answer repeated
        assert len({json.dumps(e) for e in expected}) == len(case["rows"])


def test_errors_reach_the_client(kserve):
    bad, missing = kserve["infer"]["bad-ram"], kserve["infer"]["no-model"]
    assert bad["status"] == 422 and "instance 0, input ram: Input should be greater" in bad["error"]
    assert missing["status"] == 404 and "no model named 'nope'" in missing["error"]
