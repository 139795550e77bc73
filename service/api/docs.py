"""Swagger UI and ReDoc served from the service itself, so the docs work behind a firewall.

FastAPI's default pages load their JavaScript and fonts from CDNs; here the assets come from the
``fastapi-offline`` package's static folder (not copied into this repo).
"""

from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(fastapi_offline.__file__).parent / "static"
PREFIX = "/docs-assets"
OPENAPI = "/openapi.json"
# Same-origin only: also stops ReDoc's hard-coded "Redocly" logo from being fetched from its CDN.
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:"
)


def _same_origin_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CSP
    return page


def add_docs(app: FastAPI) -> None:
    """/docs, /redoc and /openapi.json (behind the key check unless SERVE_PUBLIC_OPS, see app.gate)."""
    app.mount(PREFIX, StaticFiles(directory=ASSETS), name="docs-assets")
    title = app.title

    @app.get(OPENAPI, include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return _same_origin_only(
            get_swagger_ui_html(
                openapi_url=OPENAPI,
                title=f"{title} - Swagger UI",
                swagger_js_url=f"{PREFIX}/swagger-ui-bundle.js",
                swagger_css_url=f"{PREFIX}/swagger-ui.css",
                swagger_favicon_url=f"{PREFIX}/favicon.png",
                swagger_ui_parameters={"tryItOutEnabled": True, "displayRequestDuration": True},
            )
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return _same_origin_only(
            get_redoc_html(
                openapi_url=OPENAPI,
                title=f"{title} - ReDoc",
                redoc_js_url=f"{PREFIX}/redoc.standalone.js",
                redoc_favicon_url=f"{PREFIX}/favicon.png",
                with_google_fonts=False,
            )
        )


def describe_uploads_as_binary(app: FastAPI) -> None:
    """FastAPI describes an UploadFile with JSON Schema's ``contentMediaType``; code generators (e.g.
    openapi-python-client) and Schemathesis look for OpenAPI's ``format: binary`` to send a file, and send
    text otherwise. The published schema says ``format: binary``."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            for component in build().get("components", {}).get("schemas", {}).values():
                for field in component.get("properties", {}).values():
                    if field.pop("contentMediaType", None) == "application/octet-stream":
                        field["format"] = "binary"
        assert app.openapi_schema is not None  # build() stores what it returns
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to change the published schema
