"""End to end over a real uvicorn server: /phone-price and /house-price, good and bad inputs."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from service import catalog
from service.models.phone_price import LABELS
from tests.conftest import committed, example, need_data, version_dir

PHONE = example("phone-price")
HOUSE = example("house-price")


def test_health_ready_and_metadata(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"]["phone-price"] == "ready"
    models = {m["name"]: m for m in client.get("/models").json()}
    assert {"phone-price", "house-price"} <= models.keys()
    phone = client.get("/models/phone-price").json()
    assert phone["state"] == "ready" and phone["version"] and phone["device"] == "cpu"
    assert phone["metrics"]["cv_accuracy_mean"] >= 0.975
    assert "battery_power" in phone["input_schema"]["properties"]
    missing = client.get("/models/nope")
    assert missing.status_code == 404 and "phone-price" in missing.json()["detail"]


def test_phone_single_and_batch_agree(client):
    one = client.post("/phone-price", json=PHONE)
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["price_range"] in range(4) and body["label"] == LABELS[body["price_range"]]
    assert len(body["probabilities"]) == 4 and math.isclose(sum(body["probabilities"]), 1, abs_tol=1e-4)
    cheap = dict(PHONE, ram=300, battery_power=600, px_height=100, px_width=600)
    rich = dict(PHONE, ram=3900, battery_power=1990, px_height=1900, px_width=1990)
    many = client.post("/phone-price/batch", json={"instances": [PHONE, cheap, rich]})
    assert many.status_code == 200, many.text
    predictions = many.json()["predictions"]
    assert predictions[0] == body  # same path, same answer
    assert predictions[1]["price_range"] == 0 and predictions[2]["price_range"] == 3  # ram dominates price


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"ram": None}, "ram", "valid integer"),
        ({"ram": "lots"}, "ram", "must be a JSON number"),
        ({"ram": True}, "ram", "must be a JSON number"),
        ({"ram": -5}, "ram", "greater than or equal"),
        ({"blue": 2}, "blue", "less than or equal to 1"),
        ({"clock_speed": float("nan")}, "clock_speed", "finite"),
        ({"clock_speed": float("inf")}, "clock_speed", "finite"),
        ({"colour": "red"}, "colour", "Extra inputs"),
    ],
)
def test_phone_bad_inputs_name_the_field(client, change, field, words):
    body = {**PHONE, **change}
    response = client.post("/phone-price", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(e["loc"][-1] == field and words in e["msg"] for e in errors), errors


def test_phone_missing_field_and_malformed_json(client):
    response = client.post("/phone-price", json={k: v for k, v in PHONE.items() if k != "wifi"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "wifi"]
    assert "Field required" in response.json()["detail"][0]["msg"]
    broken = client.post("/phone-price", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 422


def test_unknown_keys_a_few_named_many_counted(client):
    few = client.post("/phone-price", json={**PHONE, "colour": "red", "weight": 180})
    assert few.status_code == 422
    assert sorted((e["loc"][-1], e["type"]) for e in few.json()["detail"]) == [
        ("colour", "extra_forbidden"),
        ("weight", "extra_forbidden"),
    ]
    many = {**PHONE, **{f"junk{i}": i for i in range(500)}}
    flood = client.post("/phone-price/batch", json={"instances": [many] * 3})
    assert flood.status_code == 422 and len(flood.json()["detail"]) == 3  # one error per instance
    first = flood.json()["detail"][0]
    assert first["loc"] == ["body", "instances", 0] and first["msg"].startswith(
        "Value error, 500 unknown fields (junk0"
    )


def test_batch_limits(client, server):
    assert client.post("/phone-price/batch", json={"instances": []}).status_code == 422
    too_many = client.post("/phone-price/batch", json={"instances": [PHONE] * 257})
    assert too_many.status_code == 422 and "at most 256" in too_many.text
    bad_one = client.post("/phone-price/batch", json={"instances": [PHONE, {**PHONE, "ram": -1}]})
    assert bad_one.status_code == 422 and bad_one.json()["detail"][0]["loc"] == ["body", "instances", 1, "ram"]


def test_house_sparse_full_and_na(client):
    sparse = client.post("/house-price", json={"GrLivArea": 1500})
    assert sparse.status_code == 200, sparse.text
    full = client.post("/house-price", json=HOUSE).json()["sale_price"]
    assert 100_000 < full < 400_000  # a typical 2003 two-storey house in College Creek
    assert 50_000 < sparse.json()["sale_price"] < 500_000  # everything else imputed like training
    na = client.post("/house-price", json={**HOUSE, "Alley": "NA", "PoolQC": None, "Id": 7})
    assert na.status_code == 200
    bigger = client.post("/house-price", json={**HOUSE, "GrLivArea": 3000, "OverallQual": 9}).json()["sale_price"]
    assert bigger > full
    batch = client.post("/house-price/batch", json={"instances": [HOUSE, {"GrLivArea": 1500}]})
    assert batch.json()["predictions"][0]["sale_price"] == pytest.approx(full)


def test_house_unknown_category_lists_allowed_values(client):
    response = client.post("/house-price", json={**HOUSE, "Street": "Dirt"})
    assert response.status_code == 422
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", "Street"] and "'Grvl' or 'Pave'" in error["msg"]
    zoning = client.post("/house-price", json={**HOUSE, "MSZoning": "X"}).json()["detail"][0]
    assert zoning["loc"] == ["body", "MSZoning"] and "'C (all)'" in zoning["msg"]  # a category from the artifact
    assert client.post("/house-price", json={**HOUSE, "YearBuilt": 3000}).status_code == 422
    assert client.post("/house-price", json={**HOUSE, "LotArea": "big"}).status_code == 422
    assert client.post("/house-price", json={**HOUSE, "GrLivarea": 1}).status_code == 422  # typo is not ignored


def test_phone_served_answers_match_the_artifacts_own_pipeline(client, data_dir):
    """The service applies the scaler's formula itself; it must give what the fitted sklearn scaler gives."""
    import numpy as np
    import torch

    from service.models.phone_price import FEATURES

    frame = pd.read_csv(need_data(data_dir, "phone_price", "train.csv")).head(100)
    predictor = committed("phone-price").predictor
    features = predictor.preprocessor.transform(frame[FEATURES].to_numpy(dtype=np.float64))
    with torch.inference_mode():
        expected = torch.softmax(predictor.net(torch.as_tensor(features, dtype=torch.float32)), 1).numpy()
    rows = [{k: v for k, v in r.items() if k in FEATURES} for r in frame.to_dict("records")]
    served = client.post("/phone-price/batch", json={"instances": rows}).json()["predictions"]
    assert [p["price_range"] for p in served] == expected.argmax(1).tolist()
    assert np.allclose([p["probabilities"] for p in served], expected, atol=2e-6)


def test_house_accepts_every_training_row(client, data_dir):
    """Each row of the development CSV, posted as-is (NA and all), is accepted and priced sensibly."""
    path = need_data(data_dir, "house_prices", "train.csv")
    frame = pd.read_csv(path, keep_default_na=False, na_values=["NA"]).head(200)
    rows = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items() if k != "SalePrice"}
        for r in frame.to_dict("records")
    ]
    response = client.post("/house-price/batch", json={"instances": rows})
    assert response.status_code == 200, response.text[:500]
    predicted = [p["sale_price"] for p in response.json()["predictions"]]
    errors = [math.log(p) - math.log(t) for p, t in zip(predicted, frame["SalePrice"])]
    assert math.sqrt(sum(e * e for e in errors) / len(errors)) < 0.2  # mostly rows it trained on


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, reports",
    [
        ("phone-price", {"preprocessor.json", "learning_curves.png", "confusion_matrix.png"}),
        ("house-price", {"preprocessor.skops", "learning_curves.png", "features.json", "cv_predictions.json"}),
    ],
)
def test_quick_training_of_the_tabular_models(quick_artifacts, name, reports):
    folder = version_dir(quick_artifacts(name) / catalog.get(name).folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {"model.pt", "report.json"} | reports <= set(manifest["files"])
    key, most = ("iterations", 15) if name == "phone-price" else ("epochs", 15)  # the phone net's: L-BFGS
    assert manifest["hyperparameters"][key] == most
    report = json.loads((folder / "report.json").read_text())
    assert 1 <= len(report["history"]) <= most
