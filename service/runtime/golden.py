"""Golden sets: a version answers its own reference inputs as it did when it was trained, or it never serves.

Training stores ``golden.json`` in every version (training/golden.py): a few dozen inputs, the answers the
serving code gave them then, and a tolerance. Loading a version (at start-up and on every reload) replays
them through the real predict path, each input alone, before the version is warmed up; an answer that differs
beyond the tolerance fails the load, with the first difference as the reason (``/admin/models``, ``/readyz``,
``model_golden_checks_total``). Hashes prove the files are the ones the manifest names; this proves they still
make the trained model: weights from another version or model, a broken export or a mismatched preprocessor
each change the answers.

Numbers compare within ``abs + rel x |expected|``; everything else (labels, names, poems) must be equal. Answers
computed on another kind of machine (an accelerator, another CPU architecture, vector kernels or torch release,
whose kernels round differently) are compared by their shape only, and the check says so. A version without a golden set
(trained before they existed) loads with a warning.
"""

from __future__ import annotations

import platform
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from service.artifacts import Artifact, ArtifactError

GOLDEN_FILE = "golden.json"


class GoldenMismatch(ArtifactError):
    """The version's answers differ from its golden set: it never serves."""


MAX_REPORTED = 200  # characters of a value quoted in a refusal


def answer(predictor: Any, schema: type[BaseModel], instance: dict[str, Any]) -> Any:
    """``instance``'s answer through the predictor's real path, as JSON (an error as ``{"error": ...}``)."""
    try:
        item = schema.model_validate(instance)
    except ValidationError as exc:
        return {"error": f"invalid input: {exc.errors()[0]['msg']}"}
    (output,) = predictor.run([item])
    if isinstance(output, Exception):
        return {"error": str(output)}
    return output.model_dump(mode="json")


def difference(expected: Any, actual: Any, tolerance: dict[str, float], exact: bool, where: str = "") -> str | None:
    """The first way ``actual`` differs from ``expected`` beyond the tolerance (``exact``: values too, else only
    the shape: keys, lengths and types), or None."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        if expected.keys() != actual.keys():
            return f"{where or 'answer'} has fields {sorted(actual)} instead of {sorted(expected)}"
        for key in expected:
            if found := difference(expected[key], actual[key], tolerance, exact, f"{where}.{key}" if where else key):
                return found
        return None
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return f"{where} has {len(actual)} items instead of {len(expected)}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            if found := difference(e, a, tolerance, exact, f"{where}[{i}]"):
                return found
        return None
    numbers = (int, float)
    if isinstance(expected, numbers) and isinstance(actual, numbers) and not isinstance(expected, bool):
        allowed = tolerance.get("abs", 0.0) + tolerance.get("rel", 0.0) * abs(expected)
        if not exact or abs(actual - expected) <= allowed:  # a label (a small integer) must be equal
            return None
        return f"{where} is {actual!r}, not {expected!r}"
    if type(expected) is not type(actual) and not (expected is None or actual is None):
        return f"{where} is a {type(actual).__name__}, not a {type(expected).__name__}"
    if exact and expected != actual:
        return f"{where} is {str(actual)[:MAX_REPORTED]!r}, not {str(expected)[:MAX_REPORTED]!r}"
    return None


def computed_on(device: torch.device) -> dict[str, str]:
    """What decides how answers round: the device, the machine, torch's release and, on a CPU, the vector kernels
    torch picked for it (AVX512, AVX2, ...: their exp, sigmoid and tanh may round differently, and a poem is
    sampled from them)."""
    made = {"device": device.type, "machine": platform.machine(), "torch": torch.__version__.split("+")[0]}
    if device.type == "cpu":
        made["cpu"] = torch.backends.cpu.get_cpu_capability()
    return made


def check(predictor: Any, artifact: Artifact, device: torch.device) -> str:
    """Replay the version's golden set; what was checked (for the log), or ArtifactError naming the first case
    that differs. A version without one: a note saying so."""
    if GOLDEN_FILE not in artifact.manifest.files:
        return "no golden set (trained before golden sets): its answers were not checked at load"
    golden = artifact.load_json(GOLDEN_FILE)
    made, here = golden.get("computed_on", {}), computed_on(device)
    # a set from before the CPU's kernels were recorded ("cpu") counts as made on kernels like these
    exact = all(made.get(k, v if k == "cpu" else None) == v for k, v in here.items())
    schema = predictor.input_schema(artifact)
    tolerance = golden.get("tolerance", {})
    for n, case in enumerate(golden["cases"], 1):
        found = difference(case["output"], answer(predictor, schema, case["input"]), tolerance, exact)
        if found:
            raise GoldenMismatch(
                f"its answers differ from its golden set, so these are not the weights and files it was trained "
                f"with: case {n} of {len(golden['cases'])}: {found}"
            )
    how = "within the tolerance" if exact else f"by shape only (computed on {made}, served on {here})"
    return f"golden set: {len(golden['cases'])} answers as trained, {how}"
