"""The golden set of a new version: a few dozen reference inputs and the answers the version gives them.

The answers come from the serving code itself (the catalog's predictor, loaded from the version's own files on
the CPU, each input alone through ``Predictor.run``), so the server can replay them when it loads the version
(service/runtime/golden.py) and refuse one whose answers differ: weights that are not the ones trained, a
broken export, a preprocessor from another version. Written into the version folder and hashed like every file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from service.artifacts import Artifact
from service.catalog import get
from service.runtime.golden import GOLDEN_FILE, answer, computed_on


def write(folder: Path, model: str, inputs: list[dict[str, Any]], tolerance: dict[str, float]) -> int:
    """Answer ``inputs`` with the version in ``folder`` (its manifest written) and store them; the number of
    cases. An input the model refuses is kept with its error: the refusal is part of the answer."""
    artifact = Artifact(folder)
    predictor = get(model).predictor_class()()
    predictor.load(artifact, torch.device("cpu"))
    schema = predictor.input_schema(artifact)
    cases = [{"input": instance, "output": answer(predictor, schema, instance)} for instance in inputs]
    golden = {
        "format": 1,
        "computed_on": computed_on(torch.device("cpu")),
        "tolerance": tolerance,
        "cases": cases,
    }
    (folder / GOLDEN_FILE).write_text(json.dumps(golden, ensure_ascii=False) + "\n")
    return len(cases)
