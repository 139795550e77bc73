"""Every committed model's training report over the real server: the page answers, and every figure it links
answers as a PNG whose bytes are the committed file's (the routes in detail: tests/integration/test_reports.py)."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest

from service.catalog import MODELS
from tests.conftest import ARTIFACTS


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_each_report_answers_and_every_linked_png_is_served(client, model):
    page = client.get(f"/models/{model.name}/report")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.text[:500]
    folder = ARTIFACTS / model.folder / page.headers["x-model-version"]  # the committed version serving
    assert folder.is_dir()
    linked = re.findall(r'<img src="report/([^"]+)"', page.text)
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert sorted(unquote(name) for name in linked) == pngs and pngs, (linked, pngs)
    for name in linked:
        image = client.get(f"/models/{model.name}/report/{name}")
        assert image.status_code == 200 and image.headers["content-type"] == "image/png", (name, image.text[:300])
        assert image.content == (folder / unquote(name)).read_bytes()
    as_json = client.get(f"/models/{model.name}/report", params={"format": "json"}).json()
    assert as_json["version"] == folder.name and sorted(as_json["images"]) == pngs
    assert client.get(f"/models/{model.name}").json()["report"] == f"/models/{model.name}/report"
