"""Artifact verification, and the committed artifacts checked against their manifests and the data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from service import catalog
from service.artifacts import Artifact, ArtifactError, check_compatible, sha256_file
from tests.conftest import ARTIFACTS, committed, need_data
from training.common import Options
from training.tabular import predict

SIZE_LIMIT = 30 * 1024 * 1024


def test_every_model_in_the_catalog_has_a_committed_artifact():
    assert sorted(p.name for p in ARTIFACTS.iterdir() if p.is_dir()) == sorted(m.folder for m in catalog.MODELS)


@pytest.mark.parametrize("folder", [m.folder for m in catalog.MODELS])
def test_committed_artifact_matches_its_manifest(folder):
    path = ARTIFACTS / folder
    manifest = json.loads((path / "manifest.json").read_text())
    files = {p.name for p in path.iterdir() if p.is_file()} - {"manifest.json"}
    assert files == set(manifest["files"]), "every file is listed and every listed file exists"
    for name, digest in manifest["files"].items():
        assert sha256_file(path / name) == digest
    assert sum((path / n).stat().st_size for n in files) < SIZE_LIMIT
    assert manifest["metrics"] and manifest["metrics_method"] and manifest["data"]
    assert {"torch", "scikit-learn", "numpy"} <= manifest["libraries"].keys()
    Artifact(path)  # loads with the installed libraries


def test_tampered_or_unlisted_files_are_refused(artifacts_copy):
    folder = artifacts_copy / "phone_price"
    (folder / "preprocessor.joblib").write_bytes(b"not the scaler")
    with pytest.raises(ArtifactError, match="sha256"):
        Artifact(folder)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Artifact(artifacts_copy / "missing")


def test_incompatible_library_versions_are_refused():
    with pytest.raises(ArtifactError, match="scikit-learn 0.24"):
        check_compatible({"scikit-learn": "0.24.2"})
    with pytest.raises(ArtifactError, match="torch 99"):
        check_compatible({"torch": "99.0.0"})


def test_weights_load_without_pickle():
    """model.pt is a plain state_dict: loadable with weights_only=True, nothing else inside."""
    state = torch.load(ARTIFACTS / "phone_price" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_phone_manifest_metrics_reproduce(data_dir):
    """Recompute validation accuracy of the committed model on its own validation split."""
    from training import phone_price
    predictor = committed("phone-price").predictor
    manifest = predictor.artifact.manifest
    *_, x_val, _, y_val = phone_price.load(Options(data_dir=data_dir), manifest.hyperparameters)
    outputs = predict(predictor.net, predictor.preprocessor.transform(x_val))
    accuracy = float((outputs.argmax(1) == y_val).mean())
    assert accuracy == pytest.approx(manifest.metrics["val_accuracy"], abs=1e-4)
    assert accuracy >= 0.96 and manifest.metrics["cv_accuracy_mean"] >= 0.96


def test_house_manifest_metrics_reproduce(data_dir):
    from training import house_price
    predictor = committed("house-price").predictor
    manifest = predictor.artifact.manifest
    _, frame, y, _, val_rows, _ = house_price.load(Options(data_dir=data_dir), manifest.hyperparameters)
    outputs = predict(predictor.net, predictor.preprocessor.transform(frame.iloc[val_rows]))
    rmse = float(np.sqrt(np.mean((outputs[:, 0] - y[val_rows]) ** 2)))
    assert rmse == pytest.approx(manifest.metrics["val_rmse_log_price"], abs=1e-4)
    assert rmse <= 0.13 and manifest.metrics["cv_rmse_log_price_mean"] <= 0.13


def test_house_feature_table_is_in_the_artifact_and_matches_the_data(data_dir):
    """The input schema's source is an artifact file, hash-listed in the manifest, written from the data."""
    from service.models.house_price import FEATURE_TABLE
    from training.house_price import feature_table
    folder = ARTIFACTS / catalog.get("house-price").folder
    assert FEATURE_TABLE in json.loads((folder / "manifest.json").read_text())["files"]
    description = need_data(data_dir, "house_prices", "data_description.txt")
    table = feature_table(description, need_data(data_dir, "house_prices", "train.csv"))
    assert Artifact(folder).load_json(FEATURE_TABLE) == table
    schema = committed("house-price").Input.model_json_schema()
    assert set(schema["properties"]) == {"Id"} | {f["name"] for f in table}


def test_service_reads_no_file_that_training_writes_outside_artifacts():
    """Service modules hold code only: no data files beside them that a training run could rewrite."""
    service = ARTIFACTS.parent / "service"
    assert sorted(p.name for p in service.rglob("*") if p.is_file() and p.suffix not in {".py", ".pyc"}) == []
