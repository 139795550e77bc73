"""The Open Inference Protocol v2's wire forms, as pure functions: a JSON body (with Triton's binary tensor
extension) or a protobuf ``ModelInferRequest`` into one typed :class:`InferRequest`, its tensors into a
model's validated instances, and the answer back into JSON, binary or protobuf.

Each model's tensors follow its JSON schema, one named input per field (the pandas-style convention
MLServer uses), row i of every input being instance i:

- numbers are ``FP64`` (any numeric datatype is accepted), integers ``INT64``, text and categories
  ``BYTES`` (UTF-8), flags ``BOOL``; a missing value is ``NaN`` or an empty string;
- a field that holds a list takes a tensor with the list in its trailing dimensions: ``pixels`` is
  ``UINT8``/``FP32`` ``[-1, 28, 28]`` or ``[-1, 784]``;
- outputs are the JSON answer's fields: numbers, integers, text and fixed-length lists of numbers as
  tensors, anything nested (fashion's ``top``, poem's ``lines``) as one JSON string per row (``BYTES``).

Nothing here knows HTTP or gRPC: the data plane (service/v2/dataplane.py) calls these, and the REST routes
and the gRPC servicer only move bytes. Every refusal is a :class:`ProtocolError` (400) or a 413/422 one.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pydantic_core
from pydantic import BaseModel, ValidationError

from service.errors import ProtocolError
from service.runtime.registry import ModelEntry
from service.v2.metadata import field_tensors

if TYPE_CHECKING:  # imported where used: registering the "inference" proto in a process that never serves
    from service.v2.generated import inference_pb2 as pb  # gRPC would clash with a client's copy of it

NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
HEADER_LENGTH = "inference-header-content-length"
# The typed contents field of each datatype, for gRPC requests that do not send raw bytes.
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


@dataclass
class Tensor:
    """One input as the request sent it: JSON values (nested lists), or raw little-endian bytes."""

    name: str
    datatype: str
    shape: list[int]
    data: Any = None
    raw: bytes | memoryview | None = None  # a view of the REST body, or gRPC's raw contents: never a copy


@dataclass
class InferRequest:
    inputs: list[Tensor]
    id: str | None = None
    outputs: list[str] | None = None  # asked for by name; None: every output
    binary: set[str] = field(default_factory=set)  # outputs to send as raw bytes (REST's binary extension)
    all_binary: bool = False  # every output as raw bytes, unless listed otherwise


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    values: list


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    id: str | None
    outputs: list[OutputTensor]


# ---------------------------------------------------------------- the wire forms -> InferRequest


def parse_body(body: bytes, header_length: str | None, most_values: int) -> tuple[dict, bytes]:
    """The JSON header and the binary data after it (empty without the binary extension). A JSON part with
    more values (commas) than ``most_values`` is refused before it is parsed: parsing holds the interpreter
    (even on a thread) for as long as it takes, 85 ms for 8 MB of small numbers."""
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise ProtocolError(f"{HEADER_LENGTH} must be the JSON header's length in bytes, at most the body's")
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    else:
        json_part, binary = body, b""
    if json_part.count(b",") > most_values:
        raise ProtocolError(
            f"the request's JSON holds more values than {most_values}, the most its model's inputs "
            "take for SERVE_MAX_BATCH_INSTANCES instances; send fewer instances per request",
            413,
        )
    try:
        header = pydantic_core.from_json(json_part)
    except ValueError as exc:  # not JSON, not UTF-8, nested too deep
        raise ProtocolError(f"the request's JSON could not be read: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise ProtocolError("the request must be a JSON object with a non-empty 'inputs' list")
    return header, binary


def from_rest(body: bytes, header_length: str | None, most_values: int) -> InferRequest:
    """A REST body: JSON, or JSON then each input's bytes (``binary_data_size`` says how many)."""
    header, binary = parse_body(body, header_length, most_values)
    data, at, inputs = memoryview(binary), 0, []
    for spec in header["inputs"]:
        if not isinstance(spec, dict):
            raise ProtocolError("each input must be a JSON object")
        name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
            raise ProtocolError("each input needs a name, a datatype and a shape of non-negative integers")
        size = _params(spec, f"input '{name[:100]}'").get("binary_data_size")
        raw = None
        if size is not None:
            if type(size) is not int or size < 0 or at + size > len(data):
                raise ProtocolError(f"input '{name[:100]}' declares {size} bytes of binary data beyond the body")
            raw, at = data[at : at + size], at + size
        inputs.append(Tensor(name, datatype, shape, spec.get("data"), raw))
    if at != len(data):
        raise ProtocolError(f"{len(data) - at} bytes of binary data after the inputs that declare it")
    every = bool(_params(header, "the request").get("binary_data_output"))
    names, binary_outputs = None, set()
    if isinstance(header.get("outputs"), list) and header["outputs"]:
        names = []
        for spec in header["outputs"]:
            name = spec.get("name") if isinstance(spec, dict) else None
            if not isinstance(name, str):
                raise ProtocolError("each output asked for must be a JSON object with a 'name'")
            names.append(name)
            if _params(spec, f"output '{name[:100]}'").get("binary_data", every):
                binary_outputs.add(name)
    request_id = header.get("id")
    return InferRequest(inputs, None if request_id is None else str(request_id), names, binary_outputs, every)


def from_proto(request: pb.ModelInferRequest) -> InferRequest:
    """A gRPC request: raw contents (one per input), or the typed contents of each input."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per input")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        data = None
        if not raw and tensor.datatype in CONTENTS:
            data = list(getattr(tensor.contents, CONTENTS[tensor.datatype]))
        inputs.append(Tensor(tensor.name, tensor.datatype, list(tensor.shape), data, raw[i] if raw else None))
    return InferRequest(inputs, request.id or None, [o.name for o in request.outputs] or None)


def _params(obj: dict, what: str) -> dict:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ProtocolError(f"the 'parameters' of {what} must be a JSON object")
    return params


# ---------------------------------------------------------------- tensors <-> values


def decode_bytes_tensor(raw: bytes | memoryview, count: int) -> list[bytes]:
    """Triton's binary BYTES layout: each element is a 4-byte little-endian length, then its bytes; more
    elements than the shape's ``count`` are refused as soon as they are found."""
    items: list[bytes] = []
    at = 0
    while at < len(raw):
        if len(items) == count:
            raise ProtocolError(f"a BYTES tensor's binary data holds more than the {count} elements of its shape")
        if at + 4 > len(raw):
            raise ProtocolError("a BYTES tensor's binary data ends inside an element's length")
        (size,) = struct.unpack_from("<I", raw, at)
        items.append(bytes(raw[at + 4 : at + 4 + size]))
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


def input_array(tensor: Tensor, max_instances: int, rows: dict[str, int]) -> np.ndarray:
    """One request input as an array of its declared shape (BYTES as an object array of bytes). The name and
    shape are checked first, so that nothing is built from a shape no model takes (``[10**30, 0]``, 65
    dimensions, a million values where the model takes one per instance)."""
    name, datatype, shape = tensor.name, tensor.datatype, tensor.shape
    if not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(f"input '{name[:100]}' needs a shape of non-negative integers")
    if name not in rows:
        raise ProtocolError(f"no input named {name[:100]!r}; inputs: {', '.join(rows)}")
    if datatype != "BYTES" and datatype not in NUMPY:
        raise ProtocolError(f"input '{name}' has datatype {datatype[:20]!r}; use one of {', '.join([*NUMPY, 'BYTES'])}")
    if len(shape) > MAX_DIMS or (shape and shape[0] > max_instances) or math.prod(shape[1:]) > rows[name]:
        raise ProtocolError(
            f"input '{name}' has shape {str(shape)[:100]}; send [instances, ...] with 1 to "
            f"{max_instances} instances (SERVE_MAX_BATCH_INSTANCES), at most {MAX_DIMS} dimensions "
            f"and {rows[name]} values per instance (GET /v2/models/{{model}} lists the shapes)"
        )
    count = math.prod(shape)
    if tensor.raw is not None:
        if datatype == "BYTES":
            values = np.array(decode_bytes_tensor(tensor.raw, count), dtype=object)
        else:
            dtype = np.dtype(NUMPY[datatype]).newbyteorder("<")
            if len(tensor.raw) != count * dtype.itemsize:
                raise ProtocolError(
                    f"input '{name}' has {len(tensor.raw)} bytes of data, but {shape} {datatype} "
                    f"takes {count * dtype.itemsize}"
                )
            values = np.frombuffer(tensor.raw, dtype)
    else:
        if tensor.data is None:
            raise ProtocolError(f"input '{name}' has neither 'data' nor binary data")
        values = np.array(_flatten(tensor.data, count), dtype=object if datatype == "BYTES" else None)
        if datatype == "BYTES":
            values = np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=object)
    if values.size != count:
        raise ProtocolError(f"input '{name}' holds {values.size} values, but its shape {shape} needs {count}")
    return values.reshape(shape)


def _flatten(data: Any, most: int) -> list:
    """The leaves of nested lists, in order, stopping after ``most`` + 1 (iteratively: a deeply nested body
    must not exhaust the stack)."""
    out: list = []
    stack = [iter([data])]
    while stack and len(out) <= most:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


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


def output_tensors(predictions: list[BaseModel], fields: list[str]) -> list[OutputTensor]:
    """One tensor per answer field asked for, in that order."""
    rows = [p.model_dump(mode="json") for p in predictions]
    tensors = []
    for name in fields:
        column = [row[name] for row in rows]
        first = column[0]
        if isinstance(first, bool):
            tensors.append(OutputTensor(name, "BOOL", [len(column)], column))
        elif isinstance(first, int):
            tensors.append(OutputTensor(name, "INT64", [len(column)], column))
        elif isinstance(first, float):
            tensors.append(OutputTensor(name, "FP64", [len(column)], column))
        elif isinstance(first, str):
            tensors.append(OutputTensor(name, "BYTES", [len(column)], column))
        elif (
            isinstance(first, list)
            and first  # an empty list says nothing of its items (no warnings, an empty prediction set): JSON
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in first)
            and len({len(c) for c in column}) == 1
        ):
            tensors.append(OutputTensor(name, "FP64", [len(column), len(first)], column))
        else:
            tensors.append(
                OutputTensor(name, "BYTES", [len(column)], [json.dumps(c, ensure_ascii=False) for c in column])
            )
    return tensors


# ---------------------------------------------------------------- InferRequest -> instances, outputs -> wire


def most_values(entry: ModelEntry, max_instances: int) -> int:
    """The most JSON values (commas) a valid REST request for the model holds, with room for nested shapes."""
    return 2 * max_instances * sum(row_values(entry).values()) + 1024


def instances(entry: ModelEntry, request: InferRequest, max_instances: int) -> list[BaseModel]:
    """The request's instances, validated by the model's schema (a 422 naming the instance and input)."""
    rows = row_values(entry)
    arrays = {tensor.name: input_array(tensor, max_instances, rows) for tensor in request.inputs}
    packed, numbers = entry.predictor.v2_packed, None
    if packed and packed[0] in arrays:  # one [-1, k] tensor in place of k named inputs
        matrix = arrays.pop(packed[0])
        if matrix.ndim != 2 or matrix.shape[1] != len(packed[1]):
            raise ProtocolError(
                f"input '{packed[0]}' must have shape [-1, {len(packed[1])}]: the columns {', '.join(packed[1])}"
            )
        if not arrays and matrix.dtype.kind in "uifb":
            numbers = matrix  # the usual case: read row by row as Python values, below
        else:
            arrays.update({name: matrix[:, j] for j, name in enumerate(packed[1])})
    counts = {len(a) if a.ndim else 1 for a in arrays.values()} if numbers is None else {len(numbers)}
    if len(counts) != 1:
        raise ProtocolError(f"the inputs disagree on the batch size (first dimensions {sorted(counts)})")
    (count,) = counts
    if not 1 <= count <= max_instances:
        raise ProtocolError(
            f"a request holds 1 to {max_instances} instances (SERVE_MAX_BATCH_INSTANCES); this one {count}"
        )
    if numbers is not None:  # whole rows at once (4x faster than element by element); NaN (!= itself) is missing
        assert packed is not None  # numbers come from the packed tensor
        values = [{k: v for k, v in zip(packed[1], row) if v == v} for row in numbers.tolist()]
    else:
        values = [
            {
                k: v
                for k, v in ((name, _value(a[i] if a.ndim else a[()])) for name, a in arrays.items())
                if v is not None
            }
            for i in range(count)
        ]
    validated = []
    for i, row in enumerate(values):
        try:
            validated.append(entry.Input.model_validate(row))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ", ".join(str(p) for p in first["loc"]) or "the instance"
            raise ProtocolError(
                f"instance {i}, input {where}: {first['msg']}"
                + (f" (and {exc.error_count() - 1} more errors)" if exc.error_count() > 1 else ""),
                422,
            ) from None
    return validated


def wanted_outputs(entry: ModelEntry, request: InferRequest) -> list[str]:
    """The outputs asked for (every one when none is named), each one the model has."""
    fields = list(entry.predictor.Output.model_fields)
    for name in request.outputs or ():
        if name not in fields:
            raise ProtocolError(f"no output named {name[:100]!r}; outputs: {', '.join(fields)}")
    return request.outputs or fields


def binary_outputs(request: InferRequest, wanted: list[str]) -> set[str]:
    return set(wanted) if request.all_binary and request.outputs is None else request.binary


def to_rest(response: InferResponse, as_binary: set[str]) -> tuple[bytes, dict[str, str]]:
    """The JSON answer (and Triton's binary outputs after it): the body and the headers that say its form."""
    body: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version, "outputs": []}
    if response.id is not None:
        body["id"] = response.id
    chunks = []
    for out in response.outputs:
        tensor: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if out.name in as_binary:
            raw = tensor_bytes(out.datatype, out.values)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = (
                np.asarray(out.values, dtype=object).reshape(-1).tolist() if out.datatype != "BYTES" else out.values
            )
        body["outputs"].append(tensor)
    header = pydantic_core.to_json(body)  # UTF-8 JSON in one step (json.dumps and encode: twice the time here)
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }


def to_proto(response: InferResponse) -> pb.ModelInferResponse:
    """The gRPC answer: every output as raw contents, as Triton sends them."""
    from service.v2.generated import inference_pb2 as pb

    message = pb.ModelInferResponse(
        model_name=response.model_name, id=response.id or "", model_version=response.model_version
    )
    for out in response.outputs:
        message.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        message.raw_output_contents.append(tensor_bytes(out.datatype, out.values))
    return message
