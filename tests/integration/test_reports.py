"""The training report routes, GET /models/{name}/report (HTML, ?format=json) and /models/{name}/report/{file}
(a PNG checked against the manifest), in process on the stub model with an artifact that holds figures, a
quality gate and strings that must be escaped (the committed models' reports: tests/e2e/test_reports_real.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import quote

import pytest

from service.app import create_app
from service.artifacts import QualityGate, publish_version, staging_folder, write_artifact
from service.settings import Settings
from tests.conftest import serving
from tests.stubs import DOUBLER, write_stub_artifacts

PNG = b"\x89PNG\r\n\x1a\n" + b"not really an image, but the route sends bytes, it does not decode them"
ODD = "odd <b>&\"name'.png"  # a file name the page must escape (and its link encode)
GATE = QualityGate(
    metric="cv_accuracy_mean",
    higher_is_better=True,
    score=0.97,
    baselines={"<i>majority</i>": 0.25, "ridge": 0.9},
    floor=0.8,
    committed={"version": "2026.01.01.000000", "score": 0.96},
    passed=True,
)


def write_reported(artifacts_dir: Path) -> Path:
    """The stub's artifact with two PNGs, a JSON file and a quality gate; returns the version's folder."""
    folder = staging_folder(artifacts_dir / DOUBLER.folder)
    (folder / "learning_curves.png").write_bytes(PNG)
    (folder / ODD).write_bytes(PNG[::-1])
    (folder / "report.json").write_text('{"history": []}\n')
    write_artifact(
        folder,
        name=DOUBLER.name,
        hyperparameters={"secret_sauce": 1},
        metrics={"accuracy": 0.97, "per_class": {"<script>alert(1)</script>": 0.5}, "note": "a < b"},
        metrics_method="<b>held-out</b> split",
        data_files=[],
        gate=GATE,
        version="2026.02.02.000000",
    )
    return publish_version(folder)


@pytest.fixture
def reported(tmp_path):
    """``(make_app(**settings), version folder)``: the app on a private artifact that a test may tamper with."""
    folder = write_reported(tmp_path)
    return (lambda **settings: create_app(Settings(artifacts_dir=tmp_path, **settings), models=[DOUBLER])), folder


def call(app, *requests: tuple[str, dict]) -> list:
    async def scenario():
        async with serving(app) as client:
            return [await client.get(path, headers=headers) for path, headers in requests]

    return asyncio.run(scenario())


def test_the_page_shows_the_report_escaped_and_links_every_png(reported):
    make, _ = reported
    (page,) = call(make(), ("/models/doubler/report", {}))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["x-model-version"] == "2026.02.02.000000"
    assert "script-src" not in page.headers["content-security-policy"]  # runs nothing
    html = page.text
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;held-out&lt;/b&gt; split" in html and "a &lt; b" in html
    assert "2026.02.02.000000" in html and "0.97" in html and "secret_sauce" not in html  # not on /models either
    # the gate: score, each baseline, floor, the committed version's score, the verdict
    assert all(s in html for s in ("&lt;i&gt;majority&lt;/i&gt;", "0.25", "0.8", "2026.01.01.000000", "0.96", "passed"))
    assert '<img src="report/learning_curves.png"' in html
    assert f'<img src="report/{quote(ODD, safe="")}" alt="{"odd &lt;b&gt;&amp;&quot;name&#x27;.png"}"' in html
    assert "report.json" not in html  # figures only


def test_a_linked_png_is_sent_with_its_bytes_and_cache_headers(reported):
    make, _ = reported
    plain, odd = call(
        make(), ("/models/doubler/report/learning_curves.png", {}), (f"/models/doubler/report/{quote(ODD)}", {})
    )
    assert plain.status_code == 200 and plain.content == PNG and plain.headers["content-type"] == "image/png"
    assert plain.headers["cache-control"] == "private, no-cache" and plain.headers["etag"]
    assert odd.status_code == 200 and odd.content == PNG[::-1]
    (again,) = call(make(), ("/models/doubler/report/learning_curves.png", {"If-None-Match": plain.headers["etag"]}))
    assert again.status_code == 304 and not again.content


@pytest.mark.parametrize("file", ["report.json", "manifest.json", "nothing.png", "model.pt"])
def test_a_name_that_is_not_a_listed_png_is_404_naming_the_images(reported, file):
    make, _ = reported
    (response,) = call(make(), (f"/models/doubler/report/{file}", {}))
    assert response.status_code == 404, response.text
    assert "its images: learning_curves.png, odd <b>" in response.json()["detail"]


def test_a_path_out_of_the_folder_matches_no_route(reported):
    make, _ = reported
    responses = call(make(), *[(f"/models/doubler/report/{p}", {}) for p in ("..%2Fmanifest.json", "..%2F..%2Fx.png")])
    assert [r.status_code for r in responses] == [404, 404] and all(r.content != PNG for r in responses)


def test_a_tampered_png_is_refused(reported):
    make, folder = reported
    app = make()

    async def scenario():
        async with serving(app) as client:  # verified when it loaded; changed on disk since
            (folder / "learning_curves.png").write_bytes(PNG + b"tampered")
            return await client.get("/models/doubler/report/learning_curves.png")

    response = asyncio.run(scenario())
    assert response.status_code == 503 and response.headers["content-type"] == "application/json"
    assert "sha256 of doubler/2026.02.02.000000/learning_curves.png does not match" in response.json()["detail"]
    assert str(folder) not in response.text  # no server path


def test_the_json_variant_carries_the_same_content(reported):
    make, _ = reported
    report, info = call(make(), ("/models/doubler/report?format=json", {}), ("/models/doubler", {}))
    assert report.status_code == 200 and report.headers["content-type"] == "application/json"
    body = report.json()
    assert body["name"] == "doubler" and body["version"] == "2026.02.02.000000" and body["quick"] is False
    assert body["metrics"] == info.json()["metrics"] and body["metrics_method"] == "<b>held-out</b> split"
    assert body["gate"] == GATE.model_dump()
    assert body["images"] == {
        "learning_curves.png": "/models/doubler/report/learning_curves.png",
        ODD: f"/models/doubler/report/{quote(ODD, safe='')}",
    }
    assert info.json()["report"] == "/models/doubler/report"


def test_a_version_from_before_quality_gates_says_so(stub_artifacts):
    app = create_app(Settings(artifacts_dir=stub_artifacts), models=[DOUBLER])
    page, as_json = call(app, ("/models/doubler/report", {}), ("/models/doubler/report?format=json", {}))
    assert "trained before quality gates" in page.text and "This version has no figures" in page.text
    assert as_json.json()["gate"] is None and as_json.json()["images"] == {}


def test_unknown_model_is_the_same_404_as_its_metadata_and_a_model_not_serving_is_503(tmp_path, reported):
    make, _ = reported
    info, report, image = call(
        make(), ("/models/nope", {}), ("/models/nope/report", {}), ("/models/nope/report/a.png", {})
    )
    assert info.status_code == report.status_code == image.status_code == 404
    assert info.json() == report.json() == image.json()
    write_stub_artifacts(tmp_path / "pinned")
    down = create_app(Settings(artifacts_dir=tmp_path / "pinned", model_versions={"doubler": "gone"}), models=[DOUBLER])
    report, image = call(down, ("/models/doubler/report", {}), ("/models/doubler/report/a.png", {}))
    assert report.status_code == image.status_code == 503
    assert "model 'doubler' is not available" in report.json()["detail"] and "gone" in report.json()["detail"]


@pytest.mark.parametrize("public_ops", [True, False])
def test_the_report_is_as_open_as_the_model_metadata(reported, public_ops):
    """With API keys set, /models/{m}/report and its images follow /models/{m}: open with SERVE_PUBLIC_OPS,
    a key needed without it; the model's own route needs one either way."""
    make, _ = reported
    paths = ["/models/doubler", "/models/doubler/report", "/models/doubler/report/learning_curves.png"]
    key = {"X-API-Key": "k"}
    responses = call(
        make(api_keys=["k"], public_ops=public_ops),
        *[(p, {}) for p in [*paths, "/doubler"]],
        *[(p, key) for p in paths],
    )
    without, with_key = responses[: len(paths) + 1], responses[len(paths) + 1 :]
    assert [r.status_code for r in without] == [200 if public_ops else 401] * len(paths) + [401]
    assert [r.status_code for r in with_key] == [200] * len(paths)
