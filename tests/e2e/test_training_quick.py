"""`python -m training <model> --quick` on a data slice writes a complete, loadable, servable artifact, for
every model in the catalog (the command's quick checks: tests/integration/test_training_cli.py)."""

from __future__ import annotations

import json

import pytest

from service.catalog import MODELS
from service.runtime.registry import open_model
from tests.conftest import version_dir


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS, ids=[m.name for m in MODELS])
def test_quick_training_writes_a_servable_artifact(quick_artifacts, model):
    out = quick_artifacts(model.name)
    folder = version_dir(out / model.folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    files = {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert files == set(manifest["files"]) and {"model.pt", "report.json", "learning_curves.png"} <= files
    assert manifest["name"] == model.name and manifest["metrics"] and manifest["metrics_method"]
    assert manifest["quick"] is True  # marked, so /models says so and the server warns
    assert manifest["data"] and all(len(h) == 64 for h in manifest["data"].values())
    report = json.loads((folder / "report.json").read_text())
    assert report["history"] and 1 <= report["best_epoch"] <= len(report["history"])

    entry = open_model(model, out)
    (output,) = entry.predictor.run([entry.Input.model_validate(entry.predictor.example)])
    assert isinstance(output, entry.predictor.Output)
