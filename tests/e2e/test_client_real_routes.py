"""The shipped client (client/__init__.py) against the real server, on every real route (its logic on the stub
model, in process: tests/unit/test_client.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from client import Client, ServiceError
from tests.conftest import example


def test_sync_client_on_every_real_route(server):
    picture = io.BytesIO()
    Image.fromarray(255 - np.array(example("fashion")["pixels"], np.uint8)).save(picture, "PNG")
    with Client(server.url) as client:
        assert client.ready()
        assert {m["name"] for m in client.models()} == {"phone-price", "house-price", "poem", "fashion"}
        phone = client.predict("phone-price", example("phone-price"))
        assert client.predict_many("phone-price", [example("phone-price")] * 3, batch_size=2) == [phone] * 3
        assert client.predict("house-price", example("house-price"))["sale_price"] > 0
        assert client.upload("fashion", picture.getvalue(), top_k=2)["name"] == "Trouser"
        events = list(client.stream("poem", {"line_num": 1, "seed": 3}))
        assert events[-1][0] == "poem" and events[-1][1] == client.predict("poem", {"line_num": 1, "seed": 3})
        assert "".join(data["char"] for name, data in events[:-1]) == events[-1][1]["poem"]
        with pytest.raises(ServiceError) as missing:
            client.predict("phone-price", {})
        assert missing.value.status == 422
