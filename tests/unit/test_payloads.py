"""Payload records on the stub model, in process: the JSON Lines file sink, redaction, sampling, uploads, and a
slow sink that fills the queue (records dropped and counted, answers unaffected)."""

import asyncio
import io
import json
import os
import pickle
import re
import signal
import time
from datetime import UTC, datetime

import numpy as np
import pytest
from cloudevents.http import from_dict
from pydantic import BaseModel, Field
from pydantic_core import to_json

from service.runtime.offload import ChildPipe
from service.runtime.payload_export import sender, structured, structured_pairs, timestamp, to_pairs
from service.runtime.payloads import plain
from tests.conftest import serving
from tests.receivers import EventSink


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}{{{wanted}}} (\S+)$" if labels else rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def read_events(path) -> list:
    return [from_dict(json.loads(line)) for line in path.read_text().splitlines()]


def test_records_go_to_a_json_lines_file_in_pairs_with_redaction(stub_app, tmp_path):
    sink = tmp_path / "records.jsonl"

    async def scenario():
        app = stub_app(payload_log_url=str(sink), payload_log_redact=["x"])
        async with serving(app) as client:
            ok = await client.post("/doubler", json={"x": 4}, headers={"x-request-id": "one"})
            bad = await client.post("/doubler/batch", json={"instances": [{"x": 1}, {"x": -1}]})
            upload = await client.post("/doubler/text", files={"file": ("n.txt", b"5", "text/plain")})
        return ok, bad, upload  # leaving serving() stops the sender, which writes what it holds

    ok, bad, upload = asyncio.run(scenario())
    assert ok.status_code == 200 and bad.status_code == 422 and upload.status_code == 200
    events = read_events(sink)
    assert len(events) == 6
    pairs: dict[str, dict] = {}
    for event in events:
        pairs.setdefault(event["id"], {})[event["type"].rsplit(".", 1)[1]] = event
    # a JSON route's record: its body as sent (no defaults added), its answer as written
    assert pairs["one"]["request"].data == {"instances": [{"x": "[redacted]"}]}
    assert pairs["one"]["response"].data == {"predictions": [{"y": 8.0}]}
    assert pairs["one"]["request"]["inferenceservicename"] == "doubler"
    # a batch with a refused instance: the request as sent, the 422 that named the instance as the response
    refused = pairs[bad.headers["x-request-id"]]
    assert refused["request"].data == {"instances": [{"x": "[redacted]"}, {"x": "[redacted]"}]}
    (error,) = refused["response"].data["detail"]
    assert error["loc"][:3] == ["body", "instances", 1] and "must not be negative" in error["msg"]
    assert refused["response"].data == bad.json()
    # an upload is recorded by its size and hash, not its bytes
    (file,) = pairs[upload.headers["x-request-id"]]["request"].data["instances"]
    assert file["file"]["bytes"] == 1 and len(file["file"]["sha256"]) == 64 and file["options"] == {"times": 1}


def test_bodies_recorded_as_sent_stay_one_json_line_whatever_their_layout_and_encoding(stub_app, tmp_path):
    """A body kept as it was sent may be pretty-printed or in an encoding FastAPI also reads (UTF-16, a UTF-8 byte
    order mark): each event is still one line of JSON Lines (and one valid event in a batch) holding its JSON."""
    sink = tmp_path / "records.jsonl"
    pretty = json.dumps({"x": 3, "sleep_ms": 0}, indent=2)
    bodies = {
        "pretty": pretty.encode(),
        "utf-16": json.dumps({"x": 5}).encode("utf-16"),
        "bom": b"\xef\xbb\xbf" + pretty.encode(),
        "batch": json.dumps({"instances": [{"x": 1}, {"x": 2}]}, indent=1).encode(),
    }

    async def scenario():
        async with serving(stub_app(payload_log_url=str(sink))) as client:
            return {
                name: await client.post(
                    "/doubler/batch" if name == "batch" else "/doubler",
                    content=body,
                    headers={"content-type": "application/json", "x-request-id": name},
                )
                for name, body in bodies.items()
            }

    answers = asyncio.run(scenario())
    assert {name: a.status_code for name, a in answers.items()} == dict.fromkeys(bodies, 200)
    lines = sink.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 * len(bodies)  # one event per line
    requests = {
        event["id"]: event.data for event in map(from_dict, map(json.loads, lines)) if event["type"].endswith("request")
    }
    assert requests["pretty"] == requests["bom"] == {"instances": [{"x": 3, "sleep_ms": 0}]}
    assert requests["utf-16"] == {"instances": [{"x": 5}]}
    assert requests["batch"] == {"instances": [{"x": 1}, {"x": 2}]}


def test_sampling_records_about_the_share_asked(stub_app, tmp_path):
    sink = tmp_path / "records.jsonl"

    async def scenario():
        async with serving(stub_app(payload_log_url=str(sink), payload_log_sample=0.25)) as client:
            for _ in range(400):
                await client.post("/doubler", json={"x": 1})

    asyncio.run(scenario())
    pairs = len(read_events(sink)) / 2
    assert 60 <= pairs <= 140  # 100 expected; this range fails once in ~10^6 runs


@pytest.mark.parametrize("mode", ["binary", "structured", "batch"])
def test_each_http_mode_delivers_events_a_cloudevents_consumer_reads(stub_app, mode):
    with EventSink() as sink:

        async def scenario():
            async with serving(stub_app(payload_log_url=sink.url, payload_log_format=mode)) as client:
                for i in range(3):
                    await client.post("/doubler", json={"x": i}, headers={"x-request-id": f"r{i}"})
                deadline = time.monotonic() + 15  # the sender process reports what it sent when it has sent it
                while (
                    metric(text := (await client.get("/metrics")).text, "payload_log_sent_total") < 6
                    and time.monotonic() < deadline
                ):
                    await asyncio.sleep(0.05)
                return text

        metrics = asyncio.run(scenario())
        events = sink.wait_for(6)
    assert sorted((e["id"], e["type"]) for e in events) == sorted(
        (f"r{i}", f"org.kubeflow.serving.inference.{kind}") for i in range(3) for kind in ("request", "response")
    )
    assert sink.posts == (1 if mode == "batch" else 6)
    assert metric(metrics, "payload_log_sent_total") == 6


def test_a_slow_sink_drops_records_but_no_answer(stub_app):
    with EventSink(delay_s=0.5) as sink:

        async def scenario():
            app = stub_app(payload_log_url=sink.url, payload_log_queue=4, payload_log_format="batch")
            async with serving(app) as client:
                answers = await asyncio.gather(*(client.post("/doubler", json={"x": i}) for i in range(40)))
                metrics = (await client.get("/metrics")).text
            return answers, metrics

        answers, metrics = asyncio.run(scenario())
    assert [a.status_code for a in answers] == [200] * 40
    dropped = metric(metrics, "payload_log_dropped_total", reason="queue_full")
    assert dropped > 0 and dropped % 2 == 0  # whole pairs


def test_a_stream_is_recorded_with_its_whole_answer(stub_app, tmp_path):
    sink = tmp_path / "records.jsonl"

    async def scenario():
        async with serving(stub_app(payload_log_url=str(sink))) as client:
            return await client.post("/doubler/stream", json={"x": 6.5}, headers={"x-request-id": "s1"})

    answer = asyncio.run(scenario())
    assert answer.status_code == 200 and "event: digit" in answer.text
    request, response = sorted(read_events(sink), key=lambda e: e["type"])
    assert request["id"] == response["id"] == "s1"
    assert request.data["instances"][0]["x"] == 6.5 and response.data == {"predictions": [{"y": 13.0}]}


@pytest.mark.parametrize("when", [0.0, 1796540238.0, 1796540238.9999996, 1796540238.123456])
def test_an_events_time_is_rfc3339_in_utc_to_the_microsecond(when):
    assert datetime.fromisoformat(timestamp(when)) == datetime.fromtimestamp(when, UTC)


def test_events_formatted_by_the_sender_read_as_their_attributes_and_data_would_be_written(tmp_path):
    """The sender formats each event's JSON (no dict serialised per record): whatever its strings hold (quotes,
    backslashes, line breaks, non-ASCII, %), every event reads as the attributes and data ``json`` would write, in
    JSON Lines, a batch and structured mode alike."""
    source, namespace = 'urn:"host"\\%s', "ns-é"
    records = [
        ("r1", "phone-price", "2026.12.05.143948", 1796540238.9999996, "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
         b'{\n"instances": [{"x": 1, "ram": 2}]}', (b'{"y": 2}',)),
        ('odd"id\\\n\u00e9%d', 'model"%', "v\\1", 0.0, None, [{"x": "é", "ram": {"ram": 1}}], [{"error": "e\n"}]),
    ]  # fmt: skip
    data = [
        ({"instances": [{"x": 1, "ram": "[redacted]"}]}, {"predictions": [{"y": 2}]}),
        ({"instances": [{"x": "é", "ram": "[redacted]"}]}, {"predictions": [{"error": "e\n"}]}),
    ]
    expected = []
    for (request_id, model, version, when, traceparent, *_), (request, response) in zip(records, data, strict=True):
        attributes = {
            "specversion": "1.0", "id": request_id, "source": source, "time": timestamp(when),
            "datacontenttype": "application/json", "inferenceservicename": model, "component": "predictor",
            "endpoint": version, "namespace": namespace, **({"traceparent": traceparent} if traceparent else {}),
        }  # fmt: skip
        expected += [
            {"type": "org.kubeflow.serving.inference.request", **attributes, "data": request},
            {"type": "org.kubeflow.serving.inference.response", **attributes, "data": response},
        ]
    sink = tmp_path / "records.jsonl"
    settings = {"target": str(sink), "mode": "binary", "timeout_s": 1, "source": source, "namespace": namespace}
    send, close = sender({**settings, "redact": ["ram"]})
    assert list(send(records)) == [(4, 0)]
    close()
    lines = sink.read_bytes().splitlines()
    assert [json.loads(line) for line in lines] == expected
    assert [from_dict(json.loads(line)).get_attributes() for line in lines] == [
        {k: v for k, v in event.items() if k != "data"} for event in expected
    ]
    pairs = to_pairs(records, source, namespace, frozenset({"ram"}))
    assert json.loads(b"[%b]" % b",".join(structured_pairs(pairs, b","))) == expected
    assert [json.loads(event) for event in structured(pairs)] == expected


def test_a_stop_signal_while_the_sender_starts_loses_no_record(tmp_path):
    """A service manager's SIGTERM to the whole group can reach the sender before its imports are done (a worker
    started a moment before the stop): it must not die of it, and what it was given still arrives."""
    sink = tmp_path / "records.jsonl"
    greeting = {"target": str(sink), "mode": "binary", "timeout_s": 2, "source": "urn:t", "namespace": None}
    reports: list = []
    pipe = ChildPipe(
        "service.runtime.payload_export", capacity=10, batch=10, delay_s=0.05, on_report=reports.append,
        on_dropped=lambda reason, records: reports.append(reason), greeting=greeting,
    )  # fmt: skip
    pipe.start()
    os.kill(pipe._child.pid, signal.SIGTERM)  # at once: the child is still starting its interpreter
    os.kill(pipe._child.pid, signal.SIGINT)
    pipe.put(("one", "doubler", "v1", time.time(), None, b'{"instances":[{"x":1}]}', b'{"predictions":[{"y":2}]}'))
    time.sleep(0.5)
    pipe.stop()
    assert reports == [(2, 0)] and len(read_events(sink)) == 2


class Reading(BaseModel):
    value: float


class Aliased(BaseModel):
    first_floor: int = Field(alias="1stFlrSF")  # as the house model names its fields
    reading: Reading
    note: str | None = None


class PlainOnly(pickle.Unpickler):
    """What the sender can unpickle: builtins and numpy, none of the server's classes."""

    def find_class(self, module, name):
        if module.split(".")[0] not in ("builtins", "numpy", "copyreg"):
            raise pickle.UnpicklingError(f"the sender cannot import {module}.{name}")
        return super().find_class(module, name)


def test_records_of_objects_reach_the_sender_as_plain_values_and_read_as_pydantic_writes_them():
    """Uploads, v2 and gRPC are recorded from their objects: a pydantic model goes down the pipe as its fields by
    their JSON names (aliases too), an error as its message, an array as an array, and the sender's JSON is what
    pydantic would have written."""
    house = Aliased.model_validate({"1stFlrSF": 856, "reading": {"value": 0.5}})
    pixels = np.array([[0.0, 255.0], [17.0, 3.0]], dtype=np.float32)
    failed = ValueError("x must not be negative")
    record = ("r1", "house-price", "v1", 1796540238.5, None, [house, pixels], [failed, object()])
    pipe = ChildPipe(
        "service.runtime.payload_export", capacity=4, batch=4, delay_s=1, on_report=print,
        on_dropped=lambda reason, records: None, reduce=plain,
    )  # fmt: skip
    (received,) = PlainOnly(io.BytesIO(pipe.encode([record]))).load()
    ((_, request, response),) = to_pairs([received], "urn:t", None)
    assert json.loads(request) == {"instances": [json.loads(to_json(house)), [[0, 255], [17, 3]]]}
    assert json.loads(request)["instances"][0] == {"1stFlrSF": 856, "reading": {"value": 0.5}, "note": None}
    (error, other) = json.loads(response)["predictions"]
    assert error == {"error": "x must not be negative"} and other.startswith("<object object at")
    ((_, redacted, _),) = to_pairs([received], "urn:t", None, frozenset({"value"}))
    assert json.loads(redacted)["instances"][0]["reading"] == {"value": "[redacted]"}
