"""Artifact verification, and the committed artifacts checked against their manifests (the metrics they claim,
recomputed from the data: tests/e2e/test_manifest_metrics.py)."""

from __future__ import annotations

import json

import pytest
import torch

from service import catalog
from service.artifacts import Artifact, ArtifactError, check_compatible, sha256_file
from service.runtime.golden import GOLDEN_FILE
from tests.conftest import ARTIFACTS, committed, version_dir
from training.common import Options

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
    # without one, the server cannot tell these weights from wrong ones at load (it only warns)
    assert GOLDEN_FILE in manifest["files"], "a committed version carries its golden set: retrain the model"
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
    code = {".py", ".pyc", ".pyi", ".proto", ".html", ".css", ".js"}  # .pyi: the generated gRPC messages' types;
    # .html, .css, .js: the playground's page, stylesheet and script (service/api/playground_assets/)
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
