"""The Open Inference Protocol v2 over gRPC (``SERVE_GRPC_PORT``), beside the REST routes.

A gRPC request is turned into the REST form (a JSON header, and the raw input contents as the binary
extension's data) and goes through ``service.v2.run_inference``: the same tensors, validation, batcher,
queue and limits as ``POST /v2/models/{m}/infer``. Outputs go back as ``raw_output_contents``, as Triton
sends them. The API key comes in the ``x-api-key`` or ``authorization: Bearer`` metadata. The standard gRPC
health service reports SERVING once every model is loaded.
"""

import asyncio
import logging
import time
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.memory import TRIM_AFTER_BYTES, trim_soon
from service.middleware import SAFE_REQUEST_ID, Gate
from service.registry import Registry
from service.v2 import (
    ProtocolError,
    field_tensors,
    find_entry,
    model_config,
    output_descriptions,
    output_tensors,
    read_request,
    run_inference,
    tensor_bytes,
)
from service.routes import off_loop
from service.v2_grpc import inference_pb2 as pb
from service.v2_grpc import inference_pb2_grpc as pb_grpc

log = logging.getLogger("service.grpc")
STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
          422: grpc.StatusCode.INVALID_ARGUMENT, 503: grpc.StatusCode.UNAVAILABLE,
          504: grpc.StatusCode.DEADLINE_EXCEEDED}
# The typed contents field of each datatype, for requests that do not send raw bytes.
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _parameters(params) -> dict:
    return {key: getattr(value, value.WhichOneof("parameter_choice")) for key, value in params.items()
            if value.WhichOneof("parameter_choice")}


def as_rest_request(request: pb.ModelInferRequest) -> tuple[dict, list[bytes]]:
    """The request as the REST form takes it: a JSON-like header, and the raw contents, one per input."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per input")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        spec = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
                "parameters": _parameters(tensor.parameters)}
        if raw:
            spec["parameters"]["binary_data_size"] = len(raw[i])
        elif tensor.datatype in CONTENTS:
            values = list(getattr(tensor.contents, CONTENTS[tensor.datatype]))
            spec["data"] = values
        inputs.append(spec)
    header = {"id": request.id, "inputs": inputs, "parameters": {"binary_data_output": True},
              "outputs": [{"name": o.name, "parameters": {"binary_data": True}} for o in request.outputs]}
    return header, raw


def read_grpc_request(entry, request: pb.ModelInferRequest, max_instances: int):
    """The request's instances and outputs, as :func:`service.v2.read_request` reads a REST one."""
    header, binary = as_rest_request(request)
    return read_request(entry, header, binary, max_instances)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, registry: Registry, gate: Gate, name: str, version: str):
        self.registry, self.gate, self.name, self.version = registry, gate, name, version

    def _ready(self) -> bool:
        return all(e.state == "ready" and e.batcher is not None for e in self.registry.entries.values())

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=self.name, version=self.version, extensions=["binary_tensor_data"])

    async def ModelReady(self, request, context):
        entry = await self._entry(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=bool(entry.ready_versions()) and (bool(request.version) or entry.state == "ready"))

    async def ModelMetadata(self, request, context):
        entry = await self._entry(request.name, request.version, context)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=entry.name, versions=entry.ready_versions(), platform="pytorch",
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in field_tensors(entry)],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in output_descriptions(entry)])

    async def ModelConfig(self, request, context):
        config = model_config(await self._entry(request.name, request.version, context))
        return pb.ModelConfigResponse(config=pb.ModelConfig(
            name=config["name"], platform=config["platform"], backend=config["backend"],
            max_batch_size=config["max_batch_size"], input=[pb.ModelInput(**t) for t in config["input"]],
            output=[pb.ModelOutput(**t) for t in config["output"]]))

    async def ModelInfer(self, request, context):
        start = time.perf_counter()
        entry = await self._entry(request.model_name, request.model_version, context)
        size = request.ByteSize()
        try:
            instances, wanted, _ = await off_loop(size, read_grpc_request, entry, request,
                                                  self.registry.settings.max_batch_instances)
            outputs, answered_by = await run_inference(self.registry, entry, instances, request.model_version or None)
            failure = None
        except ProtocolError as exc:
            failure = STATUS.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), str(exc)
        except Exception:
            request_id = request_id_of(context)
            log.exception("unhandled error in a gRPC call", extra={"request_id": request_id, "route": "ModelInfer"})
            failure = grpc.StatusCode.INTERNAL, f"internal error; quote request id {request_id} when reporting it"
        if size > TRIM_AFTER_BYTES:
            trim_soon()
        if failure is not None:  # aborted outside the except: its error would otherwise carry the one caught,
            del request  # whose traceback holds the frames with the message's megabytes until a full collection
            await context.abort(*failure)
        response = pb.ModelInferResponse(model_name=entry.name, id=request.id, model_version=answered_by)
        for name, datatype, shape, values in output_tensors(outputs, wanted):
            response.outputs.add(name=name, datatype=datatype, shape=shape)
            response.raw_output_contents.append(tensor_bytes(datatype, values))
        log.debug("grpc infer %s in %.2f ms", entry.name, (time.perf_counter() - start) * 1000)
        return response

    async def _entry(self, name: str, version: str, context):
        try:
            return find_entry(self.registry, name, version or None)
        except ProtocolError as exc:
            await context.abort(STATUS[exc.status], str(exc))


def request_id_of(context) -> str:
    """The caller's x-request-id metadata if it is a plain token (it goes into logs), else a new one."""
    given = dict(context.invocation_metadata()).get("x-request-id", "")
    return given if isinstance(given, str) and SAFE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


OPEN_METHODS = frozenset({"/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady",
                          "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})  # probes send no key


class CallGuard(grpc.aio.ServerInterceptor):
    """What a gRPC caller can make the server hold, decided on the call's metadata, before its message:

    - the API key: a call without a valid one is answered UNAUTHENTICATED by a handler that never reads the
      message (a unary handler receives the whole message first: keyless 8 MB calls took gigabytes);
    - the message must arrive within SERVE_REQUEST_READ_TIMEOUT_S, as an HTTP request must;
    - at most SERVE_GRPC_MAX_CALLS calls in progress per process. A call over it makes room by cancelling
      the call that has waited longest for its message (a slow or stalled client), as the HTTP protocol
      closes the longest-waiting connection; only when every call has its message is it refused with
      RESOURCE_EXHAUSTED. So 10,000 calls that never send their message cannot lock out a real client.

    Every unary method is served as a stream-unary one for this: its handler reads the message itself."""

    def __init__(self, gate: Gate, max_calls: int, read_timeout_s: float):
        self.gate, self.max_calls, self.read_timeout_s = gate, max_calls, read_timeout_s
        self.waiting: dict[asyncio.Task, None] = {}  # calls waiting for their message, oldest first
        self.working = 0                               # calls with their message, being answered
        self.evicted: set[asyncio.Task] = set()        # waiting calls told to give their place
        self.refuse = grpc.stream_unary_rpc_method_handler(self._unauthenticated)

    async def intercept_service(self, continuation, details):
        metadata = {k.encode(): v.encode() for k, v in details.invocation_metadata or () if isinstance(v, str)}
        if self.gate.api_keys and details.method not in OPEN_METHODS and not self.gate.has_valid_key(metadata):
            return self.refuse
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler  # unknown (UNIMPLEMENTED), or the health service's Watch

        async def guarded(requests, context):
            return await self._serve(handler.unary_unary, context)
        return grpc.stream_unary_rpc_method_handler(guarded, request_deserializer=handler.request_deserializer,
                                                    response_serializer=handler.response_serializer)

    async def _serve(self, behavior, context):
        if len(self.waiting) + self.working >= self.max_calls:
            if not self.waiting:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server is answering its limit of "
                                    f"{self.max_calls} gRPC calls (SERVE_GRPC_MAX_CALLS); retry shortly")
            oldest = next(iter(self.waiting))
            self.waiting.pop(oldest)
            self.evicted.add(oldest)
            oldest.cancel()  # the longest-waiting call gives its place (it answers for itself, below)
        task = asyncio.current_task()
        self.waiting[task] = None
        try:
            async with asyncio.timeout(self.read_timeout_s):
                request = await context.read()
        except asyncio.CancelledError:
            if task not in self.evicted:
                raise
            self.evicted.discard(task)
            task.uncancel()  # a cancelled handler alone would leave its call open: end it with a status
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"this call waited longest for its message while the "
                                f"server holds its limit of {self.max_calls} gRPC calls (SERVE_GRPC_MAX_CALLS); "
                                "send the message with the call, and retry")
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"the request message did not arrive within "
                                f"{self.read_timeout_s:g} s (SERVE_REQUEST_READ_TIMEOUT_S); send it at once")
        except Exception:  # a message over the cap (RESOURCE_EXHAUSTED), a broken stream: what grpc held is freed
            trim_soon()
            raise
        finally:
            self.waiting.pop(task, None)
        if request is grpc.aio.EOF:
            trim_soon()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended without its request message")
        self.working += 1
        try:
            return await behavior(request, context)
        finally:
            self.working -= 1

    @staticmethod
    async def _unauthenticated(requests, context) -> None:
        trim_soon()  # what grpc buffered of the unread message is freed: give it back
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key: send it in the x-api-key "
                            "metadata or as 'authorization: Bearer <key>'")


async def start_grpc(registry: Registry, gate: Gate, host: str, port: int, max_message_bytes: int,
                     name: str, version: str) -> grpc.aio.Server:
    """Serve the protocol and the standard health service on host:port (several workers share the port:
    grpc sets SO_REUSEPORT on Linux). A message is at most what the largest v2 REST body may be; calls in
    progress are capped per process (more: RESOURCE_EXHAUSTED at once) and per connection."""
    settings = registry.settings
    guard = CallGuard(gate, settings.grpc_max_calls, settings.request_read_timeout_s)
    server = grpc.aio.server(  # grpc's own cap far above ours: only ours decides, by the rule above
        interceptors=[guard], maximum_concurrent_rpcs=4 * settings.grpc_max_calls,
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", max_message_bytes),
                 ("grpc.max_concurrent_streams", settings.grpc_max_calls_per_connection)])
    servicer = InferenceServicer(registry, gate, name, version)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    status = health_pb2.HealthCheckResponse.SERVING if servicer._ready() else health_pb2.HealthCheckResponse.NOT_SERVING
    await health_servicer.set("", status)
    await health_servicer.set("inference.GRPCInferenceService", status)
    log.info("serving the v2 protocol over gRPC on %s:%d", host, port)
    return server
