"""`python -m training <model> --quick` on a data slice writes a complete, loadable, servable artifact, for
every model in the catalog; and the training command stays clear of the web stack."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service.catalog import MODELS
from service.registry import open_model
from tests.conftest import ROOT, version_dir


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


def test_missing_data_is_one_clear_line(tmp_path):
    command = [sys.executable, "-m", "training", "phone-price", "--quick", "--out", str(tmp_path),
               "--data-dir", str(tmp_path / "nowhere")]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert "phone_price/train.csv not found: pass --data-dir" in line and "DATA_DIR" in line


def test_the_training_command_does_not_import_the_web_stack():
    """The nets live apart from HTTP code, so training a model loads torch and its data tools only."""
    probe = ("import json, sys\nfrom training.__main__ import main\ntry:\n    main(['phone-price', '--help'])\n"
             "except SystemExit:\n    pass\nprint(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    imported = {name.split(".")[0] for name in json.loads(out.stdout.splitlines()[-1])}
    assert "service.catalog" in json.loads(out.stdout.splitlines()[-1])
    assert not imported & {"fastapi", "starlette", "uvicorn", "PIL", "pypinyin", "pandas", "matplotlib"}
