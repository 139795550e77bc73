"""gRPC calls on one real server on phone-price: calls that never send their message cannot lock out a real
one (the v2 protocol on all four models: tests/e2e/test_v2.py)."""


def test_grpc_calls_that_never_send_their_message_cannot_lock_out_a_real_one():
    """Over SERVE_GRPC_MAX_CALLS, a new call cancels the one that has waited longest for its message; a call
    whose message never comes ends after the read timeout."""
    import asyncio

    import grpc
    from tritonclient.grpc import service_pb2 as pb

    from tests.conftest import free_port, running_server

    async def scenario(port: int) -> tuple[list, str, list]:
        hold = asyncio.Event()

        async def never_sends():
            await hold.wait()
            return
            yield  # an async generator that never yields: the message never comes

        path = "/inference.GRPCInferenceService/ModelInfer"
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as stalled,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as real,
        ):
            open_call = stalled.stream_unary(
                path,
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            calls = [open_call(never_sends()) for _ in range(20)]
            await asyncio.sleep(0.5)
            metadata = real.unary_unary(
                "/inference.GRPCInferenceService/ModelMetadata",
                request_serializer=pb.ModelMetadataRequest.SerializeToString,
                response_deserializer=pb.ModelMetadataResponse.FromString,
            )
            answer = await metadata(pb.ModelMetadataRequest(name="phone-price"), timeout=5)
            await asyncio.sleep(2.5)  # past the read timeout: the stalled calls have all ended
            codes = [(await call.code()).name if call.done() else "still open" for call in calls]
            hold.set()
            return codes, answer.name, []

    port = free_port()
    with running_server(
        models='["phone-price"]', grpc_port=str(port), grpc_max_calls="4", request_read_timeout_s="1.5"
    ):
        codes, model, _ = asyncio.run(scenario(port))
    assert model == "phone-price"
    assert "still open" not in codes and set(codes) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, codes
    assert "DEADLINE_EXCEEDED" in codes, codes


def test_a_grpc_calls_deadline_is_the_servers_too():
    """A call's own deadline reaches the batcher: with each batch waiting 300 ms for company, a call that
    allows 100 ms is dropped from the queue unanswered (counted as expired), as X-Request-Timeout is."""
    import re

    import httpx
    import numpy as np
    import pytest
    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException

    from tests.conftest import example, free_port, running_server

    port = free_port()
    with running_server(
        models='["phone-price"]', grpc_port=str(port), default_batching='{"max_batch_size": 64, "max_wait_ms": 300}'
    ) as server:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        inputs = []
        for name, value in example("phone-price").items():
            tensor = triton_grpc.InferInput(name, [1], "FP64")
            tensor.set_data_from_numpy(np.array([float(value)], dtype=np.float64))
            inputs.append(tensor)
        with pytest.raises(InferenceServerException, match="DEADLINE_EXCEEDED"):
            client.infer("phone-price", inputs, client_timeout=0.1)
        late = httpx.post(
            f"{server.url}/phone-price", json=example("phone-price"), headers={"X-Request-Timeout": "0.1"}, timeout=5
        )
        relaxed = client.infer("phone-price", inputs, client_timeout=5)  # waits its 300 ms and is answered
        metrics = httpx.get(f"{server.url}/metrics").text
    assert late.status_code == 504 and "deadline" in late.json()["detail"]
    assert relaxed.as_numpy("price_range") is not None
    expired = re.search(r'^model_requests_dropped_total\{model="phone-price",reason="expired"\} (\S+)$', metrics, re.M)
    assert expired and float(expired.group(1)) >= 2, metrics[-2000:]
