"""The playground at ``/`` through the real app factory on the stub model, in process: the page and its assets
with their media types, open without a key while the API behind them is not, and the docs still where they were
(the page in a browser: tests/e2e/test_playground_browser.py)."""

from __future__ import annotations

import asyncio
import re

from service.api.playground import ASSETS, PREFIX
from tests.conftest import serving

MEDIA_TYPES = {".css": "text/css", ".js": "text/javascript"}


def test_the_page_its_assets_and_the_docs_are_served(stub_app):
    async def scenario():
        async with serving(stub_app()) as client:
            page = await client.get("/")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert "default-src 'none'" in page.headers["content-security-policy"]
            linked = set(re.findall(rf'(?:href|src)="({PREFIX}/[^"]+)"', page.text))
            assert linked == {f"{PREFIX}/{name}" for name in ("playground.css", "playground.js")}
            for path in linked:
                asset = await client.get(path)
                assert asset.status_code == 200, path
                assert asset.headers["content-type"].startswith(MEDIA_TYPES[path[path.rindex(".") :]]), path
                assert asset.content == (ASSETS / path.rsplit("/", 1)[1]).read_bytes()
                again = await client.get(path, headers={"If-None-Match": asset.headers["etag"]})
                assert again.status_code == 304 and again.content == b""
            missing = await client.get(f"{PREFIX}/index.html")  # the page lives at / only
            assert missing.status_code == 404 and "playground.js" in missing.json()["detail"]
            for docs in ("/docs", "/redoc"):
                response = await client.get(docs)
                assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")

    asyncio.run(scenario())


def test_the_page_and_its_assets_need_no_key_but_the_models_behind_them_do(stub_app):
    async def scenario():
        async with serving(stub_app(api_keys=["k"], public_ops=False)) as client:
            for path in ("/", f"{PREFIX}/playground.js", f"{PREFIX}/playground.css"):
                assert (await client.get(path)).status_code == 200, path
            assert (await client.get("/models")).status_code == 401  # the page asks for the key, then lists
            assert (await client.get("/models", headers={"X-API-Key": "k"})).status_code == 200

    asyncio.run(scenario())
