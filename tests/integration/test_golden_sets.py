"""Golden sets: a version trained with ``--quick`` answers its reference inputs at load; the same version with
its weights reversed (another model's weights, hashes made valid again) is refused, by
the admin load call of a real server, with the reason, while the version before keeps serving."""

import json
import shutil

import httpx
import pytest
import torch

from service.artifacts import Artifact, version_folders
from service.catalog import get
from service.runtime.golden import GOLDEN_FILE, GoldenMismatch, check, difference
from tests.conftest import example, running_server
from tests.unit.test_artifact_safety import rehash

ADMIN = {"X-API-Key": "admin-key"}


def reversed_weights(source, target) -> str:
    """A copy of version ``source`` as a new version in ``target``'s model folder whose net scores every phone
    the other way round (its weights negated: what training on reversed labels gives), its manifest re-hashed:
    valid files, wrong weights."""
    version = "2099.01.01.000000"
    folder = target / version
    shutil.copytree(source, folder)
    state = torch.load(folder / "model.pt", weights_only=True)
    state["linear.weight"] = -state["linear.weight"]  # the ordinal net's one score
    torch.save(state, folder / "model.pt")
    rehash(folder, version)
    return version


def test_a_trained_version_answers_its_golden_set(quick_artifacts):
    (folder,) = version_folders(quick_artifacts("phone-price") / "phone_price").values()
    artifact = Artifact(folder)
    assert GOLDEN_FILE in artifact.manifest.files
    predictor = get("phone-price").predictor_class()()
    predictor.load(artifact, torch.device("cpu"))
    assert check(predictor, artifact, torch.device("cpu")).startswith("golden set: 28 answers as trained")


def test_the_comparison_allows_the_tolerance_and_nothing_more():
    tolerance = {"abs": 1e-4, "rel": 0.0}
    assert difference({"p": [0.5, 0.25]}, {"p": [0.50005, 0.25]}, tolerance, exact=True) is None
    assert "p[0] is 0.501" in difference({"p": [0.5]}, {"p": [0.501]}, tolerance, exact=True)
    assert "label is 2, not 1" in difference({"label": 1}, {"label": 2}, tolerance, exact=True)
    assert "fields" in difference({"a": 1}, {"b": 1}, tolerance, exact=True)
    assert difference({"poem": "月"}, {"poem": "日"}, tolerance, exact=False) is None  # another machine: shape only


def test_a_version_with_another_models_weights_is_refused_at_load(quick_artifacts, tmp_path):
    repo = tmp_path / "artifacts"
    shutil.copytree(quick_artifacts("phone-price"), repo)
    model_dir = repo / "phone_price"
    (good,) = version_folders(model_dir).values()
    bad = reversed_weights(good, model_dir)
    predictor = get("phone-price").predictor_class()()
    artifact = Artifact(model_dir / bad)  # the hashes check
    predictor.load(artifact, torch.device("cpu"))
    with pytest.raises(GoldenMismatch, match="case 1 of 28: price_range is"):
        check(predictor, artifact, torch.device("cpu"))

    with running_server(
        models='["phone-price"]',
        artifacts_dir=str(repo),
        model_versions=json.dumps({"phone-price": good.name}),
        admin_keys='["admin-key"]',
    ) as server:
        load = httpx.post(
            f"{server.url}/admin/models/phone-price/load", json={"version": bad}, headers=ADMIN, timeout=60
        )
        answer = httpx.post(f"{server.url}/phone-price", json=example("phone-price"))
        status = httpx.get(f"{server.url}/admin/models", headers=ADMIN).json()
        metrics = httpx.get(f"{server.url}/metrics").text
    assert load.status_code == 422 and "golden set" in load.json()["detail"], load.text
    assert answer.status_code == 200 and answer.headers["x-model-version"] == good.name
    versions = status["workers"][0]["models"]["phone-price"]["versions"]
    assert versions[bad]["state"] == "failed" and "golden set" in versions[bad]["reason"]
    assert versions[good.name]["golden"].startswith("golden set: 28 answers")
    assert 'model_golden_checks_total{model="phone-price",outcome="failed"} 1.0' in metrics


def test_answers_computed_on_other_vector_kernels_are_compared_by_shape(quick_artifacts, tmp_path):
    """A golden set records the CPU's vector kernels (their exp and tanh may round differently): one made on
    others is compared by shape only, one made on these exactly, and one from before they were recorded as made
    here."""
    (source,) = version_folders(quick_artifacts("phone-price") / "phone_price").values()
    here = torch.backends.cpu.get_cpu_capability()

    def with_golden(made_on: str | None, name: str) -> str:
        folder = tmp_path / name
        shutil.copytree(source, folder)
        golden = json.loads((folder / GOLDEN_FILE).read_text())
        assert golden["computed_on"]["cpu"] == here  # what training records
        golden["cases"][0]["output"]["price_range"] = (golden["cases"][0]["output"]["price_range"] + 1) % 4
        if made_on is None:
            del golden["computed_on"]["cpu"]
        else:
            golden["computed_on"]["cpu"] = made_on
        (folder / GOLDEN_FILE).write_text(json.dumps(golden))
        rehash(folder)
        predictor = get("phone-price").predictor_class()()
        artifact = Artifact(folder)
        predictor.load(artifact, torch.device("cpu"))
        try:
            return check(predictor, artifact, torch.device("cpu"))
        except GoldenMismatch as exc:
            return f"refused: {exc}"

    assert "by shape only" in with_golden("OTHER_KERNELS", "other")
    assert with_golden(here, "same").startswith("refused: ") and "case 1 of 28" in with_golden(here, "same2")
    assert with_golden(None, "older").startswith("refused: ")
