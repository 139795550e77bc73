"""The Open Inference Protocol v2 over REST (KServe v2 / Triton), so tritonclient and KServe clients work.

Each model's tensors follow its JSON schema, one named input per field (the pandas-style convention
MLServer uses), row i of every input being instance i:

- numbers are ``FP64`` (any numeric datatype is accepted), integers ``INT64``, text and categories
  ``BYTES`` (UTF-8), flags ``BOOL``; a missing value is ``NaN`` or an empty string;
- a field that holds a list takes a tensor with the list in its trailing dimensions: ``pixels`` is
  ``UINT8``/``FP32`` ``[-1, 28, 28]`` or ``[-1, 784]``;
- outputs are the JSON answer's fields: numbers, integers, text and fixed-length lists of numbers as
  tensors, anything nested (fashion's ``top``, poem's ``lines``) as one JSON string per row (``BYTES``).

Requests go through the model's batcher like ``/{model}/batch`` (the same validation, queue, key, body
limit and metrics). Triton's binary tensor extension is supported both ways: inputs after the JSON header
(``Inference-Header-Content-Length``), outputs as binary when asked (``binary_data``).
"""


import json
import math
import struct
from typing import Annotated, Any

import numpy as np
import pydantic_core
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from service.batching import PredictionTimeoutError, QueueFullError
from service.models.base import InputError
from service.registry import ModelEntry, ModelUnavailableError, Registry, VersionNotFoundError
from service.routes import DirectRoute, off_loop

NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
         "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
         "FP32": np.float32, "FP64": np.float64}
HEADER_LENGTH = "inference-header-content-length"


class V2Error(BaseModel):
    error: str


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    why = {400: "The request does not follow the protocol (what to send instead is in the message).",
           401: "API keys are configured and none (or a wrong one) was sent.",
           404: "No such model or version.", 413: "The body is larger than the model's batch route takes.",
           422: "A tensor's value breaks the model's input rules (the message names the instance and input).",
           503: "The model is not loaded, or its queue is full (see Retry-After).",
           504: "The prediction took longer than the request timeout."}
    return {status: {"model": V2Error, "description": why[status]} for status in statuses}


INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {
        "type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object"},
            "inputs": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["name", "shape", "datatype"],
                       "properties": {"name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
                                      "datatype": {"enum": [*NUMPY, "BYTES"]}, "parameters": {"type": "object"},
                                      "data": {"type": "array"}}}},
            "outputs": {"type": "array", "items": {"type": "object", "required": ["name"],
                        "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}}}}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}, "description": (
        "The binary tensor extension: the JSON request (its length in Inference-Header-Content-Length), "
        "then the inputs' bytes.")}}}}


class ProtocolError(Exception):
    """A request that does not follow the protocol or the model's tensors: a 4xx with ``{"error": ...}``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- tensors <-> values


def decode_bytes_tensor(raw: bytes | memoryview, count: int) -> list[bytes]:
    """Triton's binary BYTES layout: each element is a 4-byte little-endian length, then its bytes; more
    elements than the shape's ``count`` are refused as soon as they are found."""
    items, at = [], 0
    while at < len(raw):
        if len(items) == count:
            raise ProtocolError(f"a BYTES tensor's binary data holds more than the {count} elements of its shape")
        if at + 4 > len(raw):
            raise ProtocolError("a BYTES tensor's binary data ends inside an element's length")
        (size,) = struct.unpack_from("<I", raw, at)
        items.append(bytes(raw[at + 4:at + 4 + size]))
        at += 4 + size
    if at != len(raw):
        raise ProtocolError("a BYTES tensor's binary data ends inside an element")
    return items


def encode_bytes_tensor(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def tensor_bytes(datatype: str, values: list) -> bytes:
    """An output tensor's raw contents (binary extension, gRPC): little-endian numbers, or BYTES framing."""
    if datatype == "BYTES":
        return encode_bytes_tensor([v.encode() for v in values])
    return np.asarray(values, dtype=np.dtype(NUMPY[datatype]).newbyteorder("<")).tobytes()


MAX_DIMS = 4  # instances, then at most a picture's rows and columns (and one more): no model takes more
MAX_ROW_VALUES = 4096  # values of one input in one instance (a 28x28 picture: 784)


def row_values(entry: ModelEntry) -> dict[str, int]:
    """The most values each input takes per instance: what its metadata shape says (a 28x28 picture: 784), one
    for a field of one value, MAX_ROW_VALUES for a list of any length. Fixed for the entry's schema."""
    found = _ROW_VALUES.get(entry.Input)
    if found is None:
        properties = entry.Input.model_json_schema().get("properties", {})  # by alias, as clients name them
        declared = {t["name"]: t["shape"][1:] for t in field_tensors(entry)}

        def most(name: str) -> int:
            shape = declared.get(name)
            if shape is not None and all(d > 0 for d in shape):
                return math.prod(shape)
            prop = properties.get(name, {})
            is_list = any(p.get("type") == "array" for p in prop.get("anyOf", [prop]))
            return MAX_ROW_VALUES if is_list or shape else 1
        found = _ROW_VALUES[entry.Input] = {name: most(name) for name in [*properties, *declared]}
    return found


_ROW_VALUES: dict[type[BaseModel], dict[str, int]] = {}


def input_array(spec: dict, binary: bytes | memoryview | None, max_instances: int,
                rows: dict[str, int]) -> np.ndarray:
    """One request input as an array of its declared shape (BYTES as an object array of bytes). The name and
    shape are checked first, so that nothing is built from a shape no model takes (``[10**30, 0]``, 65
    dimensions, a million values where the model takes one per instance)."""
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if not isinstance(name, str) or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError("each input needs a name, a datatype and a shape of non-negative integers")
    if name not in rows:
        raise ProtocolError(f"no input named {name[:100]!r}; inputs: {', '.join(rows)}")
    if not isinstance(datatype, str) or (datatype != "BYTES" and datatype not in NUMPY):
        raise ProtocolError(f"input '{name}' has datatype {datatype!r}; use one of {', '.join([*NUMPY, 'BYTES'])}")
    if len(shape) > MAX_DIMS or (shape and shape[0] > max_instances) or math.prod(shape[1:]) > rows[name]:
        raise ProtocolError(f"input '{name}' has shape {str(shape)[:100]}; send [instances, ...] with 1 to "
                            f"{max_instances} instances (SERVE_MAX_BATCH_INSTANCES), at most {MAX_DIMS} dimensions "
                            f"and {rows[name]} values per instance (GET /v2/models/{{model}} lists the shapes)")
    count = math.prod(shape)
    if binary is not None:
        if datatype == "BYTES":
            values = np.array(decode_bytes_tensor(binary, count), dtype=object)
        else:
            dtype = np.dtype(NUMPY[datatype]).newbyteorder("<")
            if len(binary) != count * dtype.itemsize:
                raise ProtocolError(f"input '{name}' has {len(binary)} bytes of data, but {shape} {datatype} takes "
                                    f"{count * dtype.itemsize}")
            values = np.frombuffer(binary, dtype)
    else:
        data = spec.get("data")
        if data is None:
            raise ProtocolError(f"input '{name}' has neither 'data' nor binary data")
        values = np.array(_flatten(data), dtype=object if datatype == "BYTES" else None)
        if datatype == "BYTES":
            values = np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=object)
    if values.size != count:
        raise ProtocolError(f"input '{name}' holds {values.size} values, but its shape {shape} needs {count}")
    return values.reshape(shape)


def _flatten(data: Any) -> list:
    """The leaves of nested lists, in order (iteratively: a deeply nested body must not exhaust the stack)."""
    out, stack = [], [iter([data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _params(obj: dict, what: str) -> dict:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ProtocolError(f"the 'parameters' of {what} must be a JSON object")
    return params


def _value(x: Any) -> Any:
    """One tensor element as the JSON value the schema validates: NaN and b"" are missing."""
    if isinstance(x, bytes):
        try:
            return x.decode("utf-8", errors="strict") or None
        except UnicodeDecodeError:
            raise ProtocolError("a BYTES element is not UTF-8 text; send text as UTF-8") from None
    if isinstance(x, np.ndarray):  # a list-valued field's row: numeric arrays stay arrays for the validator
        return x if x.dtype.kind in "uif" else x.tolist()
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(x) else float(x)
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    return x


def output_tensors(predictions: list[BaseModel], fields: list[str]) -> list[tuple[str, str, list[int], Any]]:
    """(name, datatype, shape, values) per answer field, in the answer's order."""
    rows = [p.model_dump(mode="json") for p in predictions]
    tensors = []
    for field in fields:
        column = [row[field] for row in rows]
        first = column[0]
        if isinstance(first, bool):
            tensors.append((field, "BOOL", [len(column)], column))
        elif isinstance(first, int):
            tensors.append((field, "INT64", [len(column)], column))
        elif isinstance(first, float):
            tensors.append((field, "FP64", [len(column)], column))
        elif isinstance(first, str):
            tensors.append((field, "BYTES", [len(column)], column))
        elif (isinstance(first, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in first)
              and len({len(c) for c in column}) == 1):
            tensors.append((field, "FP64", [len(column), len(first)], column))
        else:
            tensors.append((field, "BYTES", [len(column)], [json.dumps(c, ensure_ascii=False) for c in column]))
    return tensors


# ---------------------------------------------------------------- metadata


def field_tensors(entry: ModelEntry) -> list[dict]:
    """Each input field as a v2 tensor description, from the model's JSON schema."""
    schema = entry.Input.model_json_schema()
    declared = entry.predictor.v2_tensors
    tensors = []
    for name, prop in schema.get("properties", {}).items():
        if name in entry.predictor.v2_hidden:
            continue
        kinds = {p.get("type") for p in prop.get("anyOf", [prop])} - {"null", None}
        codes = [v for p in prop.get("anyOf", [prop]) for v in p.get("enum", []) if v is not None]
        if codes:  # categories: integer codes (MSSubClass) stay integers, the rest are text
            kinds = {"integer"} if all(isinstance(v, int) for v in codes) else {"string"}
        datatype = ("BYTES" if "string" in kinds else "BOOL" if kinds == {"boolean"}
                    else "INT64" if kinds == {"integer"} else "FP64")
        datatype, shape = declared.get(name, (datatype, [-1, -1] if "array" in kinds else [-1]))
        tensors.append({"name": name, "datatype": datatype, "shape": shape,  # a packed tensor can stand in for it
                        "optional": name not in schema.get("required", []) or bool(entry.predictor.v2_packed)})
    if entry.predictor.v2_packed:
        name, columns = entry.predictor.v2_packed
        tensors.append({"name": name, "datatype": "FP64", "shape": [-1, len(columns)], "optional": True,
                        "columns": list(columns)})  # in place of the named inputs above
    return tensors


def output_descriptions(entry: ModelEntry) -> list[dict]:
    example = entry.predictor.Output.model_json_schema().get("properties", {})
    out = []
    for name, prop in example.items():
        kind = prop.get("type")
        datatype = {"integer": "INT64", "number": "FP64", "string": "BYTES", "boolean": "BOOL"}.get(kind, "BYTES")
        shape = [-1]
        if kind == "array" and prop.get("items", {}).get("type") == "number" and prop.get("maxItems") == prop.get("minItems"):
            datatype, shape = "FP64", [-1, prop["maxItems"]]
        out.append({"name": name, "datatype": datatype, "shape": shape})
    return out


def model_config(entry: ModelEntry) -> dict:
    """Triton's model configuration extension (what ``perf_analyzer`` reads before it sends anything): the
    metadata's tensors with their full shapes, the first dimension being the instances (``max_batch_size``
    0: Triton's own batch dimension is not used; the service batches requests itself)."""
    def tensor(t: dict) -> dict:
        return {"name": t["name"], "data_type": "TYPE_STRING" if t["datatype"] == "BYTES" else f"TYPE_{t['datatype']}",
                "dims": t["shape"]}
    return {"name": entry.name, "platform": "pytorch", "backend": "pytorch", "max_batch_size": 0,
            "input": [{**tensor(t), "optional": t["optional"]} for t in field_tensors(entry)],
            "output": [tensor(t) for t in output_descriptions(entry)]}


# ---------------------------------------------------------------- routes


def v2_router(registry: Registry, server_name: str, server_version: str, hot: APIRouter) -> APIRouter:
    """The protocol's routes; inference (without a version) goes on ``hot`` (matched first, see
    routes.model_router)."""
    router = APIRouter(tags=["open inference protocol v2"])

    def error(message: str, status: int) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def entry_of(model: str, version: str | None) -> ModelEntry:
        return find_entry(registry, model, version)

    @router.get("/v2", summary="Server metadata (v2)", operation_id="v2_server_metadata")
    async def server_metadata() -> dict:
        return {"name": server_name, "version": server_version, "extensions": ["binary_tensor_data"]}

    @router.get("/v2/health/live", summary="Server live (v2)", operation_id="v2_live")
    async def live() -> dict:
        return {"live": True}

    @router.get("/v2/health/ready", summary="Server ready (v2)", operation_id="v2_ready",
                responses={503: {"description": "A model is not loaded: {\"ready\": false}."}})
    async def ready() -> JSONResponse:
        ok = all(e.state == "ready" and e.batcher is not None for e in registry.entries.values())
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    names = list(registry.entries)
    versions = [e.artifact.manifest.version for e in registry.entries.values() if e.artifact is not None]
    Model = Annotated[str, Path(description="A served model's name.", examples=names)]
    Version = Annotated[str, Path(description="Its version (GET /v2/models/{model}).", examples=versions)]

    def routes_for(handler):
        """The handler on both paths: without a version (the served one), and with one."""
        async def served(model: Model, request: Request) -> Response:
            return await handler(model, request, None)

        async def pinned(model: Model, version: Version, request: Request) -> Response:
            return await handler(model, request, version)
        return served, pinned

    async def model_metadata(model: str, request: Request, version: str | None) -> JSONResponse:
        try:
            entry = entry_of(model, version)
        except ProtocolError as exc:
            return error(str(exc), exc.status)
        return JSONResponse({"name": model, "versions": entry.ready_versions(), "platform": "pytorch",
                             "inputs": field_tensors(entry), "outputs": output_descriptions(entry)})

    async def model_ready(model: str, request: Request, version: str | None) -> JSONResponse:
        try:
            entry = entry_of(model, version)
        except ProtocolError as exc:
            return error(str(exc), exc.status)
        ok = bool(entry.ready_versions()) and (version is not None or entry.state == "ready")
        return JSONResponse({"name": model, "ready": ok}, status_code=200 if ok else 503)

    async def config(model: str, request: Request, version: str | None) -> JSONResponse:
        try:
            entry = entry_of(model, version)
        except ProtocolError as exc:
            return error(str(exc), exc.status)
        return JSONResponse(model_config(entry))

    async def infer(model: str, request: Request, version: str | None) -> Response:
        try:
            entry = entry_of(model, version)
            body = await request.body()
            header, (instances, wanted, as_binary) = await off_loop(
                len(body), read_rest_request, entry, body, request.headers.get(HEADER_LENGTH),
                registry.settings.max_batch_instances)
            outputs, answered_by = await run_inference(registry, entry, instances, version)
        except ProtocolError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status,
                                headers={"Retry-After": "1"} if exc.status == 503 else None)
        return write_response(entry, answered_by, header.get("id"), outputs, wanted, as_binary)

    routes = {"metadata": routes_for(model_metadata), "ready": routes_for(model_ready), "infer": routes_for(infer),
              "config": routes_for(config)}
    for prefix, which, suffix in (("/v2/models/{model}", 0, ""), ("/v2/models/{model}/versions/{version}", 1, "_version")):
        router.add_api_route(prefix, routes["metadata"][which], methods=["GET"], summary="Model metadata (v2)",
                             operation_id="v2_model_metadata" + suffix, responses=_errors(401, 404))
        router.add_api_route(prefix + "/ready", routes["ready"][which], methods=["GET"], summary="Model ready (v2)",
                             operation_id="v2_model_ready" + suffix, responses=_errors(401, 404, 503))
        router.add_api_route(prefix + "/config", routes["config"][which], methods=["GET"],
                             summary="Model configuration (Triton's extension, for perf_analyzer)",
                             operation_id="v2_model_config" + suffix, responses=_errors(401, 404))
        (router if which else hot).add_api_route(  # the default version's inference is a hot route
            prefix + "/infer", routes["infer"][which], methods=["POST"], tags=router.tags,
            summary="Inference (v2, JSON or binary)", operation_id="v2_infer" + suffix,
            openapi_extra=INFER_BODY, responses=_errors(400, 401, 404, 413, 422, 503, 504), route_class_override=DirectRoute)
    return router


def find_entry(registry: Registry, model: str, version: str | None) -> ModelEntry:
    """The served model, checking that a version named is loaded (404 otherwise)."""
    entry = registry.entries.get(model)
    if entry is None:
        raise ProtocolError(f"no model named '{model}'; models: {', '.join(registry.entries)}", 404)
    if version and version not in entry.ready_versions():
        raise ProtocolError(f"model '{model}' has no version '{version}' loaded (loaded: "
                            f"{', '.join(entry.ready_versions()) or 'none'})", 404)
    return entry


def read_rest_request(entry: ModelEntry, body: bytes, header_length: str | None,
                      max_instances: int) -> tuple[dict, tuple[list[BaseModel], list[str], set[str]]]:
    """A REST body (JSON, or JSON and binary tensors) as its JSON header and :func:`read_request`'s result."""
    most_values = 2 * max_instances * sum(row_values(entry).values()) + 1024  # room for nested shapes' commas
    header, binary = parse_body(body, header_length, most_values)
    return header, read_request(entry, header, binary, max_instances)


async def run_inference(registry: Registry, entry: ModelEntry, instances: list[BaseModel],
                        version: str | None = None) -> tuple[list[BaseModel], str]:
    """The predictions for a v2 request's instances (REST or gRPC) and the version that answered (the one
    named, else as the model's default and split choose). Every failure is a ProtocolError with its status."""
    try:
        outputs, answered_by = await registry.submit(entry, instances, version)
    except VersionNotFoundError as exc:
        raise ProtocolError(str(exc), 404) from None
    except (QueueFullError, ModelUnavailableError) as exc:
        raise ProtocolError(str(exc), 503) from None
    except PredictionTimeoutError as exc:
        raise ProtocolError(str(exc), 504) from None
    for i, out in enumerate(outputs):
        if isinstance(out, InputError):
            raise ProtocolError(f"instance {i}: {out}", 422)
        if isinstance(out, Exception):
            raise out
    return outputs, answered_by


def parse_body(body: bytes, header_length: str | None, most_values: int) -> tuple[dict, bytes]:
    """The JSON header and the binary data after it (empty without the binary extension). A JSON part with
    more values (commas) than ``most_values`` is refused before it is parsed: parsing holds the interpreter
    (even on a thread) for as long as it takes, 85 ms for 8 MB of small numbers."""
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise ProtocolError(f"{HEADER_LENGTH} must be the JSON header's length in bytes, at most the body's")
        json_part, binary = body[:int(header_length)], body[int(header_length):]
    else:
        json_part, binary = body, b""
    if json_part.count(b",") > most_values:
        raise ProtocolError(f"the request's JSON holds more values than {most_values}, the most its model's inputs "
                            "take for SERVE_MAX_BATCH_INSTANCES instances; send fewer instances per request", 413)
    try:
        header = pydantic_core.from_json(json_part)
    except ValueError as exc:  # not JSON, not UTF-8, nested too deep
        raise ProtocolError(f"the request's JSON could not be read: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise ProtocolError("the request must be a JSON object with a non-empty 'inputs' list")
    return header, binary


def read_request(entry: ModelEntry, header: dict, binary: bytes | list[bytes],
                 max_instances: int) -> tuple[list[BaseModel], list[str], set[str]]:
    """The validated instances, the outputs asked for, and which of them to send as binary. ``binary`` is the
    REST body's data after the JSON (each input's part a view of it, not a copy) or gRPC's raw contents, one
    per input that declares a ``binary_data_size``."""
    arrays, at, rows = {}, 0, row_values(entry)
    pieces = iter(binary) if isinstance(binary, list) else None
    data = memoryview(binary) if isinstance(binary, bytes) else None
    for spec in header["inputs"]:
        if not isinstance(spec, dict):
            raise ProtocolError("each input must be a JSON object")
        size = _params(spec, f"input '{spec.get('name')}'").get("binary_data_size")
        chunk = None
        if pieces is not None and size is not None:
            chunk = next(pieces)
        elif data is not None and size is not None:
            if not isinstance(size, int) or size < 0 or at + size > len(data):
                raise ProtocolError(f"input '{spec.get('name')}' declares {size} bytes of binary data beyond the body")
            chunk, at = data[at:at + size], at + size
        arrays[spec.get("name")] = input_array(spec, chunk, max_instances, rows)
    if data is not None and at != len(data):
        raise ProtocolError(f"{len(data) - at} bytes of binary data after the inputs that declare it")
    packed, numbers = entry.predictor.v2_packed, None
    if packed and packed[0] in arrays:  # one [-1, k] tensor in place of k named inputs
        matrix = arrays.pop(packed[0])
        if matrix.ndim != 2 or matrix.shape[1] != len(packed[1]):
            raise ProtocolError(f"input '{packed[0]}' must have shape [-1, {len(packed[1])}]: the columns "
                                f"{', '.join(packed[1])}")
        if not arrays and matrix.dtype.kind in "uifb":
            numbers = matrix  # the usual case: read row by row as Python values, below
        else:
            arrays.update({name: matrix[:, j] for j, name in enumerate(packed[1])})
    rows = {len(a) if a.ndim else 1 for a in arrays.values()} if numbers is None else {len(numbers)}
    if len(rows) != 1:
        raise ProtocolError(f"the inputs disagree on the batch size (first dimensions {sorted(rows)})")
    (count,) = rows
    if not 1 <= count <= max_instances:
        raise ProtocolError(f"a request holds 1 to {max_instances} instances (SERVE_MAX_BATCH_INSTANCES); "
                            f"this one {count}")
    if numbers is not None:  # whole rows at once (4x faster than element by element); NaN (!= itself) is missing
        values = [{k: v for k, v in zip(packed[1], row) if v == v} for row in numbers.tolist()]
    else:
        values = [{k: v for k, v in ((name, _value(a[i] if a.ndim else a[()])) for name, a in arrays.items())
                   if v is not None} for i in range(count)]
    instances = []
    for i, row in enumerate(values):
        try:
            instances.append(entry.Input.model_validate(row))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ", ".join(str(p) for p in first["loc"]) or "the instance"
            raise ProtocolError(f"instance {i}, input {where}: {first['msg']}"
                                + (f" (and {exc.error_count() - 1} more errors)" if exc.error_count() > 1 else ""),
                                422) from None
    fields = list(entry.predictor.Output.model_fields)
    wanted, as_binary = fields, set()
    everything_binary = bool(_params(header, "the request").get("binary_data_output"))
    if isinstance(header.get("outputs"), list) and header["outputs"]:
        wanted = []
        for spec in header["outputs"]:
            name = spec.get("name") if isinstance(spec, dict) else None
            if name not in fields:
                raise ProtocolError(f"no output named {name!r}; outputs: {', '.join(fields)}")
            wanted.append(name)
            if _params(spec, f"output '{name}'").get("binary_data", everything_binary):
                as_binary.add(name)
    elif everything_binary:
        as_binary = set(fields)
    return instances, wanted, as_binary


def write_response(entry: ModelEntry, version: str, request_id: Any, predictions: list[BaseModel], wanted: list[str],
                   as_binary: set[str]) -> Response:
    body: dict[str, Any] = {"model_name": entry.name,
                            "model_version": version,
                            "outputs": []}
    if request_id is not None:
        body["id"] = str(request_id)
    chunks = []
    for name, datatype, shape, values in output_tensors(predictions, wanted):
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if name in as_binary:
            raw = tensor_bytes(datatype, values)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = np.asarray(values, dtype=object).reshape(-1).tolist() if datatype != "BYTES" else values
        body["outputs"].append(tensor)
    header = pydantic_core.to_json(body)  # UTF-8 JSON in one step (json.dumps and encode: twice the time here)
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})
