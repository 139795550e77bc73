"""`python -m training <model> --quick` on a data slice writes a complete, loadable, servable artifact."""

from __future__ import annotations

import json

import pytest
import torch

from service.artifacts import Artifact
from service.models.house_price import House, HousePrice
from service.models.phone_price import Phone, PhonePrice
from training.__main__ import main

CASES = [
    (PhonePrice, Phone, {"learning_curves.png", "confusion_matrix.png"}),
    (HousePrice, House, {"learning_curves.png"}),
]


@pytest.mark.slow
@pytest.mark.parametrize("predictor_cls, schema, reports", CASES, ids=[c[0].name for c in CASES])
def test_quick_training_writes_a_servable_artifact(tmp_path, data_dir, predictor_cls, schema, reports):
    main([predictor_cls.name, "--quick", "--out", str(tmp_path), "--data-dir", str(data_dir), "--device", "cpu"])
    folder = tmp_path / predictor_cls.folder
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {"model.pt", "preprocessor.joblib", "report.json"} | reports <= set(manifest["files"])
    assert manifest["name"] == predictor_cls.name and manifest["hyperparameters"]["epochs"] == 15
    assert all(len(h) == 64 for h in manifest["data"].values())
    report = json.loads((folder / "report.json").read_text())
    assert 1 <= len(report["history"]) <= 15 and report["best_epoch"] >= 1

    predictor = predictor_cls()
    predictor.load(Artifact(folder), torch.device("cpu"))
    example = schema.model_validate(schema.model_config["json_schema_extra"]["examples"][0])
    (output,) = predictor.predict([example])
    assert isinstance(output, predictor_cls.Output)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="DATA_DIR"):
        main(["phone-price", "--quick", "--out", str(tmp_path), "--data-dir", str(tmp_path / "nowhere")])
