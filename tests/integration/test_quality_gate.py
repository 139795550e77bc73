"""The quality gate: a version that loses to a plain baseline, to its floor or to the version before it (on
the same data) is not published unless forced, and a forced one never becomes the server's default on its own.

The CLI runs are real phone-price trainings on a small grid (one feature count, one C, 2 folds, 15 L-BFGS
iterations): the full grid on shuffled labels runs every fit to its 500-iteration cap (over 10 minutes)."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from service.artifacts import Manifest, sha256_file, version_folders
from service.catalog import get
from tests.conftest import ARTIFACTS, need_data, serving
from training.gate import RULES, judge, table

PHONE = get("phone-price")


def write_manifest(folder, version: str, score: float, data: dict, quick: bool = False) -> None:
    (folder / version).mkdir(parents=True)
    manifest = {
        "name": "phone-price",
        "version": version,
        "created_at": "2026-01-01T00:00:00+00:00",
        "git_commit": None,
        "quick": quick,
        "libraries": {},
        "hyperparameters": {},
        "metrics": {"cv_accuracy_mean": score},
        "metrics_method": "test",
        "data": data,
        "files": {},
    }
    (folder / version / "manifest.json").write_text(json.dumps(manifest))


def test_the_gate_compares_with_baselines_the_floor_and_the_version_before_on_the_same_data(tmp_path):
    data = tmp_path / "train.csv"
    data.write_text("a,b\n1,2\n")
    same = {"train.csv": sha256_file(data)}
    repository = tmp_path / "phone_price"
    write_manifest(repository, "2026.01.01.000000", 0.979, same)
    write_manifest(repository, "2026.01.02.000000", 0.999, same, quick=True)  # a smoke test: not compared

    good = judge(
        "phone-price", {"cv_accuracy_mean": 0.975, "baselines": {"logistic regression": 0.96}}, [data], repository
    )
    assert good is not None and good.passed and good.committed == {"version": "2026.01.01.000000", "score": 0.979}
    assert "PASS" in table(good)

    worse = judge(
        "phone-price", {"cv_accuracy_mean": 0.95, "baselines": {"logistic regression": 0.96}}, [data], repository
    )
    assert worse is not None and not worse.passed
    assert any("logistic regression" in r for r in worse.reasons) and any(
        "2026.01.01.000000" in r for r in worse.reasons
    )

    random = judge("phone-price", {"cv_accuracy_mean": 0.29, "baselines": {"majority class": 0.28}}, [data], repository)
    assert random is not None and any("floor 0.9" in r for r in random.reasons)

    other_data = tmp_path / "other.csv"
    other_data.write_text("a,b\n3,4\n")  # retrained on other data: the committed score says nothing about it
    fresh = judge("phone-price", {"cv_accuracy_mean": 0.95, "baselines": {}}, [other_data], repository)
    assert fresh is not None and fresh.passed and fresh.committed is None
    assert judge("iris", {"accuracy": 0.5}, [data], repository) is None  # a model without a rule: not judged
    assert set(RULES) == {"phone-price", "house-price", "fashion", "poem"}


@pytest.fixture
def small_grid(monkeypatch):
    import training.phone_price as trainer
    from training.selection import Protocol

    monkeypatch.setattr(trainer, "PROTOCOL", Protocol(folds=2, repeats=1, stratified=True, seed=0))
    monkeypatch.setattr(trainer, "FEATURE_COUNTS", (5,))
    monkeypatch.setattr(trainer, "CS", (100.0,))
    monkeypatch.setattr(trainer, "HYPERPARAMETERS", dict(trainer.HYPERPARAMETERS, iterations=15))


@pytest.fixture
def shuffled_phones(tmp_path, data_dir):
    """The real phones with their price bands shuffled: valid data (the checks pass), nothing to learn."""
    frame = pd.read_csv(need_data(data_dir, "phone_price", "train.csv"))
    frame["price_range"] = np.random.default_rng(0).permutation(frame["price_range"].to_numpy())
    folder = tmp_path / "shuffled" / "phone_price"
    folder.mkdir(parents=True)
    frame.to_csv(folder / "train.csv", index=False)
    return folder.parent


def test_a_version_that_loses_is_not_published_unless_forced_and_then_never_the_default(
    tmp_path, shuffled_phones, small_grid, capsys
):
    from service.app import create_app
    from service.settings import Settings
    from training.__main__ import main

    out = tmp_path / "artifacts"
    shutil.copytree(ARTIFACTS / PHONE.folder, out / PHONE.folder)
    before = set(version_folders(out / PHONE.folder))
    command = ["phone-price", "--data-dir", str(shuffled_phones), "--out", str(out), "--device", "cpu"]

    with pytest.raises(SystemExit) as refused:
        main(command)
    assert refused.value.code == 3
    err = capsys.readouterr().err
    assert "verdict: FAIL" in err and "majority class" in err and "floor 0.9" in err and "--force" in err
    assert set(version_folders(out / PHONE.folder)) == before
    assert [p.name for p in (out / PHONE.folder).iterdir() if p.name.startswith(".")] == []  # no partial left

    main([*command, "--force"])
    (forced,) = set(version_folders(out / PHONE.folder)) - before
    manifest = Manifest.model_validate_json((out / PHONE.folder / forced / "manifest.json").read_text())
    assert manifest.gate is not None and manifest.gate.forced and not manifest.gate.passed

    async def scenario():
        async with serving(create_app(Settings(artifacts_dir=out), models=[PHONE])) as client:
            return (await client.get("/readyz")).json(), (await client.get("/models/phone-price")).json()

    ready, info = asyncio.run(scenario())
    assert info["version"] == max(before) and info["version"] != forced  # the good version keeps serving
    assert forced in ready["notes"]["phone-price"] and "quality gate" in ready["notes"]["phone-price"]


def test_quick_never_writes_into_the_served_artifacts(data_dir, capsys):
    from training.__main__ import SCRATCH, SERVED, main

    served = set(version_folders(SERVED / PHONE.folder))
    scratch = set(version_folders(SCRATCH / PHONE.folder))
    main(["phone-price", "--quick", "--data-dir", str(data_dir), "--device", "cpu"])
    assert set(version_folders(SERVED / PHONE.folder)) == served
    (new,) = set(version_folders(SCRATCH / PHONE.folder)) - scratch
    assert f"new version: {SCRATCH / PHONE.folder / new}" in capsys.readouterr().out

    with pytest.raises(SystemExit) as refused:
        main(["phone-price", "--quick", "--out", str(SERVED), "--data-dir", str(data_dir)])
    assert refused.value.code == 2 and "never into the served" in capsys.readouterr().err
