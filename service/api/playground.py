"""The playground at ``/``: one page where a person tries the four models in a browser.

Plain HTML, CSS and JavaScript from ``playground_assets/`` (no build step, no framework, nothing from a CDN),
read once at start-up. The page builds its forms from ``GET /models`` (each model's input schema and
example) and calls the ordinary prediction routes with the key typed into it, so it needs no route of its
own beyond these. The page and its assets are open without a key (``service.app.gate``): they hold nothing
but the code that asks for one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.errors import NotFoundError

ASSETS = Path(__file__).with_name("playground_assets")
PREFIX = "/playground-assets"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}
# Same origin only, no inline script or style: the page's own files, its API calls, and the photo a visitor
# chooses (shown from a blob: URL before it is sent).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class Asset:
    """One file of the page, held in memory with its media type and ETag (a visit costs a 304 per file)."""

    def __init__(self, path: Path) -> None:
        self.body = path.read_bytes()
        self.media_type = MEDIA_TYPES[path.suffix]
        self.etag = f'"{hashlib.sha256(self.body).hexdigest()[:16]}"'

    def response(self, request: Request) -> Response:
        headers = {"ETag": self.etag, "Cache-Control": "no-cache", "Content-Security-Policy": CSP}
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


def playground_router() -> APIRouter:
    """``GET /`` (the page) and ``GET /playground-assets/{name}`` (its stylesheet and script)."""
    assets = {path.name: Asset(path) for path in ASSETS.iterdir() if path.suffix in MEDIA_TYPES}
    page = assets.pop("index.html")
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def playground(request: Request) -> Response:
        return page.response(request)

    @router.get(PREFIX + "/{name}")
    async def playground_asset(name: str, request: Request) -> Response:
        asset = assets.get(name)
        if asset is None:
            raise NotFoundError(f"no file {PREFIX}/{name}; the playground's files: {', '.join(sorted(assets))}")
        return asset.response(request)

    return router
