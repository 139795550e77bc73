"""Artifact verification, and the committed artifacts checked against their manifests and the data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from service import catalog
from service.artifacts import Artifact, ArtifactError, check_compatible, sha256_file
from tests.conftest import ARTIFACTS, committed, version_dir
from training.common import Options
from training.selection import Protocol
from training.tabular import predict

SIZE_LIMIT = 30 * 1024 * 1024


def test_every_model_in_the_catalog_has_a_committed_artifact():
    assert sorted(p.name for p in ARTIFACTS.iterdir() if p.is_dir()) == sorted(m.folder for m in catalog.MODELS)


@pytest.mark.parametrize("folder", [m.folder for m in catalog.MODELS])
def test_the_repository_commits_one_version_per_model_in_a_folder_named_after_it(folder):
    """The layout holds many versions; git holds one per model, to keep the repository small."""
    entries = [p for p in (ARTIFACTS / folder).iterdir() if p.name != ".gitignore"]
    assert len(entries) == 1 and entries[0].is_dir(), [p.name for p in entries]
    assert json.loads((entries[0] / "manifest.json").read_text())["version"] == entries[0].name


@pytest.mark.parametrize("folder", [m.folder for m in catalog.MODELS])
def test_committed_artifact_matches_its_manifest(folder):
    path = version_dir(ARTIFACTS / folder)
    manifest = json.loads((path / "manifest.json").read_text())
    files = {p.name for p in path.iterdir() if p.is_file()} - {"manifest.json", "manifest.sig"}
    assert files == set(manifest["files"]), "every file is listed and every listed file exists"
    for name, digest in manifest["files"].items():
        assert sha256_file(path / name) == digest
    assert sum((path / n).stat().st_size for n in files) < SIZE_LIMIT
    assert manifest["metrics"] and manifest["metrics_method"] and manifest["data"]
    assert {"torch", "scikit-learn", "numpy"} <= manifest["libraries"].keys()
    Artifact(path)  # loads with the installed libraries


def test_tampered_or_unlisted_files_are_refused(artifacts_copy):
    folder = version_dir(artifacts_copy / "phone_price")
    (folder / "preprocessor.json").write_bytes(b"not the scaler")
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
    state = torch.load(version_dir(ARTIFACTS / "phone_price") / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_phone_manifest_metrics_reproduce(data_dir):
    """The committed phone net's claims, recomputed from the data: its accuracy on the development rows, its
    inputs and weights refitted from the manifest's recipe, and that recipe's repeated-CV accuracy and ECE."""
    from training import phone_price
    from training.selection import cross_validate
    predictor = committed("phone-price").predictor
    hp, metrics = predictor.artifact.manifest.hyperparameters, predictor.artifact.manifest.metrics
    _, x, y = phone_price.load(Options(data_dir=data_dir))
    outputs = predict(predictor.net, predictor.preprocessor.transform(x))
    assert float((outputs.argmax(1) == y).mean()) == pytest.approx(metrics["train_accuracy"], abs=1e-4)

    with phone_price.single_threaded():  # about 5 s: 25 folds of L-BFGS fits
        scaler, ranking = phone_price.prepare(x, y, hp)
        net, _ = phone_price.fit_net(scaler.transform(x), y, hp)
        recipe = phone_price.recipe(phone_price.Choice.served(hp), phone_price.Folds(x, y, hp), hp)
        cv = cross_validate(y, {"served": recipe}, phone_price.NET_SCORES, phone_price.PROTOCOL)["served"]
    assert ranking[:hp["features"]].tolist() == hp["inputs"]
    assert np.allclose(scaler.mean_, predictor.preprocessor.mean)
    assert np.allclose(scaler.scale_, predictor.preprocessor.scale)
    committed_weights = predictor.net.state_dict()
    for name, value in net.float().state_dict().items():
        assert torch.allclose(value, committed_weights[name], rtol=1e-3, atol=1e-4), name

    table, served = metrics["cv"]["candidates"], metrics["cv"]["served"]
    assert metrics["cv"]["protocol"] == phone_price.PROTOCOL.describe(len(y))
    assert cv == pytest.approx(table[served], abs=1e-4)
    assert cv == pytest.approx({"accuracy_mean": metrics["cv_accuracy_mean"], "accuracy_sd": metrics["cv_accuracy_sd"],
                                "ece_mean": metrics["ece_mean"], "ece_sd": metrics["ece_sd"]}, abs=1e-4)
    baselines = [row["accuracy_mean"] for name, row in table.items() if not name.startswith(phone_price.NET)]
    assert len(baselines) >= 2 * len(phone_price.CS) and cv["accuracy_mean"] >= max(baselines)
    assert cv["accuracy_mean"] >= 0.975


def test_house_manifest_metrics_reproduce(data_dir):
    """The CV claims recompute from the committed out-of-fold predictions and the data, the interval's
    quantile from the same predictions, and the served weights reproduce their training RMSE."""
    from training import house_price
    predictor = committed("house-price").predictor
    manifest = predictor.artifact.manifest
    hp, metrics, cv = manifest.hyperparameters, manifest.metrics, manifest.metrics["cv"]
    _, frame, y, _ = house_price.load(Options(data_dir=data_dir), hp)
    fitted = house_price.predict(predictor.net, predictor.preprocessor.transform(frame))
    assert house_price.rmse(fitted, y) == pytest.approx(metrics["train_rmse_log_price"], abs=1e-4)

    recorded = predictor.artifact.load_json(house_price.CV_PREDICTIONS)
    protocol = Protocol(recorded["folds"], recorded["repeats"], stratified=False, seed=recorded["seed"])
    assert recorded["candidate"] == cv["served"] and cv["protocol"] == protocol.describe(len(y))
    out_of_fold = np.array(recorded["log_price"])
    scores = [house_price.rmse(out_of_fold[k // protocol.folds, val], y[val])
              for k, (_, val) in enumerate(protocol.splits(y))]
    assert np.mean(scores) == pytest.approx(metrics["cv_rmse_log_price_mean"], abs=1e-4)
    assert np.std(scores) == pytest.approx(metrics["cv_rmse_log_price_sd"], abs=1e-4)
    assert cv["candidates"][cv["served"]]["rmse_log_price_mean"] == metrics["cv_rmse_log_price_mean"]
    assert hp["interval_90_log_halfwidth"] == house_price.conformal_halfwidth(y - out_of_fold, hp["interval_level"])
    interval = house_price.interval_under_cv(y, out_of_fold, protocol, hp["interval_level"])
    assert interval == {key: metrics[key] for key in interval}

    means = {name: row["rmse_log_price_mean"] for name, row in cv["candidates"].items()}
    baselines = [name for name in means if not name.startswith("net")]
    assert {"ridge", "lasso", "gradient"} <= {name.split()[0] for name in baselines}
    assert means[cv["best_baseline"]] == min(means[name] for name in baselines)
    assert metrics["cv_rmse_log_price_mean"] <= 0.105 and metrics["cv_rmse_log_price_mean"] < means[cv["best_baseline"]]
    assert 0.88 <= metrics["interval_90_coverage_mean"] <= 0.92


def test_house_feature_table_is_in_the_artifact_and_matches_the_data(data_dir):
    """The input schema's source is an artifact file, hash-listed in the manifest, written from the data:
    the categories of the training rows, data_description.txt's other spellings and its unseen codes."""
    from service.models.house_price import FEATURE_TABLE
    from training.house_price import load
    artifact = Artifact(version_dir(ARTIFACTS / catalog.get("house-price").folder))
    assert FEATURE_TABLE in artifact.manifest.files
    table, frame, _, _ = load(Options(data_dir=data_dir), artifact.manifest.hyperparameters)
    assert artifact.load_json(FEATURE_TABLE) == table
    for feature in table:
        if feature["kind"] == "categorical":
            assert {str(c) for c in frame[feature["name"]].dropna()} == {str(c) for c in feature["categories"]}
    schema = committed("house-price").Input.model_json_schema()
    assert set(schema["properties"]) == {"Id"} | {f["name"] for f in table}


def test_service_reads_no_file_that_training_writes_outside_artifacts():
    """Service modules hold code only (the gRPC protocol's .proto is code too): no data files beside them
    that a training run could rewrite."""
    service = ARTIFACTS.parent / "service"
    code = {".py", ".pyc", ".proto"}
    assert sorted(p.name for p in service.rglob("*") if p.is_file() and p.suffix not in code) == []


@pytest.mark.parametrize("name", ["/etc/hostname", "../poem/vocab.json", "sub/file.json", ".."])
def test_manifest_entries_are_plain_file_names_in_the_folder(artifacts_copy, name):
    """A re-hashed manifest cannot make the loader read (and hash) a file outside the model's folder."""
    folder = version_dir(artifacts_copy / "phone_price")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not a plain file name"):
        Artifact(folder)


def test_a_listed_file_may_not_be_a_link(artifacts_copy):
    folder = version_dir(artifacts_copy / "phone_price")
    target = folder / "report.json"
    moved = artifacts_copy / "elsewhere.json"
    target.rename(moved)
    target.symlink_to(moved)
    with pytest.raises(ArtifactError, match=f"phone_price/{folder.name}/report.json is a symbolic link") as info:
        Artifact(folder)
    assert str(artifacts_copy) not in str(info.value)  # the reason reaches clients: no server path
