"""Artifact verification, and the committed artifacts checked against their manifests and the data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from service.artifacts import Artifact, ArtifactError, check_compatible, sha256_file
from service.models.house_price import HousePrice
from service.models.phone_price import PhonePrice
from tests.conftest import ARTIFACTS
from training.common import Options
from training.tabular import predict

SIZE_LIMIT = 30 * 1024 * 1024


@pytest.mark.parametrize("folder", sorted(p.name for p in ARTIFACTS.iterdir() if p.is_dir()))
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


def _loaded(predictor_cls):
    predictor = predictor_cls()
    predictor.load(Artifact(ARTIFACTS / predictor_cls.folder), torch.device("cpu"))
    return predictor


def test_phone_manifest_metrics_reproduce(data_dir):
    """Recompute validation accuracy of the committed model on its own validation split."""
    from training import phone_price
    predictor = _loaded(PhonePrice)
    manifest = predictor.artifact.manifest
    *_, x_val, _, y_val = phone_price.load(Options(data_dir=data_dir), manifest.hyperparameters)
    outputs = predict(predictor.net, predictor.preprocessor.transform(x_val))
    accuracy = float((outputs.argmax(1) == y_val).mean())
    assert accuracy == pytest.approx(manifest.metrics["val_accuracy"], abs=1e-4)
    assert accuracy >= 0.96 and manifest.metrics["cv_accuracy_mean"] >= 0.96


def test_house_manifest_metrics_reproduce(data_dir):
    from training import house_price
    predictor = _loaded(HousePrice)
    manifest = predictor.artifact.manifest
    frame, y, _, val_rows, _ = house_price.load(Options(data_dir=data_dir), manifest.hyperparameters)
    outputs = predict(predictor.net, predictor.preprocessor.transform(frame.iloc[val_rows]))
    rmse = float(np.sqrt(np.mean((outputs[:, 0] - y[val_rows]) ** 2)))
    assert rmse == pytest.approx(manifest.metrics["val_rmse_log_price"], abs=1e-4)
    assert rmse <= 0.13 and manifest.metrics["cv_rmse_log_price_mean"] <= 0.13


def test_house_feature_table_matches_the_data(data_dir):
    from service.models.house_price import FEATURES
    from training.house_price import feature_table
    folder = Path(data_dir) / "house_prices"
    if not (folder / "data_description.txt").is_file():
        pytest.skip(f"{folder}/data_description.txt not found: set $DATA_DIR")
    assert feature_table(folder / "data_description.txt", folder / "train.csv") == FEATURES
