"""Drift alarms (service/runtime/drift.py): the bins, the PSI and its floor, the sliding window, the minimum
count, failed items left out, the gauges published and forgotten; and, in process on a stub model whose
artifact carries a profile, the registry watching each loaded version and forgetting a retired one.
tests/e2e/test_drift_http.py serves the real phone model."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.artifacts import Artifact, publish_version, staging_folder, write_artifact
from service.catalog import Model
from service.models.base import InputError
from service.runtime import drift
from service.runtime.drift import FLOOR, OUTPUT, PROFILE, Bins, DriftWatcher, Profile, psi
from service.runtime.metrics import Metrics
from service.settings import Settings
from tests.conftest import committed, serving
from tests.stubs import Doubler
from training import profile as training_profile

RNG = np.random.default_rng(0)


def reference_columns(rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A number, a 0/1 flag and a text category, as a model's raw inputs might be."""
    return {
        "size": rng.normal(100.0, 15.0, rows),
        "flag": rng.integers(0, 2, rows).astype(np.float64),
        "colour": rng.choice(np.array(["red", "green", "blue"], dtype=object), rows, p=[0.5, 0.3, 0.2]),
    }


def answers(columns: dict[str, np.ndarray]) -> np.ndarray:
    return (columns["size"] > 100).astype(np.float64)  # a classifier's class, 0 or 1


REFERENCE = reference_columns(5000, RNG)
PROFILE_JSON = training_profile.build(REFERENCE, answers(REFERENCE), "synthetic", classes=[0, 1])


class Columns:
    """A stand-in predictor: ``drift_columns`` hands back the columns it is given as the batch."""

    def drift_columns(self, batch: dict[str, np.ndarray], outputs: Any) -> dict[str, np.ndarray]:
        return {**batch, OUTPUT: answers(batch)}


def watcher(window: int = 1000, min_count: int = 200, metrics: Metrics | None = None) -> DriftWatcher:
    return DriftWatcher(
        "m", "v1", Profile.from_json(PROFILE_JSON), window=window, min_count=min_count, metrics=metrics or Metrics()
    )


def feed(w: DriftWatcher, columns: dict[str, np.ndarray], outputs: list | None = None) -> None:
    rows = len(columns["size"])
    w.observe(Columns(), columns, outputs if outputs is not None else [object()] * rows)  # type: ignore[arg-type]


def shifted(columns: dict[str, np.ndarray], by: float) -> dict[str, np.ndarray]:
    return {**columns, "size": columns["size"] + by}


def gauge(metrics: Metrics, feature: str, version: str = "v1", model: str = "m") -> float | None:
    return metrics.registry.get_sample_value(
        "model_feature_drift_psi", {"model": model, "version": version, "feature": feature}
    )


def window_gauge(metrics: Metrics, version: str = "v1", model: str = "m") -> float | None:
    return metrics.registry.get_sample_value("model_drift_window_size", {"model": model, "version": version})


# -- bins and the index ------------------------------------------------------------------------------------


def test_numeric_bins_are_right_closed_with_a_slot_for_missing_values():
    bins = Bins.numeric("x", [1.0, 2.0, 3.0])
    assert bins.slots == 5
    values = np.array([-5, 1, 1.5, 2, 3, 3.01, 1e9, np.nan])
    assert bins.index(values).tolist() == [0, 0, 1, 1, 2, 3, 3, 4]
    with pytest.raises(ValueError, match="increasing"):
        Bins.numeric("x", [1.0, 1.0])


def test_categories_match_numbers_and_text_and_put_unseen_values_in_other():
    flags = Bins.categorical("flag", [0, 1])
    assert flags.index(np.array([1.0, 0.0, 2.0, np.nan])).tolist() == [1, 0, 2, 2]  # 2 and missing: other
    with_missing = Bins.categorical("alley", ["Grvl", "Pave", None])
    values = np.array(["Pave", None, "Grvl", "Dirt", np.nan], dtype=object)
    assert with_missing.index(values).tolist() == [1, 2, 0, 3, 2]


def test_training_profiles_numbers_few_valued_numbers_text_and_classes():
    features = PROFILE_JSON["features"]
    assert list(features) == ["size", "flag", "colour", OUTPUT]
    assert features["size"]["kind"] == "numeric" and len(features["size"]["edges"]) == 9  # ten quantile bins
    assert np.allclose(features["size"]["shares"][:10], 0.1, atol=0.002)  # a tenth of the rows in each
    assert features["flag"] == {**features["flag"], "kind": "categorical", "categories": [0, 1]}
    assert features["colour"]["categories"] == ["blue", "green", "red"]
    assert features[OUTPUT]["categories"] == [0, 1]
    for feature in features.values():
        assert math.isclose(sum(feature["shares"]), 1.0, abs_tol=1e-5)
        assert feature["shares"][-1] == 0  # nothing missing or other in the reference
    # repeated deciles merge: a feature that is mostly zero keeps one bin for the zeros
    zeros = training_profile.bins_of("pool", np.r_[np.zeros(900), np.arange(1, 101.0)])
    assert zeros.edges is not None and zeros.edges.tolist() == [0.0]
    assert zeros.shares is not None and zeros.shares.tolist() == [0.9, 0.1, 0.0]  # zeros, the rest, missing


# -- PSI ---------------------------------------------------------------------------------------------------


def test_psi_is_zero_for_equal_shares_and_the_textbook_sum_otherwise():
    p = np.array([0.25, 0.25, 0.5])
    assert psi(p, p) == 0
    q = np.array([0.5, 0.25, 0.25])
    assert math.isclose(psi(p, q), sum((b - a) * math.log(b / a) for a, b in zip(p, q)))


def test_an_empty_share_is_floored_so_the_psi_stays_finite():
    p, q = np.array([0.5, 0.5, 0.0]), np.array([0.0, 0.5, 0.5])
    value = psi(p, q)
    expected = 2 * (0.5 - FLOOR) * math.log(0.5 / FLOOR)
    assert math.isfinite(value) and math.isclose(value, expected)


def test_an_in_distribution_window_has_a_small_psi_and_a_shifted_feature_a_large_one():
    metrics = Metrics()
    w = watcher(metrics=metrics)
    feed(w, reference_columns(1000, np.random.default_rng(1)))
    w.refresh()
    values = {f: gauge(metrics, f) for f in ("size", "flag", "colour", OUTPUT)}
    assert all(v is not None and 0 <= v < 0.05 for v in values.values()), values  # ~9/1000 expected for ten bins
    assert window_gauge(metrics) == 1000

    other = Metrics()
    w = watcher(metrics=other)
    feed(w, shifted(reference_columns(1000, np.random.default_rng(2)), by=15.0))  # one standard deviation
    w.refresh()
    assert gauge(other, "size") > 0.25  # drifted
    assert gauge(other, OUTPUT) > 0.25  # and so are the answers that follow from it
    assert gauge(other, "flag") < 0.05 and gauge(other, "colour") < 0.05  # the rest has not moved


# -- the window --------------------------------------------------------------------------------------------


def test_the_window_slides_and_its_counts_are_the_last_rows():
    rng = np.random.default_rng(3)
    w = watcher(window=300, min_count=100)
    feed(w, reference_columns(300, rng))
    w.refresh()
    assert w.psi["size"] < 0.1
    batches = [shifted(reference_columns(100, rng), by=30.0) for _ in range(3)]
    for batch in batches:  # 300 shifted rows in batches of 100: the in-distribution ones leave
        feed(w, batch)
    w.refresh()
    assert w.size == 300 and w.psi["size"] > 1.0
    recent = reference_columns(250, rng)
    feed(w, recent)  # one batch, most of the window
    w.refresh()
    fresh = watcher(window=300, min_count=100)
    feed(fresh, {name: values[-50:] for name, values in batches[-1].items()})
    feed(fresh, recent)
    fresh.refresh()
    # same window contents as a watcher fed only the last 300 rows (the counts do not depend on the history)
    assert w.counts.sum() == fresh.counts.sum() == 300 * len(w.features)
    assert w.counts.tolist() == fresh.counts.tolist() and w.psi == fresh.psi
    # a batch larger than the window keeps its last rows only
    feed(w, reference_columns(1000, rng))
    w.refresh()
    assert w.size == 300 and w.psi["size"] < 0.1


def test_nothing_is_exported_below_the_minimum_count():
    metrics = Metrics()
    w = watcher(window=500, min_count=200, metrics=metrics)
    feed(w, reference_columns(199, np.random.default_rng(4)))
    w.refresh()
    assert gauge(metrics, "size") is None and window_gauge(metrics) is None
    assert w.status()["max_psi"] is None and w.status()["window_size"] == 199
    feed(w, reference_columns(1, np.random.default_rng(5)))
    w.refresh()
    assert gauge(metrics, "size") is not None and window_gauge(metrics) == 200


def test_failed_items_are_not_counted():
    w = watcher(window=100, min_count=1)
    columns = reference_columns(10, np.random.default_rng(6))
    outputs: list = [object()] * 10
    outputs[3] = InputError("refused", "size")
    outputs[7] = RuntimeError("broke")
    feed(w, columns, outputs)
    assert w.size == 8
    feed(w, reference_columns(2, np.random.default_rng(7)), [ValueError("x"), ValueError("y")])
    assert w.size == 8


def test_gauges_are_set_at_most_every_half_second_and_at_every_scrape():
    metrics = Metrics()
    w = watcher(window=1000, min_count=10, metrics=metrics)
    feed(w, reference_columns(100, np.random.default_rng(8)))
    assert window_gauge(metrics) == 100  # the first export is at once
    feed(w, reference_columns(100, np.random.default_rng(10)))
    assert window_gauge(metrics) == 100  # within PUBLISH_S of the last: not yet
    metrics.exposition()  # a scrape publishes what changed
    assert window_gauge(metrics) == 200
    w.published_at = time.monotonic() - drift.PUBLISH_S
    feed(w, reference_columns(100, np.random.default_rng(11)))
    assert window_gauge(metrics) == 300


def test_a_closed_watcher_stops_being_reported():
    metrics = Metrics()
    w = watcher(window=100, min_count=10, metrics=metrics)
    feed(w, reference_columns(50, np.random.default_rng(12)))
    assert gauge(metrics, "size") is not None
    w.close()
    assert gauge(metrics, "size") is None and window_gauge(metrics) is None
    assert b"model_feature_drift_psi{" not in metrics.exposition()[0]
    feed(w, reference_columns(50, np.random.default_rng(13)))
    assert gauge(metrics, "size") is None  # closed for good


def test_a_broken_drift_columns_stops_watching_without_failing_the_batch():
    class Broken:
        def drift_columns(self, batch, outputs):
            return {"size": batch["size"]}  # no "flag": the profile's features are not all there

    w = watcher(window=100, min_count=1)
    w.observe(Broken(), reference_columns(5, RNG), [object()] * 5)  # type: ignore[arg-type]
    assert w.status()["watched"] is False and "KeyError" in w.status()["reason"]


def test_a_profile_that_does_not_read_is_refused_with_the_reason():
    bad = {**PROFILE_JSON, "features": {"size": {**PROFILE_JSON["features"]["size"], "shares": [1.0]}}}
    with pytest.raises(ValueError, match="11 non-negative numbers"):
        Profile.from_json(bad)


# -- in the server, on a stub model ------------------------------------------------------------------------


class WatchedDoubler(Doubler):
    """The stub model, with drift columns: its input ``x`` and its answer ``y``."""

    def drift_columns(self, batch: list, outputs: Any) -> dict[str, np.ndarray]:
        return {
            "x": np.array([item.x for item in batch]),
            OUTPUT: np.array([getattr(out, "y", np.nan) for out in outputs]),
        }


WATCHED = Model("watched", "tests.unit.test_drift:WatchedDoubler")
ADMIN = {"X-API-Key": "admin-key"}


def write_watched(artifacts: Path, version: str, with_profile: bool = True) -> None:
    folder = staging_folder(artifacts / WATCHED.folder)
    if with_profile:
        x = np.random.default_rng(0).uniform(0, 100, 2000)
        training_profile.write(folder, {"x": x}, 2 * x, "uniform x from 0 to 100")
    write_artifact(
        folder,
        name=WATCHED.name,
        hyperparameters={},
        metrics={},
        metrics_method="a stub",
        data_files=[],
        version=version,
    )
    publish_version(folder)


def series(text: str, metric: str, version: str) -> dict[str, float]:
    """The watched model's samples of ``metric`` for ``version`` in a /metrics text, by feature (or "")."""
    return {
        sample.labels.get("feature", ""): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == metric and sample.labels.get("model") == "watched" and sample.labels["version"] == version
    }


def test_the_server_watches_each_version_with_a_profile_and_forgets_a_retired_one(tmp_path):
    artifacts = tmp_path / "artifacts"
    write_watched(artifacts, "1")
    assert PROFILE in Artifact(artifacts / WATCHED.folder / "1").manifest.files  # hashed like every file
    settings = Settings(artifacts_dir=artifacts, admin_keys=["admin-key"], drift_window=1000, drift_min_count=100)
    rng = np.random.default_rng(1)

    async def scenario():
        async with serving(create_app(settings, models=[WATCHED])) as client:
            for _ in range(4):
                instances = [{"x": float(v)} for v in rng.uniform(0, 100, 50)] + [{"x": -1.0}]  # one refused
                assert (await client.post("/watched/batch", json={"instances": instances})).status_code == 422
                instances = [{"x": float(v)} for v in rng.uniform(0, 100, 50)]
                assert (await client.post("/watched/batch", json={"instances": instances})).status_code == 200
            text = (await client.get("/metrics")).text
            values = series(text, "model_feature_drift_psi", "1")
            assert set(values) == {"x", OUTPUT} and all(v < 0.1 for v in values.values()), values
            # every item predicted is counted but the refused ones: 8 batches of 50
            assert series(text, "model_drift_window_size", "1") == {"": 400}
            state = (await client.get("/admin/models", headers=ADMIN)).json()["workers"][0]["models"]["watched"]
            watched = state["versions"]["1"]["drift"]
            assert watched["watched"] and watched["window_size"] == 400 and watched["max_psi"] < 0.1

            instances = [{"x": float(v)} for v in rng.uniform(200, 300, 200)]  # out of the reference's range
            assert (await client.post("/watched/batch", json={"instances": instances})).status_code == 200
            assert series((await client.get("/metrics")).text, "model_feature_drift_psi", "1")["x"] > 0.25

            write_watched(artifacts, "2", with_profile=False)  # trained before profiles: served, not watched
            assert (await client.post("/admin/models/watched/load", headers=ADMIN)).status_code == 200
            text = (await client.get("/metrics")).text
            assert not series(text, "model_feature_drift_psi", "1") and not series(text, "model_drift_window_size", "1")
            state = (await client.get("/admin/models", headers=ADMIN)).json()["workers"][0]["models"]["watched"]
            assert list(state["versions"]) == ["1", "2"] and state["default"] == "2"
            assert state["versions"]["2"]["drift"]["watched"] is False
            assert PROFILE in state["versions"]["2"]["drift"]["reason"]

    asyncio.run(scenario())


def test_house_drift_columns_hold_an_unseen_code_as_sent_and_the_price_as_output():
    entry = committed("house-price")
    predictor = entry.predictor
    houses = [
        entry.Input.model_validate({**predictor.example, "MSZoning": "A"}),  # documented, no training house had it
        entry.Input.model_validate({**predictor.example, "MSZoning": None}),  # missing
        entry.Input.model_validate(predictor.example),
    ]
    table = predictor.to_table(houses)
    assert [str(v) for v in table["MSZoning"]] == ["nan", "nan", "RL"]  # priced as missing
    predictor.last_table = table
    columns = predictor.drift_columns(houses, [predictor.Output(sale_price=1e5, interval_90=[9e4, 2e5])] * 3)
    assert columns["MSZoning"][0] == "A" and columns["MSZoning"][1] != columns["MSZoning"][1]
    assert table["MSZoning"][0] != table["MSZoning"][0]  # the table itself is left as it was
    assert columns[OUTPUT].tolist() == [1e5] * 3
    bins = Bins.categorical("MSZoning", ["RL", "RM", None])
    assert bins.index(columns["MSZoning"]).tolist() == [3, 2, 0]  # other, missing, RL
