"""The Open Inference Protocol v2 over REST, called with Triton's own client (tritonclient.http), JSON and
binary tensors, on all four models: the answers equal the JSON routes'."""

import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import example


@pytest.fixture(scope="module")
def v2(server):
    return triton.InferenceServerClient(server.url.removeprefix("http://"))


def named_inputs(rows: list[dict], fields: list[dict], binary: bool) -> list:
    """One input per field present in the rows, typed as the model's metadata says."""
    inputs = []
    for field in fields:
        values = [row.get(field["name"]) for row in rows]
        if None in values:  # left out: the model's default
            continue
        numpy_type = {"BYTES": object, "FP64": np.float64, "INT64": np.int64, "BOOL": np.bool_}[field["datatype"]]
        array = np.array([str(v).encode() for v in values] if numpy_type is object else values, dtype=numpy_type)
        tensor = triton.InferInput(field["name"], list(array.shape), field["datatype"])
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return inputs


def test_server_and_model_metadata(v2, client):
    assert v2.is_server_live() and v2.is_server_ready()
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    assert client.get("/v2/health/live").json() == {"live": True}
    for name in ("phone-price", "house-price", "fashion", "poem"):
        meta = v2.get_model_metadata(name)
        version = client.get(f"/models/{name}").json()["version"]
        assert meta["versions"] == [version] and v2.is_model_ready(name) and v2.is_model_ready(name, version)
        assert {t["name"] for t in meta["outputs"]} == set(
            client.get(f"/models/{name}").json()["output_schema"]["properties"]
        )
    fashion = {t["name"]: t for t in v2.get_model_metadata("fashion")["inputs"]}
    assert fashion["pixels"]["shape"] == [-1, 28, 28] and fashion["pixels"]["datatype"] == "FP32"
    assert not v2.is_model_ready("phone-price", "no-such-version")
    config = v2.get_model_config("fashion")  # Triton's configuration extension, which perf_analyzer reads first
    assert config["max_batch_size"] == 0 and config["input"][0] == {
        "name": "pixels",
        "data_type": "TYPE_FP32",
        "dims": [-1, 28, 28],
        "optional": False,
    }
    assert {o["name"]: o["data_type"] for o in config["output"]}["name"] == "TYPE_STRING"
    phone = v2.get_model_config("phone-price")["input"]
    assert all(t["optional"] for t in phone) and phone[-1]["name"] == "features"  # the packed tensor can stand in


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("name", ["phone-price", "house-price", "poem"])
def test_named_inputs_answer_as_the_json_route(v2, client, name, binary):
    rows = [{**example(name), "seed": 5}, {**example(name), "seed": 11}] if name == "poem" else [example(name)] * 2
    fields = v2.get_model_metadata(name)["inputs"]
    outputs = [
        triton.InferRequestedOutput(o["name"], binary_data=binary) for o in v2.get_model_metadata(name)["outputs"]
    ]
    result = v2.infer(name, named_inputs(rows, fields, binary), outputs=outputs, request_id="r-1")
    assert result.get_response()["id"] == "r-1" and result.get_response()["model_name"] == name
    expected = client.post(f"/{name}/batch", json={"instances": rows}).json()["predictions"]
    for o in v2.get_model_metadata(name)["outputs"]:
        got = result.as_numpy(o["name"])
        want = [e[o["name"]] for e in expected]
        if o["datatype"] == "BYTES":
            got = [g.decode() if isinstance(g, bytes) else g for g in got.tolist()]
            want = [w if isinstance(w, str) else json.dumps(w, ensure_ascii=False) for w in want]
            assert got == want, o["name"]
        else:
            assert np.allclose(got, np.array(want, dtype=np.float64)), o["name"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype, shape", [("UINT8", (3, 28, 28)), ("FP32", (3, 784))])
def test_fashion_tensors_answer_as_the_json_route(v2, client, binary, datatype, shape):
    pixels = np.zeros((3, 28, 28), np.uint8)
    pixels[0, 4:24, 9:19] = 220
    pixels[1] = np.array(example("fashion")["pixels"], np.uint8)
    pixels[2, 8:20, 4:24] = 150
    tensor = triton.InferInput("pixels", list(shape), datatype)
    tensor.set_data_from_numpy(
        pixels.reshape(shape).astype(datatype.lower().replace("fp", "float")), binary_data=binary
    )
    result = v2.infer(
        "fashion",
        [tensor],
        outputs=[triton.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probabilities", "name")],
    )
    expected = client.post("/fashion/batch", json={"instances": [{"pixels": p.tolist()} for p in pixels]}).json()
    assert result.as_numpy("label").tolist() == [p["label"] for p in expected["predictions"]]
    assert np.allclose(result.as_numpy("probabilities"), [p["probabilities"] for p in expected["predictions"]])


def test_errors_name_the_tensor_and_instance(v2, server):
    bad = triton.InferInput("ram", [1], "FP64")
    bad.set_data_from_numpy(np.array([-5.0]))
    with pytest.raises(InferenceServerException, match="instance 0, input"):
        v2.infer("phone-price", [bad])
    pixels = triton.InferInput("pixels", [1, 27, 28], "UINT8")
    pixels.set_data_from_numpy(np.zeros((1, 27, 28), np.uint8))
    with pytest.raises(InferenceServerException, match="pixels must be 28 rows of 28 numbers"):
        v2.infer("fashion", [pixels])
    with pytest.raises(InferenceServerException, match="no model named"):
        v2.get_model_metadata("nope")
    raw = httpx.post(
        f"{server.url}/v2/models/fashion/infer", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert raw.status_code == 400 and "JSON could not be read" in raw.json()["error"]


@pytest.fixture(scope="module")
def grpc_server():
    from tests.conftest import free_port, running_server

    port = free_port()
    with running_server(grpc_port=str(port), api_keys='["k"]') as server:
        yield server, port


@pytest.mark.parametrize("name", ["phone-price", "house-price", "poem"])
def test_grpc_answers_as_the_json_route(grpc_server, name):
    import tritonclient.grpc as triton_grpc

    server, port = grpc_server
    v2g = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
    key = {"x-api-key": "k"}
    assert v2g.is_server_live() and v2g.is_server_ready()
    meta = v2g.get_model_metadata(name, headers=key, as_json=True)
    rows = [{**example(name), "seed": 5}, {**example(name), "seed": 11}] if name == "poem" else [example(name)] * 2
    inputs = []
    for field in meta["inputs"]:
        values = [row.get(field["name"]) for row in rows]
        if None in values:
            continue
        numpy_type = {"BYTES": object, "FP64": np.float64, "INT64": np.int64, "BOOL": np.bool_}[field["datatype"]]
        array = np.array([str(v).encode() for v in values] if numpy_type is object else values, dtype=numpy_type)
        tensor = triton_grpc.InferInput(field["name"], list(array.shape), field["datatype"])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = v2g.infer(name, inputs, headers=key, request_id="g-1")
    assert result.get_response().id == "g-1"
    expected = httpx.post(f"{server.url}/{name}/batch", json={"instances": rows}, headers=key).json()["predictions"]
    for o in meta["outputs"]:
        got, want = result.as_numpy(o["name"]), [e[o["name"]] for e in expected]
        if o["datatype"] == "BYTES":
            assert [g.decode() for g in got.tolist()] == [
                w if isinstance(w, str) else json.dumps(w, ensure_ascii=False) for w in want
            ]
        else:
            assert np.allclose(got, np.array(want, dtype=np.float64)), o["name"]
    with pytest.raises(InferenceServerException, match="API key"):
        v2g.infer(name, inputs)


def test_grpc_fashion_and_health(grpc_server):
    import grpc
    import tritonclient.grpc as triton_grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server, port = grpc_server
    v2g = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
    pixels = np.zeros((2, 28, 28), np.uint8)
    pixels[0] = np.array(example("fashion")["pixels"], np.uint8)
    pixels[1, 8:20, 4:24] = 150
    tensor = triton_grpc.InferInput("pixels", [2, 28, 28], "UINT8")
    tensor.set_data_from_numpy(pixels)
    result = v2g.infer("fashion", [tensor], headers={"x-api-key": "k"})
    expected = httpx.post(
        f"{server.url}/fashion/batch",
        json={"instances": [{"pixels": p.tolist()} for p in pixels]},
        headers={"x-api-key": "k"},
    ).json()["predictions"]
    assert result.as_numpy("label").tolist() == [p["label"] for p in expected]
    bad = triton_grpc.InferInput("pixels", [1, 27, 28], "UINT8")
    bad.set_data_from_numpy(np.zeros((1, 27, 28), np.uint8))
    with pytest.raises(InferenceServerException, match="28 rows of 28"):
        v2g.infer("fashion", [bad], headers={"x-api-key": "k"})
    config = v2g.get_model_config("fashion", headers={"x-api-key": "k"}, as_json=True)["config"]
    assert config["input"][0]["name"] == "pixels" and config["input"][0]["data_type"] == "TYPE_FP32"
    assert [int(d) for d in config["input"][0]["dims"]] == [-1, 28, 28]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_phone_features_packed_in_one_tensor(v2, client, binary):
    meta = {t["name"]: t for t in v2.get_model_metadata("phone-price")["inputs"]}
    columns = meta["features"]["columns"]
    assert meta["features"]["shape"] == [-1, 20] and len(columns) == 20
    rows = [example("phone-price"), {**example("phone-price"), "ram": 3900}]
    matrix = np.array([[row[c] for c in columns] for row in rows], np.float32)
    tensor = triton.InferInput("features", list(matrix.shape), "FP32")
    tensor.set_data_from_numpy(matrix, binary_data=binary)
    result = v2.infer("phone-price", [tensor])
    expected = client.post("/phone-price/batch", json={"instances": rows}).json()["predictions"]
    assert result.as_numpy("price_range").tolist() == [e["price_range"] for e in expected]
    wrong = triton.InferInput("features", [1, 19], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 19), np.float32))
    with pytest.raises(InferenceServerException, match=r"shape \[-1, 20\]"):
        v2.infer("phone-price", [wrong])


ODD_BODIES = {  # (body, headers): each a 400 naming what to send, never a 500
    "header length not ASCII digits": (b'{"inputs": []}', {"inference-header-content-length": "\u00b2".encode()}),
    "a shape of 10**30 rows": (
        json.dumps({"inputs": [{"name": "ram", "datatype": "FP64", "shape": [10**30, 0], "data": []}]}).encode(),
        {},
    ),
    "65 dimensions": (
        json.dumps({"inputs": [{"name": "ram", "datatype": "FP64", "shape": [1] * 65, "data": [1]}]}).encode(),
        {},
    ),
    "BYTES not UTF-8": (
        b'{"inputs": [{"name": "Neighborhood", "datatype": "BYTES", "shape": [1], '
        b'"parameters": {"binary_data_size": 6}}]}' + b"\x02\x00\x00\x00\xff\xfe",
        {},
    ),
    "an input the model does not have": (
        b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": [1]}]}',
        {},
    ),
    "a million values for a one-value input": (
        json.dumps({"inputs": [{"name": "ram", "datatype": "FP64", "shape": [1, 1_000_000], "data": []}]}).encode(),
        {},
    ),
}


@pytest.mark.parametrize("case", list(ODD_BODIES))
def test_odd_v2_requests_are_a_400_not_a_500(server, case):
    body, headers = ODD_BODIES[case]
    model = "phone-price"
    if "BYTES" in case:  # the header length must be the JSON part's
        headers, model = {"inference-header-content-length": str(body.index(b"}]}") + 3).encode()}, "house-price"
    response = httpx.post(
        f"{server.url}/v2/models/{model}/infer",
        content=body,
        headers={"content-type": "application/octet-stream", **headers},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] and "x-request-id" in response.headers
    if "UTF-8" in case:
        assert "UTF-8" in response.json()["error"]


def test_a_v2_json_body_with_more_values_than_any_request_needs_is_refused_before_parsing(server):
    values = ",".join(["1"] * 2_000_000)  # 4 MB of numbers for a model that takes 20 per instance
    body = f'{{"inputs": [{{"name": "ram", "datatype": "FP64", "shape": [1], "data": [{values}]}}]}}'.encode()
    response = httpx.post(
        f"{server.url}/v2/models/phone-price/infer", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and "more values than" in response.json()["error"]


def test_odd_grpc_requests_are_invalid_argument_and_keyless_calls_are_refused(grpc_server):
    import grpc
    from tritonclient.grpc import service_pb2 as pb  # Triton's own messages (ours share their proto names)
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    server, port = grpc_server
    key = (("x-api-key", "k"),)
    odd = {
        "a shape of 10**30 rows": pb.ModelInferRequest(
            model_name="phone-price",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="ram", datatype="FP64", shape=[2**62, 0])],
        ),
        "65 dimensions": pb.ModelInferRequest(
            model_name="phone-price",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="ram", datatype="FP64", shape=[1] * 65)],
            raw_input_contents=[np.float64(1).tobytes()],
        ),
        "BYTES not UTF-8": pb.ModelInferRequest(
            model_name="house-price",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="Neighborhood", datatype="BYTES", shape=[1])],
            raw_input_contents=[b"\x02\x00\x00\x00\xff\xfe"],
        ),
    }
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for case, request in odd.items():
            with pytest.raises(grpc.RpcError) as error:
                stub.ModelInfer(request, metadata=key)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, error.value.details())
        # a large message without a key: refused by its metadata, before the message is read
        big = pb.ModelInferRequest(
            model_name="fashion",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="FP32", shape=[256, 28, 28])],
            raw_input_contents=[bytes(256 * 784 * 4)],
        )
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(big)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.ServerLive(pb.ServerLiveRequest()).live  # probes need no key
        with pytest.raises(grpc.RpcError) as error:
            stub.ServerMetadata(pb.ServerMetadataRequest())
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_same_fault_gets_the_same_status_on_every_protocol(grpc_server):
    """An unknown model, a missing key, a malformed tensor and a value the model refuses: the JSON route, v2
    REST and gRPC answer each with one status (gRPC: the code the protocol maps it to), and every gRPC call
    carries a request id back, as HTTP answers do."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    from service.errors import GRPC_CODES

    server, port = grpc_server
    key = {"x-api-key": "k"}

    def rest(path: str, body: dict, headers: dict | None = None) -> int:
        return httpx.post(f"{server.url}{path}", json=body, headers=headers if headers is not None else key).status_code

    def tensor(name: str, shape: list[int], values: list[float]) -> pb.ModelInferRequest.InferInputTensor:
        t = pb.ModelInferRequest.InferInputTensor(name=name, datatype="FP64", shape=shape)
        t.contents.fp64_contents.extend(values)
        return t

    phone = example("phone-price")
    negative = [{"name": "ram", "datatype": "FP64", "shape": [1], "data": [-5.0]}]
    cases = {  # fault: (JSON route status, v2 REST status, gRPC request, gRPC metadata)
        "unknown model": (
            rest("/no-such-model", phone),
            rest("/v2/models/no-such-model/infer", {"inputs": negative}),
            pb.ModelInferRequest(model_name="no-such-model", inputs=[tensor("ram", [1], [1.0])]),
            key,
        ),
        "missing key": (
            rest("/phone-price", phone, {}),
            rest("/v2/models/phone-price/infer", {"inputs": negative}, {}),
            pb.ModelInferRequest(model_name="phone-price", inputs=[tensor("ram", [1], [1.0])]),
            {},
        ),
        "malformed tensor": (
            None,
            rest(
                "/v2/models/phone-price/infer",
                {"inputs": [{"name": "ram", "datatype": "FP64", "shape": [1, 2], "data": [1.0]}]},
            ),
            pb.ModelInferRequest(model_name="phone-price", inputs=[tensor("ram", [1, 2], [1.0])]),
            key,
        ),
        "a value the model refuses": (
            rest("/phone-price", {**phone, "ram": -5}),
            rest(
                "/v2/models/phone-price/infer",
                {"inputs": [{"name": "features", "datatype": "FP64", "shape": [1, 20], "data": [-5.0] * 20}]},
            ),
            pb.ModelInferRequest(model_name="phone-price", inputs=[tensor("features", [1, 20], [-5.0] * 20)]),
            key,
        ),
    }
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for fault, (json_status, v2_status, request, metadata) in cases.items():
            with pytest.raises(grpc.RpcError) as error:
                stub.ModelInfer(request, metadata=tuple(metadata.items()) or None)
            assert json_status in (None, v2_status), (fault, json_status, v2_status)
            assert error.value.code().name == GRPC_CODES[v2_status], (fault, v2_status, error.value.code())
            assert dict(error.value.trailing_metadata()).get("x-request-id"), fault
        _, call = stub.ServerMetadata.with_call(
            pb.ServerMetadataRequest(), metadata=(("x-request-id", "trace-7"), *key.items())
        )
        assert dict(call.trailing_metadata())["x-request-id"] == "trace-7"
