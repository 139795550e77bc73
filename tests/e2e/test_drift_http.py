"""Drift alarms over HTTP on the real phone model: phones like the training ones keep every feature's PSI low,
the same phones with a quarter of their RAM make `ram` (and only `ram` among the inputs) drift.

The phones are the Kaggle test file's, which no reference profile is built from. The server is the committed
phone-price version when it carries a profile, else a ``--quick`` one trained for the session (pinned, as a
smoke-test version never serves by default)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.models.phone_price import FEATURES
from service.runtime.drift import OUTPUT, PROFILE
from tests.conftest import ARTIFACTS, need_data, running_server, version_dir

PHONES = 400  # the window holds exactly these: the second round replaces the first
STABLE, DRIFTED = 0.15, 0.25


@pytest.fixture(scope="module")
def phone_versions(quick_artifacts) -> tuple[Path, str]:
    """(artifacts folder, version) of a phone-price version with a profile."""
    committed = version_dir(ARTIFACTS / "phone_price")
    if (committed / PROFILE).is_file():
        return ARTIFACTS, committed.name
    out = quick_artifacts("phone-price")  # the committed version predates profiles: train one on a data slice
    folder = version_dir(out / "phone_price")
    if not (folder / PROFILE).is_file():
        pytest.skip(f"the phone-price version {folder.name} has no {PROFILE}: retrain it to watch drift")
    return out, folder.name


def drift(client, version: str) -> dict[str, float]:
    """phone-price's model_feature_drift_psi by feature, for that version, from /metrics."""
    text = client.get("/metrics").text
    return {
        sample.labels["feature"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "model_feature_drift_psi"
        and sample.labels["model"] == "phone-price"
        and sample.labels["version"] == version
    }


def send(client, phones: list[dict]) -> None:
    for start in range(0, len(phones), 100):
        response = client.post("/phone-price/batch", json={"instances": phones[start : start + 100]})
        assert response.status_code == 200, response.text


def test_phones_like_the_training_ones_are_stable_and_a_quarter_of_the_ram_drifts(data_dir, phone_versions):
    frame = pd.read_csv(need_data(data_dir, "phone_price", "test.csv"))
    phones = frame[FEATURES].head(PHONES).to_dict("records")
    assert len(phones) == PHONES
    artifacts, version = phone_versions
    with (
        running_server(
            artifacts_dir=str(artifacts),
            models='["phone-price"]',
            model_versions=json.dumps({"phone-price": version}),
            drift_window=str(PHONES),
            drift_min_count="200",
        ) as server,
        server.client() as client,
    ):
        send(client, phones)
        stable = drift(client, version)
        assert set(stable) == {*FEATURES, OUTPUT}
        worst = max(stable, key=stable.__getitem__)
        print(f"in distribution: largest PSI {stable[worst]:.4f} ({worst})")
        assert stable[worst] < STABLE, stable

        send(client, [dict(phone, ram=phone["ram"] // 4) for phone in phones])  # the whole window again
        shifted = drift(client, version)
        others = {feature: value for feature, value in shifted.items() if feature not in ("ram", OUTPUT)}
        worst = max(others, key=others.__getitem__)
        print(
            f"ram / 4: ram {shifted['ram']:.4f}, output {shifted[OUTPUT]:.4f}, "
            f"largest other {others[worst]:.4f} ({worst})"
        )
        assert shifted["ram"] > DRIFTED, shifted
        assert others[worst] < STABLE, shifted
        assert shifted[OUTPUT] > DRIFTED  # the answers move too: ram is what prices a phone most

        models = client.get("/models/phone-price")
        assert models.status_code == 200 and models.json()["version"] == version
