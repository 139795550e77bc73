"""A client no one here wrote: openapi-python-client, default settings, generated from the live server's
/openapi.json, calls every route (single, batch, upload, stream, operations) and gets a 200 from each."""

from __future__ import annotations

import importlib
import io
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.catalog import MODELS
from tests.conftest import example

PACKAGE = "course_models_server_client"


@pytest.fixture(scope="module")
def generated(server, tmp_path_factory):
    """The generated package, imported from a temporary folder."""
    tool = Path(sys.executable).with_name("openapi-python-client")
    if not tool.exists():
        pytest.skip("openapi-python-client is not installed (pip install -e '.[dev]')")
    out = tmp_path_factory.mktemp("generated")
    env = {"PATH": f"{tool.parent}:/usr/bin:/bin"}  # its ruff formatting step comes from the same venv
    subprocess.run(
        [str(tool), "generate", "--url", f"{server.url}/openapi.json", "--output-path", str(out / "client")],
        cwd=out,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    sys.path.insert(0, str(out / "client"))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(out / "client"))
        for name in [m for m in sys.modules if m.startswith(PACKAGE)]:
            del sys.modules[name]
        shutil.rmtree(out, ignore_errors=True)


def _call(generated, tag: str, operation: str, server, body: typing.Any = None, **params):
    module = importlib.import_module(f"{PACKAGE}.api.{tag}.{operation}")
    client = generated.Client(
        base_url=server.url, timeout=generated.client.httpx.Timeout(60), raise_on_unexpected_status=True
    )
    kwargs = dict(params)
    if body is not None:
        body_type = typing.get_type_hints(module.sync_detailed)["body"]
        kwargs["body"] = body_type.from_dict(body)
    return module.sync_detailed(client=client, **kwargs)


@pytest.mark.parametrize("model", MODELS, ids=[m.name for m in MODELS])
def test_every_model_route(generated, server, model):
    tag, folder, instance = model.name.replace("-", "_"), model.folder, example(model.name)
    single = _call(generated, tag, f"predict_{folder}", server, instance)
    assert single.status_code == 200, single.content[:300]
    batch = _call(generated, tag, f"predict_{folder}_batch", server, {"instances": [instance, instance]})
    assert batch.status_code == 200 and len(batch.parsed.predictions) == 2, batch.content[:300]


def test_upload_and_stream(generated, server):
    from course_models_server_client.models.body_predict_fashion_image import BodyPredictFashionImage
    from course_models_server_client.types import File

    picture = io.BytesIO()
    Image.fromarray(255 - np.array(example("fashion")["pixels"], np.uint8)).save(picture, "PNG")
    picture.seek(0)
    module = importlib.import_module(f"{PACKAGE}.api.fashion.predict_fashion_image")
    client = generated.Client(base_url=server.url, raise_on_unexpected_status=True)
    body = BodyPredictFashionImage(file=File(payload=picture, file_name="trousers.png", mime_type="image/png"))
    answer = module.sync_detailed(client=client, body=body, top_k=2)
    assert answer.status_code == 200 and answer.parsed.name == "Trouser" and len(answer.parsed.top) == 2
    stream = _call(generated, "poem", "predict_poem_stream", server, {"line_num": 1, "seed": 5})
    assert stream.status_code == 200 and stream.content.startswith(b"event: char")


@pytest.mark.parametrize(
    "operation, params",
    [("healthz", {}), ("readyz", {}), ("list_models", {}), ("get_model", {"name": "fashion"}), ("metrics", {})],
)
def test_operations(generated, server, operation, params):
    response = _call(generated, "operations", operation, server, **params)
    assert response.status_code == 200, response.content[:300]
