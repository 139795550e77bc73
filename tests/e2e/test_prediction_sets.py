"""Prediction sets through the real server on the committed artifacts: every phone and fashion answer has a
`prediction_set` at the caller's `alpha`, on the JSON routes, v2 REST and gRPC alike; training measured their
coverage on rows it had not calibrated on. (gRPC: tests/e2e/test_v2.py compares every phone output, the set
included, with the JSON route's.)"""

from __future__ import annotations

import json

import pytest

from tests.conftest import committed, example

MODELS = ["phone-price", "fashion"]


@pytest.mark.parametrize("name", MODELS)
def test_the_committed_version_measured_its_sets_near_90_percent(name):
    entry = committed(name)
    measured = entry.manifest.metrics["prediction_set_90"]
    assert 0.88 <= measured["coverage"] <= 0.92, measured
    assert entry.predictor.conformal is not None


@pytest.mark.parametrize("name", MODELS)
def test_every_answer_has_a_set_and_a_lower_alpha_never_shrinks_it(client, name):
    labels = committed(name).predictor.Output.model_json_schema()["properties"]["prediction_set"]
    assert "at least 1 - alpha" in labels["description"]
    sets = {}
    for alpha in (0.5, 0.1, 0.01):
        answer = client.post(f"/{name}", json={**example(name), "alpha": alpha})
        assert answer.status_code == 200, answer.text
        sets[alpha] = answer.json()["prediction_set"]
        assert isinstance(sets[alpha], list)
    assert set(sets[0.5]) <= set(sets[0.1]) <= set(sets[0.01])
    default = client.post(f"/{name}", json=example(name)).json()["prediction_set"]
    assert default == sets[0.1]  # alpha 0.1 unless asked: a 90 % set


@pytest.mark.parametrize("alpha", [0, 0.6, "a lot", None])
def test_an_alpha_outside_001_to_05_is_a_422_naming_it(client, alpha):
    answer = client.post("/phone-price", json={**example("phone-price"), "alpha": alpha})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", "alpha"]


def test_v2_returns_the_set_as_an_output_and_takes_alpha_as_an_input(client):
    phone = example("phone-price")
    inputs = [{"name": "features", "datatype": "FP64", "shape": [1, 20], "data": [float(v) for v in phone.values()]}]
    inputs.append({"name": "alpha", "datatype": "FP64", "shape": [1], "data": [0.01]})
    answer = client.post("/v2/models/phone-price/infer", json={"inputs": inputs})
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    (encoded,) = outputs["prediction_set"]["data"]
    json_route = client.post("/phone-price", json={**phone, "alpha": 0.01}).json()["prediction_set"]
    assert json.loads(encoded) == json_route
