"""Traces and payload records from a real server (uvicorn, the committed models) to real receivers: spans over
OTLP/HTTP that join the caller's trace on the JSON route, an upload, v2 REST and gRPC (Triton's client);
CloudEvents pairs at an HTTP sink; and a dead sink that costs no answer."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from tests.conftest import Server, example, free_port
from tests.receivers import EventSink, OtlpReceiver

TRACE_ID = re.compile(r"[0-9a-f]{32}")


def traceparent(n: int) -> tuple[str, str, str]:
    """A caller's traceparent header with a distinct trace id, its trace id and its span id."""
    trace_id, span_id = f"{n:032x}".replace("0", "a", 8), f"{n:016x}".replace("0", "b", 4)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{name}{{{wanted}}} (\S+)$" if labels else rf"^{name} (\S+)$", re.M)
    found = pattern.search(text)
    return float(found.group(1)) if found else 0.0


def check_model_spans(spans: list, server_span, model: str, version: str) -> None:
    """queue and batch under the request's span, forward under the batch, with the batch's attributes."""
    by_name = {s.name: s for s in spans}
    queue, batch, forward = by_name["queue"], by_name["batch"], by_name["forward"]
    assert queue.parent_span_id == batch.parent_span_id == server_span.span_id
    assert forward.parent_span_id == batch.span_id
    assert batch.attributes["model.name"] == model and batch.attributes["model.version"] == version
    assert isinstance(batch.attributes["batch.size"], int) and batch.attributes["batch.size"] >= 1
    # in time order, within the request
    assert server_span.start_ns <= queue.start_ns <= queue.end_ns <= batch.start_ns <= forward.start_ns
    assert forward.end_ns <= batch.end_ns <= server_span.end_ns


@pytest.fixture(scope="module")
def traced():
    """A server with tracing on (OTLP/HTTP to a real receiver, exported every 100 ms) and gRPC."""
    with OtlpReceiver() as receiver:
        grpc_port = free_port()
        server = Server(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
                "OTEL_BSP_SCHEDULE_DELAY": "100",
                "OTEL_SERVICE_NAME": "course-models-test",
                "SERVE_MODELS": '["phone-price", "fashion", "poem"]',
                "SERVE_GRPC_PORT": str(grpc_port),
            }
        )
        try:
            yield server, receiver, grpc_port
        finally:
            server.stop()


@pytest.mark.parametrize("path", ["/poem", "/poem/stream"])
def test_a_poem_written_in_the_running_batch_is_traced_like_a_batch(traced, path):
    """Continuous batching: the queue wait, then the poem's time in the running batch (its size when it finished)
    and its generation, under the request's span, for a whole answer and for a stream."""
    server, receiver, _ = traced
    header, trace_id, parent = traceparent(10 + len(path))
    with server.client() as client:
        answer = client.post(path, json={"line_num": 2, "seed": 4}, headers={"traceparent": header})
        version = client.get("/models/poem").json()["version"]
    assert answer.status_code == 200
    spans = receiver.trace(trace_id, at_least=4)
    (server_span,) = [s for s in spans if s.parent_span_id == parent]
    assert server_span.name == f"POST {path}"
    check_model_spans(spans, server_span, "poem", version)


def test_json_route_spans_join_the_callers_trace(traced):
    server, receiver, _ = traced
    header, trace_id, parent = traceparent(1)
    with server.client() as client:
        answer = client.post("/phone-price", json=example("phone-price"), headers={"traceparent": header})
        version = client.get("/models/phone-price").json()["version"]
    assert answer.status_code == 200
    # traceresponse: the same trace, the server's span
    version_field, returned_trace, server_span_id, _ = answer.headers["traceresponse"].split("-")
    assert version_field == "00" and returned_trace == trace_id and server_span_id != parent
    spans = receiver.trace(trace_id, at_least=4)
    (server_span,) = [s for s in spans if s.parent_span_id == parent]
    assert server_span.span_id == server_span_id and server_span.name == "POST /phone-price"
    assert server_span.kind == 2  # SERVER
    assert server_span.attributes["http.response.status_code"] == 200
    assert server_span.attributes["request.id"] == answer.headers["x-request-id"]
    check_model_spans(spans, server_span, "phone-price", version)
    # the access log line carries the trace id
    time.sleep(0.2)
    line = next(line for line in server.output().splitlines() if answer.headers["x-request-id"] in line)
    assert f"trace_id={trace_id}" in line


def test_upload_and_v2_rest_spans(traced):
    server, receiver, _ = traced
    upload_header, upload_trace, upload_parent = traceparent(2)
    v2_header, v2_trace, v2_parent = traceparent(3)
    png = _garment_png()
    with server.client() as client:
        uploaded = client.post(
            "/fashion/image", files={"file": ("g.png", png, "image/png")}, headers={"traceparent": upload_header}
        )
        body = {"inputs": [{"name": n, "shape": [1], "datatype": "FP64", "data": [v]} for n, v in _numbers()]}
        v2 = client.post("/v2/models/phone-price/infer", json=body, headers={"traceparent": v2_header})
    assert uploaded.status_code == 200 and v2.status_code == 200, (uploaded.text, v2.text)
    for trace_id, parent, model, route in (
        (upload_trace, upload_parent, "fashion", "POST /fashion/image"),
        (v2_trace, v2_parent, "phone-price", "POST /v2/models/{model}/infer"),
    ):
        spans = receiver.trace(trace_id, at_least=4)
        (server_span,) = [s for s in spans if s.parent_span_id == parent]
        assert server_span.name == route
        check_model_spans(spans, server_span, model, _batch(spans))


def test_grpc_spans_join_the_callers_trace(traced):
    server, receiver, grpc_port = traced
    header, trace_id, parent = traceparent(4)
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    inputs = []
    for name, value in _numbers():
        tensor = triton_grpc.InferInput(name, [1], "FP64")
        tensor.set_data_from_numpy(np.array([value], dtype=np.float64))
        inputs.append(tensor)
    result = client.infer("phone-price", inputs, headers={"traceparent": header})
    assert result.as_numpy("price_range") is not None
    spans = receiver.trace(trace_id, at_least=4)
    (server_span,) = [s for s in spans if s.parent_span_id == parent]
    assert server_span.name == "/inference.GRPCInferenceService/ModelInfer"
    assert server_span.attributes["rpc.grpc.status_code"] == "OK"
    check_model_spans(spans, server_span, "phone-price", _batch(spans))
    # a refusal is traced too, with its code
    bad_header, bad_trace, _ = traceparent(5)
    with pytest.raises(Exception, match="no model named"):
        client.infer("no-such-model", inputs, headers={"traceparent": bad_header})
    (refused,) = receiver.trace(bad_trace, at_least=1)
    assert refused.attributes["rpc.grpc.status_code"] == "NOT_FOUND"


def test_without_a_caller_trace_a_new_one_starts(traced):
    server, receiver, _ = traced
    with server.client() as client:
        answer = client.post("/phone-price", json=example("phone-price"))
    trace_id = answer.headers["traceresponse"].split("-")[1]
    assert TRACE_ID.fullmatch(trace_id)
    spans = receiver.trace(trace_id, at_least=4)
    roots = [s for s in spans if not s.parent_span_id]
    assert [s.name for s in roots] == ["POST /phone-price"]


def test_tracing_is_off_without_an_endpoint(server):
    """The shared server has no OTEL endpoint: no traceresponse, no trace id in the log."""
    answer = httpx.post(f"{server.url}/phone-price", json=example("phone-price"))
    assert answer.status_code == 200 and "traceresponse" not in answer.headers


def test_payload_records_reach_the_sink_in_pairs():
    with EventSink() as sink:
        server = Server(
            {
                "SERVE_MODELS": '["phone-price"]',
                "SERVE_PAYLOAD_LOG_URL": sink.url,
                "SERVE_PAYLOAD_LOG_REDACT": '["ram"]',
            }
        )
        try:
            with server.client() as client:
                phone = example("phone-price")
                one = client.post("/phone-price", json=phone, headers={"x-request-id": "payload-1"})
                batch = client.post("/phone-price/batch", json={"instances": [phone, {**phone, "ram": 300}]})
                events = sink.wait_for(4)
                metrics = client.get("/metrics").text
        finally:
            server.stop()
    assert one.status_code == batch.status_code == 200
    assert len(events) == 4
    by_id: dict[str, dict] = {}
    for event in events:
        by_id.setdefault(event["id"], {})[event["type"]] = event
    first = by_id["payload-1"]
    request = first["org.kubeflow.serving.inference.request"]
    response = first["org.kubeflow.serving.inference.response"]
    assert request["inferenceservicename"] == response["inferenceservicename"] == "phone-price"
    assert request["endpoint"] == one.headers["x-model-version"]
    # the instance as sent, the named field redacted; the answer as written
    assert request.data == {"instances": [{**phone, "ram": "[redacted]"}]}
    assert response.data == {"predictions": [one.json()]}
    second = by_id[batch.headers["x-request-id"]]
    redacted = {**phone, "ram": "[redacted]"}
    assert second["org.kubeflow.serving.inference.request"].data == {"instances": [redacted, redacted]}
    assert second["org.kubeflow.serving.inference.response"].data == batch.json()
    assert metric(metrics, "payload_log_sent_total") == 4


def test_a_dead_sink_costs_no_answer_and_is_counted():
    dead = f"http://127.0.0.1:{free_port()}/events"  # nothing listens there
    server = Server({"SERVE_MODELS": '["phone-price"]', "SERVE_PAYLOAD_LOG_URL": dead})
    try:
        with server.client() as client:
            statuses = [client.post("/phone-price", json=example("phone-price")).status_code for _ in range(50)]
            time.sleep(0.5)
            metrics = client.get("/metrics").text
    finally:
        server.stop()
    assert set(statuses) == {200}
    assert metric(metrics, "payload_log_dropped_total", reason="sink_error") >= 2
    assert metric(metrics, "payload_log_sent_total") == 0
    assert "payload sink" in server.output() and "failed" in server.output()


# -- inputs ---------------------------------------------------------------------------------------------


def _numbers() -> list[tuple[str, float]]:
    return [(k, float(v)) for k, v in example("phone-price").items() if isinstance(v, (int, float))]


def _batch(spans: list) -> str:
    return next(s for s in spans if s.name == "batch").attributes["model.version"]


def _garment_png() -> bytes:
    import io

    from PIL import Image

    pixels = np.array(example("fashion")["pixels"], dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _senders_in_session(session: int) -> list[int]:
    """The span exporter and payload sender processes of one server (its session: started with a new one)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if os.getsid(int(pid)) == session and (b"span_export" in cmdline or b"payload_export" in cmdline):
                found.append(int(pid))
        except OSError:  # gone meanwhile
            continue
    return found


def test_every_worker_sends_what_it_recorded_when_the_whole_group_is_stopped(tmp_path):
    """Two workers, each with its exporter and sender; SIGTERM to the whole process group (as systemd stops a
    service) right after 40 requests, their spans still queued (exported every 5 s): every span and every
    record still arrives, and no sender outlives its server."""
    with OtlpReceiver() as otlp, EventSink() as sink:
        port = free_port()
        env = {
            **os.environ,
            "SERVE_WORKERS": "2",
            "SERVE_MODELS": '["phone-price"]',
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url,
            "SERVE_PAYLOAD_LOG_URL": sink.url + "/events",
            "SERVE_PAYLOAD_LOG_FORMAT": "batch",
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "service", "--port", str(port)],
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=(log := (tmp_path / "server.log").open("w")),  # its warnings say why, should records be missing
        )
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    try:
                        if client.get("/readyz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.3)
                senders = _senders_in_session(server.pid)
                while len(senders) < 4 and time.monotonic() < deadline:  # /readyz answers once one worker is up
                    time.sleep(0.3)
                    senders = _senders_in_session(server.pid)
                callers = [traceparent(1000 + i) for i in range(40)]
                statuses = [
                    client.post("/phone-price", json=example("phone-price"), headers={"traceparent": c[0]}).status_code
                    for c in callers
                ]
            os.killpg(server.pid, signal.SIGTERM)
            assert server.wait(60) == 0
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
        assert set(statuses) == {200} and len(senders) == 4  # an exporter and a sender per worker
        otlp.trace(callers[-1][1], at_least=4, timeout_s=10)  # the last request's, then every one's as it stands
        assert [len(otlp.trace(trace_id, at_least=4, timeout_s=0)) for _, trace_id, _ in callers] == [4] * 40
        log.close()
        warnings = [line for line in (tmp_path / "server.log").read_text().splitlines() if "WARNING" in line]
        assert len(sink.wait_for(80)) == 80, warnings
        time.sleep(0.5)
        assert _senders_in_session(server.pid) == []
