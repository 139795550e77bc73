"""A tampered tabular artifact is refused while the other model serves: in process, on a copy of the committed
artifacts (the HTTP tests of the tabular models: tests/e2e/test_tabular_api.py)."""

from __future__ import annotations

import asyncio

from service import catalog
from service.app import create_app
from service.settings import Settings
from tests.conftest import example, serving, version_dir

PHONE = example("phone-price")
HOUSE = example("house-price")


def test_tampered_artifact_is_refused_while_other_model_serves(artifacts_copy):
    weights = version_dir(artifacts_copy / "house_price") / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    weights.write_bytes(bytes(data))
    models = [catalog.get("phone-price"), catalog.get("house-price")]

    async def scenario():
        async with serving(create_app(Settings(artifacts_dir=artifacts_copy), models=models)) as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert "sha256" in ready.json()["models"]["house-price"]
            assert ready.json()["models"]["phone-price"] == "ready"
            house = await client.post("/house-price", json=HOUSE)
            assert house.status_code == 503 and "sha256" in house.json()["detail"]
            assert (await client.get("/models/house-price")).json()["state"] == "failed"
            assert (await client.post("/phone-price", json=PHONE)).status_code == 200

    asyncio.run(scenario())
