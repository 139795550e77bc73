"""What the v2 protocol says about a model: its tensors, from its JSON schema, and Triton's model config."""

from __future__ import annotations

from service.runtime.registry import ModelEntry


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
        datatype = (
            "BYTES"
            if "string" in kinds
            else "BOOL"
            if kinds == {"boolean"}
            else "INT64"
            if kinds == {"integer"}
            else "FP64"
        )
        datatype, shape = declared.get(name, (datatype, [-1, -1] if "array" in kinds else [-1]))
        tensors.append(
            {
                "name": name,
                "datatype": datatype,
                "shape": shape,  # a packed tensor can stand in for it
                "optional": name not in schema.get("required", []) or bool(entry.predictor.v2_packed),
            }
        )
    if entry.predictor.v2_packed:
        name, columns = entry.predictor.v2_packed
        tensors.append(
            {"name": name, "datatype": "FP64", "shape": [-1, len(columns)], "optional": True, "columns": list(columns)}
        )  # in place of the named inputs above
    return tensors


def output_descriptions(entry: ModelEntry) -> list[dict]:
    example = entry.predictor.Output.model_json_schema().get("properties", {})
    out = []
    for name, prop in example.items():
        kind = prop.get("type")
        datatype = {"integer": "INT64", "number": "FP64", "string": "BYTES", "boolean": "BOOL"}.get(kind, "BYTES")
        shape = [-1]
        if (
            kind == "array"
            and prop.get("items", {}).get("type") == "number"
            and prop.get("maxItems") == prop.get("minItems")
        ):
            datatype, shape = "FP64", [-1, prop["maxItems"]]
        out.append({"name": name, "datatype": datatype, "shape": shape})
    return out


def model_config(entry: ModelEntry) -> dict:
    """Triton's model configuration extension (what ``perf_analyzer`` reads before it sends anything): the
    metadata's tensors with their full shapes, the first dimension being the instances (``max_batch_size``
    0: Triton's own batch dimension is not used; the service batches requests itself)."""

    def tensor(t: dict) -> dict:
        return {
            "name": t["name"],
            "data_type": "TYPE_STRING" if t["datatype"] == "BYTES" else f"TYPE_{t['datatype']}",
            "dims": t["shape"],
        }

    return {
        "name": entry.name,
        "platform": "pytorch",
        "backend": "pytorch",
        "max_batch_size": 0,
        "input": [{**tensor(t), "optional": t["optional"]} for t in field_tensors(entry)],
        "output": [tensor(t) for t in output_descriptions(entry)],
    }
