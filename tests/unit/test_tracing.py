"""Traces on the stub model, in process, sent over OTLP/HTTP to a real receiver: a stream's spans, a batch
shared by concurrent requests, a refused request's span, the OTEL_* variables that turn tracing off or stop
the start, and what is dropped (and counted) when the collector or the exporter process is down."""

import asyncio
import marshal
import os
import re
import time

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.runtime.batching import BatchTiming
from service.runtime.context import CURRENT, CallContext
from service.runtime.offload import RESTART_AFTER_S, ChildPipe
from service.runtime.span_export import Batches, http_client, resource
from service.runtime.tracing import IDS_AT_ONCE, Tracing, TracingConfigError
from tests.conftest import free_port, serving
from tests.receivers import OtlpReceiver
from tests.unit.test_payloads import metric

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACE_ID, PARENT = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


@pytest.fixture
def receiver(monkeypatch):
    with OtlpReceiver() as otlp:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        yield otlp


async def arrived(receiver: OtlpReceiver, trace_id: str, count: int) -> list:
    """The trace's spans once ``count`` have arrived, waited for while the app serves: the exporter process runs at
    the lowest CPU priority, so on a busy host the few seconds a shutdown gives it may not be enough."""
    return await asyncio.to_thread(receiver.trace, trace_id, count, 30)


def test_a_streams_planning_and_pieces_are_traced(stub_app, receiver):
    async def scenario():
        async with serving(stub_app()) as client:
            answer = await client.post("/doubler/stream", json={"x": 6.5}, headers={"traceparent": CALLER})
            return answer, await arrived(receiver, TRACE_ID, 1 + 3 * 6)  # the request; a queue, batch, forward per step

    answer, spans = asyncio.run(scenario())
    assert answer.status_code == 200 and answer.headers["traceresponse"].startswith(f"00-{TRACE_ID}-")
    (server,) = [s for s in spans if s.parent_span_id == PARENT]
    assert server.name == "POST /doubler/stream" and server.attributes["http.response.status_code"] == 200
    batches = [s for s in spans if s.name == "batch"]
    # planning, then one step per piece: "13.0" gives 4 characters, then the whole answer (which ends it)
    assert len(batches) == 1 + 4 + 1
    assert all(b.parent_span_id == server.span_id and b.attributes["batch.size"] == 1 for b in batches)
    assert len([s for s in spans if s.name == "forward"]) == len(batches)


def test_concurrent_requests_share_one_batch_span_each(stub_app, receiver):
    callers = [f"00-{i:032x}-{i:016x}-01" for i in range(1, 9)]

    async def scenario():
        async with serving(stub_app()) as client:
            answers = await asyncio.gather(
                *(client.post("/doubler", json={"x": 1, "sleep_ms": 20}, headers={"traceparent": c}) for c in callers)
            )
            return answers, [await arrived(receiver, f"{i:032x}", 4) for i in range(1, 9)]

    answers, traces = asyncio.run(scenario())
    assert {a.status_code for a in answers} == {200}
    sizes = []
    for spans in traces:
        (batch,) = [s for s in spans if s.name == "batch"]
        sizes.append(batch.attributes["batch.size"])
    assert max(sizes) > 1  # some requests waited for a forward pass and ran together: each trace says so


def test_a_refused_request_is_traced_with_its_status(stub_app, receiver):
    async def scenario():
        async with serving(stub_app(api_keys=["k"])) as client:
            answer = await client.post("/doubler", json={"x": 1}, headers={"traceparent": CALLER})
            return answer, await arrived(receiver, TRACE_ID, 1)

    answer, (server,) = asyncio.run(scenario())
    assert answer.status_code == 401 and "traceresponse" in answer.headers
    assert server.attributes["http.response.status_code"] == 401 and server.status_code == 0  # unset: a 4xx


def test_fastapi_itself_traces_no_request_even_where_a_global_provider_is_set(stub_app, monkeypatch):
    """FastAPI (0.142+) traces every request itself once a global tracer provider exists (an auto-instrumented
    process, FASTAPI_OTEL_AUTO_CONFIGURE): each request's second server span, made by the SDK on the event loop."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)

    async def scenario():
        async with serving(stub_app()) as client:
            return await client.post("/doubler", json={"x": 1}, headers={"traceparent": CALLER})

    assert asyncio.run(scenario()).status_code == 200
    assert exporter.get_finished_spans() == ()


def test_otel_variables_turn_tracing_off_or_stop_the_start():
    assert not Tracing({}).on
    assert Tracing({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}).on
    assert not Tracing({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}).on
    assert not Tracing({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}).on
    with pytest.raises(TracingConfigError, match="http/protobuf"):
        Tracing({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    with pytest.raises(TracingConfigError, match="otlp only"):
        Tracing({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "zipkin"})


@pytest.mark.parametrize(
    ("sampler", "roots_sampled", "callers_sampled"),
    [
        ("", True, True),  # the SDK's default, parentbased_always_on: sampled without asking it
        ("always_on", True, True),
        ("parentbased_traceidratio", False, True),  # with OTEL_TRACES_SAMPLER_ARG=0
        ("always_off", False, False),
    ],
)
def test_each_request_is_sampled_as_the_configured_sampler_says(monkeypatch, sampler, roots_sampled, callers_sampled):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    if sampler:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    else:
        monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    tracing = Tracing.from_environment()
    tracing.start()
    try:
        new = tracing.start_request("POST", {b"host": b"x"}, {}, "one")
        joined = tracing.start_request("POST", {b"traceparent": CALLER.encode()}, {}, "two")
    finally:
        tracing.stop()
    assert (
        new.sampled is roots_sampled
        and new.parent_id == 0
        and re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]", new.traceparent)
        and new.traceparent.endswith("01" if roots_sampled else "00")
    )
    assert joined.sampled is callers_sampled and (f"{joined.trace_id:032x}", f"{joined.parent_id:016x}") == (
        TRACE_ID,
        PARENT,
    )


def test_new_traces_ids_drawn_in_advance_are_unique_and_each_worker_draws_its_own(monkeypatch):
    """New traces take ids drawn a few hundred at a time: each request's are its own, past the first draw too, and a
    worker forked after a draw draws afresh rather than repeating its parent's."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    tracing = Tracing.from_environment()
    monkeypatch.setattr(tracing._pipe, "start", lambda: None)  # no exporter process: only the ids are looked at
    spans = [tracing.start_request("POST", {b"host": b"x"}, None, str(n)) for n in range(3 * IDS_AT_ONCE + 1)]
    parents = [span.traceparent for span in spans]
    assert all(re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", p) for p in parents)
    assert len({p[3:35] for p in parents}) == len({p[36:52] for p in parents}) == len(parents)
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # a worker: what the lifespan does after the fork, then one request
        tracing.start()
        os.write(writer, tracing.start_request("POST", {b"host": b"x"}, None, "worker").traceparent.encode())
        os._exit(0)
    os.waitpid(child, 0)
    in_worker = os.read(reader, 100).decode()
    in_parent = tracing.start_request("POST", {b"host": b"x"}, None, "parent").traceparent
    assert in_worker[3:35] != in_parent[3:35] and in_worker not in parents


def test_a_span_is_recorded_once_with_its_models_and_model_spans_after_its_end_on_their_own(monkeypatch):
    """A request's span carries the model spans noted before it ends; one noted after (a stream's last step) goes
    as its own record, under the same trace; a second end records nothing. Every record is one marshal writes."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    tracing = Tracing.from_environment()
    records: list[tuple] = []
    monkeypatch.setattr(tracing._pipe, "put", records.append)
    span = tracing.start_request("POST", {b"host": b"x"}, {"url.path": "/doubler"}, "one")
    CURRENT.set(CallContext("one", span=span))
    first, last = BatchTiming(2, 10, 11, 12, 13), BatchTiming(1, 20, 21, 22, 23)
    tracing.model_spans("doubler", "v1", 5, [first])
    tracing.end_request(span, "POST /doubler", {"http.response.status_code": 200}, False)
    tracing.model_spans("doubler", "v1", 15, [last, last])  # one batch named twice: its spans once
    tracing.end_request(span, "POST /doubler", {"http.response.status_code": 200}, False)
    assert [r[0] for r in records] == ["s", "m"] and marshal.loads(marshal.dumps(records)) == records
    own, late = records
    assert own[1] == late[1] == span.traceparent and own[7] == {
        "url.path": "/doubler",
        "http.response.status_code": 200,
    }
    assert own[-1] == [("doubler", "v1", 5, [(2, 10, 11, 12, 13)])] and late[-1] == [(1, 20, 21, 22, 23)]


def test_a_dead_collector_costs_no_answer_and_its_spans_are_counted(stub_app, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", dead)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")

    async def scenario():
        app = stub_app()
        async with serving(app) as client:
            answers = [await client.post("/doubler", json={"x": i}) for i in range(10)]
            for _ in range(100):  # the exporter's report comes back after its try (a second at most)
                metrics = (await client.get("/metrics")).text
                if metric(metrics, "trace_spans_dropped_total", reason="export_error"):
                    break
                await asyncio.sleep(0.1)
            return answers, metrics

    answers, metrics = asyncio.run(scenario())
    assert [a.status_code for a in answers] == [200] * 10
    assert metric(metrics, "trace_spans_dropped_total", reason="export_error") >= 4  # one request's at least
    assert metric(metrics, "trace_spans_sent_total") == 0


def test_an_exporter_that_dies_is_started_again(stub_app, receiver):
    """Spans recorded while the exporter process is down are dropped and counted; it is started again and the
    next request's spans arrive."""

    async def scenario():
        app = stub_app()
        async with serving(app) as client:
            pipe = app.state.registry.tracing._pipe
            pipe._child.kill()
            pipe._child.wait()
            pipe._started_at = time.monotonic()  # as if it had just been started: the next delivery drops
            lost = await client.post(
                "/doubler", json={"x": 1}, headers={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
            )
            await asyncio.sleep(0.3)
            pipe._started_at -= RESTART_AFTER_S  # a second later: the next delivery starts it again
            kept = await client.post("/doubler", json={"x": 2}, headers={"traceparent": CALLER})
            await asyncio.sleep(0.3)
            return lost, kept, (await client.get("/metrics")).text

    lost, kept, metrics = asyncio.run(scenario())
    assert lost.status_code == kept.status_code == 200
    assert metric(metrics, "trace_spans_dropped_total", reason="sender_down") == 4  # the lost request's four
    assert len(receiver.trace(TRACE_ID, at_least=4)) == 4 and not receiver.trace("1" * 32, at_least=1, timeout_s=1)


def test_a_full_queue_drops_records_and_reports_them():
    dropped: list[tuple[str, int]] = []
    pipe = ChildPipe(
        "unused", capacity=2, batch=10, delay_s=1, on_report=print, on_dropped=lambda r, x: dropped.append((r, len(x)))
    )
    for n in range(5):
        pipe.put(n)
    assert list(pipe._waiting) == [0, 1] and dropped == [("queue_full", 1)] * 3 and not pipe.has_room()


def test_spans_copied_from_a_routes_prototype_keep_their_own_ids_times_caller_and_status():
    """The exporter copies each span from one made once per route and status (or per batch): every copy still
    carries its own trace, ids, times, caller, request id and status, and none leaks into the next."""
    timing = (2, 1_100, 1_200, 1_300, 1_400)  # one batch of two: taken, forward pass started and ended, done
    route = {"http.request.method": "POST", "url.path": "/doubler", "http.route": "/doubler"}
    batches = Batches(resource(), 512)
    # request ids of one character and of the 64 a client's may have, at the ends of the exporter's table
    for trace_id, own, parent, state, request_id, status, enqueued in (
        (1, 11, 0, "", "f", 200, 1_050),
        (2, 22, 33, "vendor=x", "second", 500, 1_060),
        (3, 44, 0, "", "t" * 64, 200, 1_070),
    ):
        traceparent = f"00-{trace_id:032x}-{own:016x}-01"
        batches.add(("s", traceparent, parent, state, "POST /doubler", enqueued, 2_000 + trace_id,
                     {**route, "http.response.status_code": status}, request_id, status >= 500,
                     [("doubler", "v1", enqueued, [timing])]))  # fmt: skip
    ((body, count),) = batches.take()
    request = ExportTraceServiceRequest.FromString(body)  # as a collector reads it
    assert [s.scope.name for s in request.resource_spans[0].scope_spans] == ["service"]
    assert {a.key for a in request.resource_spans[0].resource.attributes} >= {"service.name"}
    spans = list(request.resource_spans[0].scope_spans[0].spans)
    assert len(spans) == count == 3 * 4
    for n, (trace_id, own, parent, state, flags, request_id, failed, enqueued) in enumerate(
        (
            (1, 11, 0, "", 0x101, "f", False, 1_050),
            (2, 22, 33, "vendor=x", 0x301, "second", True, 1_060),
            (3, 44, 0, "", 0x101, "t" * 64, False, 1_070),
        )
    ):
        server, queue, batch, forward = spans[4 * n : 4 * n + 4]
        trace_bytes, own_bytes = trace_id.to_bytes(16, "big"), own.to_bytes(8, "big")
        assert {s.trace_id for s in (server, queue, batch, forward)} == {trace_bytes}
        assert {s.trace_state for s in (server, queue, batch, forward)} == {state}
        assert server.span_id == own_bytes and server.flags == flags
        assert server.parent_span_id == (parent.to_bytes(8, "big") if parent else b"")
        assert (server.start_time_unix_nano, server.end_time_unix_nano) == (enqueued, 2_000 + trace_id)
        assert server.status.code == (2 if failed else 0)  # ERROR for a 5xx, else unset
        attributes = {a.key: a.value for a in server.attributes}
        assert attributes["request.id"].string_value == request_id and len(attributes) == 5
        assert attributes["http.response.status_code"].int_value == (500 if failed else 200)
        assert queue.name == "queue" and queue.parent_span_id == own_bytes
        assert (queue.start_time_unix_nano, queue.end_time_unix_nano) == (enqueued, 1_100)
        assert batch.parent_span_id == own_bytes and forward.parent_span_id == batch.span_id
        assert (batch.start_time_unix_nano, batch.end_time_unix_nano) == (1_100, 1_400)
        assert (forward.start_time_unix_nano, forward.end_time_unix_nano) == (1_200, 1_300)
        assert {a.key: a.value.int_value for a in batch.attributes}["batch.size"] == 2
        assert len({s.span_id for s in (server, queue, batch, forward)}) == 4


def test_the_exporter_posts_over_urllib3_unless_a_proxy_tls_or_a_credential_provider_needs_a_requests_session(
    monkeypatch,
):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector.example:4318")
    assert type(http_client()["_transport"]).__name__ == "Urllib3HTTPTransport"  # a plain http:// collector
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    made = http_client()["session"]  # the proxy read once, and only then
    assert made.proxies["http"] == "http://proxy.example:3128" and not made.trust_env
    monkeypatch.setenv("NO_PROXY", "collector.example")
    assert "_transport" in http_client()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector.example:4318")
    assert "session" in http_client()  # TLS: requests reads the certificate variables (OTEL_*, REQUESTS_CA_BUNDLE)
    monkeypatch.setenv("OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER", "a-provider")
    assert http_client() == {}  # the SDK loads the provider's session itself
