"""The Open Inference Protocol v2 over gRPC (``SERVE_GRPC_PORT``), beside the REST routes.

A gRPC request is turned into the REST form (a JSON header, and the raw input contents as the binary
extension's data) and goes through ``service.v2.run_inference``: the same tensors, validation, batcher,
queue and limits as ``POST /v2/models/{m}/infer``. Outputs go back as ``raw_output_contents``, as Triton
sends them. The API key comes in the ``x-api-key`` or ``authorization: Bearer`` metadata. The standard gRPC
health service reports SERVING once every model is loaded.
"""

import logging
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.middleware import Gate
from service.registry import Registry
from service.v2 import (
    ProtocolError,
    field_tensors,
    find_entry,
    model_config,
    output_descriptions,
    output_tensors,
    run_inference,
    tensor_bytes,
)
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


def as_rest_request(request: pb.ModelInferRequest) -> tuple[dict, bytes]:
    """The request as the REST form takes it: a JSON-like header, and the raw contents as binary data."""
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
    return header, b"".join(raw)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, registry: Registry, gate: Gate, name: str, version: str):
        self.registry, self.gate, self.name, self.version = registry, gate, name, version

    def _ready(self) -> bool:
        return all(e.state == "ready" and e.batcher is not None for e in self.registry.entries.values())

    async def _check_key(self, context) -> None:
        if self.gate.api_keys:
            metadata = {k.encode(): v.encode() for k, v in context.invocation_metadata() if isinstance(v, str)}
            if not self.gate.has_valid_key(metadata):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key: send it in the "
                                    "x-api-key metadata or as 'authorization: Bearer <key>'")

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._ready())

    async def ServerMetadata(self, request, context):
        await self._check_key(context)
        return pb.ServerMetadataResponse(name=self.name, version=self.version, extensions=["binary_tensor_data"])

    async def ModelReady(self, request, context):
        await self._check_key(context)
        entry = await self._entry(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=bool(entry.ready_versions()) and (bool(request.version) or entry.state == "ready"))

    async def ModelMetadata(self, request, context):
        await self._check_key(context)
        entry = await self._entry(request.name, request.version, context)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=entry.name, versions=entry.ready_versions(), platform="pytorch",
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in field_tensors(entry)],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in output_descriptions(entry)])

    async def ModelConfig(self, request, context):
        await self._check_key(context)
        config = model_config(await self._entry(request.name, request.version, context))
        return pb.ModelConfigResponse(config=pb.ModelConfig(
            name=config["name"], platform=config["platform"], backend=config["backend"],
            max_batch_size=config["max_batch_size"], input=[pb.ModelInput(**t) for t in config["input"]],
            output=[pb.ModelOutput(**t) for t in config["output"]]))

    async def ModelInfer(self, request, context):
        start = time.perf_counter()
        await self._check_key(context)
        entry = await self._entry(request.model_name, request.model_version, context)
        try:
            header, binary = as_rest_request(request)
            outputs, wanted, _, answered_by = await run_inference(self.registry, entry, header, binary,
                                                                  request.model_version or None)
        except ProtocolError as exc:
            await context.abort(STATUS.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), str(exc))
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


async def start_grpc(registry: Registry, gate: Gate, host: str, port: int, max_message_bytes: int,
                     name: str, version: str) -> grpc.aio.Server:
    """Serve the protocol and the standard health service on host:port (several workers share the port:
    grpc sets SO_REUSEPORT on Linux)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max_message_bytes)])
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
