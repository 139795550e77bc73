"""House price over a real server on the committed model: every documented spelling of a category prices
like the trained one, codes the model never saw are refused by name, and every answer carries a 90 % interval
around its point prediction (the in-process half: tests/unit/test_house.py)."""

from __future__ import annotations

import math

import pytest

from service.models.house_price import FEATURE_TABLE, PRICE_RANGE
from tests.conftest import committed, example

HOUSE = example("house-price")


def features() -> list[dict]:
    return committed("house-price").predictor.artifact.load_json(FEATURE_TABLE)


def aliases() -> list[tuple[str, str, str]]:
    """(feature, alias, trained spelling) for every alias in the committed artifact."""
    return [
        (f["name"], alias, code)
        for f in features()
        if f["kind"] == "categorical"
        for alias, code in f["aliases"].items()
    ]


def test_every_alias_prices_exactly_like_its_trained_spelling(client):
    houses = [{**HOUSE, feature: spelling} for feature, alias, code in aliases() for spelling in (code, alias)]
    answers = client.post("/house-price/batch", json={"instances": houses})
    assert answers.status_code == 200, answers.text[:500]
    predictions = answers.json()["predictions"]
    for i, pair in enumerate(aliases()):
        assert predictions[2 * i] == predictions[2 * i + 1], pair
    # and the trained spelling is really read: another neighbourhood is another price
    assert (
        client.post("/house-price", json={**HOUSE, "Neighborhood": "Names"}).json()
        != client.post("/house-price", json={**HOUSE, "Neighborhood": "NridgHt"}).json()
    )


@pytest.mark.parametrize(
    "feature, code",
    [
        ("MSZoning", "RP"),
        ("MSZoning", "A"),
        ("Utilities", "ELO"),
        ("Condition2", "PosN"),
        ("MSSubClass", 150),
        ("MSSubClass", 150.0),
        ("RoofMatl", "ClyTile"),
        ("Exterior1st", "PreCast"),
    ],
)
def test_documented_codes_the_model_never_saw_are_priced_as_missing_with_a_warning(client, feature, code):
    """A real house may have a code no training house had (4 of the 292 held back did): it gets a price, the
    same as with that field missing, a warning naming the field, and a wider interval."""
    answer = client.post("/house-price", json={**HOUSE, feature: code})
    assert answer.status_code == 200, answer.text
    as_missing = client.post("/house-price", json={**HOUSE, feature: None}).json()
    body = answer.json()
    (warning,) = body["warnings"]
    assert warning.startswith(f"{feature}: ") and "priced as if missing" in warning
    assert body["sale_price"] == as_missing["sale_price"] and as_missing["warnings"] == []
    predictor = committed("house-price").predictor
    widened = predictor.interval_log_halfwidth + predictor.unseen_log_widening  # learned under CV by training
    low, high = body["interval_90"]
    assert math.log(high / body["sale_price"]) == pytest.approx(widened, abs=1e-4)
    assert low <= as_missing["interval_90"][0] and high >= as_missing["interval_90"][1]


@pytest.mark.parametrize(
    "feature, code", [("BldgType", "Castle"), ("BldgType", "duplx"), ("BldgType", " Duplx"), ("MSSubClass", "60")]
)
def test_any_other_spelling_is_refused_with_the_accepted_ones(client, feature, code):
    """Only the documented spellings are mapped: a fuzzer reading the enum must find every other value refused."""
    (error,) = client.post("/house-price", json={**HOUSE, feature: code}).json()["detail"]
    categories = next(f for f in features() if f["name"] == feature)["categories"]
    assert error["loc"] == ["body", feature] and all(repr(c) in error["msg"] for c in categories)


def test_every_answer_has_a_sane_interval_around_its_prediction(client):
    halfwidth = committed("house-price").predictor.interval_log_halfwidth
    assert 0.05 < halfwidth < 0.5  # a 90 % band of roughly +-5 % to +-65 %, not a degenerate one
    houses = [
        HOUSE,
        {},
        {"GrLivArea": 1500},
        {**HOUSE, "GrLivArea": 3900, "OverallQual": 10},
        {**HOUSE, "GrLivArea": 300, "OverallQual": 1, "LotArea": 0, "YearBuilt": 1800},
        {**HOUSE, "LotArea": 10_000_000, "GrLivArea": 10_000_000, "TotalBsmtSF": 10_000_000},
    ]
    predictions = client.post("/house-price/batch", json={"instances": houses}).json()["predictions"]
    assert len(predictions) == len(houses)
    for prediction in predictions:
        low, high = prediction["interval_90"]
        assert PRICE_RANGE[0] <= low <= prediction["sale_price"] <= high <= PRICE_RANGE[1]
        if PRICE_RANGE[0] < low and high < PRICE_RANGE[1]:  # not capped: the band is the conformal one
            assert math.log(high / prediction["sale_price"]) == pytest.approx(halfwidth, abs=1e-4)
            assert math.log(prediction["sale_price"] / low) == pytest.approx(halfwidth, abs=1e-4)
    assert predictions[0]["interval_90"][0] < predictions[3]["interval_90"][0]  # a bigger, better house
