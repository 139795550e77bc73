"""How errors reach clients: every 4xx says what was wrong and what to send instead; a 500 names a request id."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.errors import InputError, ServiceError

log = logging.getLogger("service.errors")

SEND_JSON = (
    "send one JSON object with the header 'Content-Type: application/json' (curl: -H 'content-type: application/json')"
)
SEND_FILE = "send the file as multipart/form-data in a part named 'file' (curl: -F file=@picture.png)"


def _explain(error: dict[str, Any], content_type: str) -> str:
    """Pydantic's message, or a plainer one for the mistakes people make most: the wrong content type, a
    body that is not JSON, a text field or a raw body where a file is expected."""
    loc, kind, msg = tuple(error.get("loc", ())), error.get("type", ""), error.get("msg", "")
    if loc == ("body",) and kind in ("model_attributes_type", "dict_type") and "json" not in content_type:
        return f"the body was not read as JSON (Content-Type: {content_type or 'none'}); {SEND_JSON}"
    if kind == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON ({reason}, at character {loc[-1] if len(loc) > 1 else '?'}); {SEND_JSON}"
    if loc == ("body", "file") and kind == "missing" and not content_type.startswith("multipart/form-data"):
        return f"no file part in a {content_type or 'body without Content-Type'}; {SEND_FILE}"
    if loc == ("body", "file") and "Expected UploadFile" in msg:
        return f"'file' was sent as a text field, not as a file; {SEND_FILE}"
    if kind == "finite_number":
        return (
            "must be a finite number: NaN and Infinity are not JSON numbers; send a number or leave it out if optional"
        )
    return msg


MAX_ERRORS = 20  # a body with thousands of bad fields gets the first few and a count, not a huge answer


def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field and rule (the first MAX_ERRORS, then a count); the offending input is
    not echoed (it may be huge or NaN)."""
    content_type = request.headers.get("content-type", "")
    found = exc.errors()
    errors = [
        {"loc": list(e.get("loc", ())), "msg": _explain(e, content_type), "type": e.get("type", "")}
        for e in found[:MAX_ERRORS]
    ]
    if len(found) > MAX_ERRORS:
        errors.append(
            {
                "loc": ["body"],
                "msg": f"and {len(found) - MAX_ERRORS} more errors of the same request; fix these first",
                "type": "too_many_errors",
            }
        )
    return JSONResponse({"detail": errors}, status_code=422)


def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    detail = exc.detail
    if exc.status_code == 400 and detail == "There was an error parsing the body":  # FastAPI's words for non-UTF-8
        detail = f"the body could not be decoded: JSON must be UTF-8 text; {SEND_JSON}"
    if isinstance(detail, str):
        return error_response(request.url.path, exc.status_code, detail, headers=exc.headers)
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


def input_error(request: Request, exc: InputError) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": exc.loc, "msg": str(exc), "type": "value_error"}]}, status_code=422)


def service_error(request: Request, exc: ServiceError) -> JSONResponse:
    """Every ServiceError, by its status: ``{"detail": ...}``, and on the v2 protocol's paths the same text as
    ``"error"`` too (what its clients read), with Retry-After where the error has one."""
    return error_response(request.url.path, exc.status, str(exc), exc.retry_after, exc.headers)


def error_response(
    path: str, status: int, message: str, retry_after: int | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    body = error_body(path, message)
    extra = {**(headers or {}), **({"Retry-After": str(retry_after)} if retry_after else {})}
    return JSONResponse(body, status_code=status, headers=extra or None)


def error_body(path: str, message: str) -> dict[str, str]:
    """An error's body: ``{"detail": ...}``; on the v2 protocol's paths the same text as ``"error"`` too, which
    its clients read. The middleware's own refusals (401, 413, 503) take theirs from here as well."""
    return {"detail": message, "error": message} if path == "/v2" or path.startswith("/v2/") else {"detail": message}


async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A 500 naming the request id (in the body and the X-Request-ID header: Starlette answers it outside the
    middleware that adds the header), with the traceback in the log (passed explicitly: a sync handler would
    run on a thread where the exception is no longer current, and log ``NoneType: None``)."""
    request_id = request.scope.get("state", {}).get("request_id", "?")
    log.error("unhandled error", exc_info=exc, extra={"request_id": request_id, "path": request.url.path})
    return JSONResponse(
        {"detail": f"internal error; quote request id {request_id} when reporting it"},
        status_code=500,
        headers={"X-Request-ID": request_id},
    )


def add_error_handlers(app: FastAPI) -> None:
    # Registered through the decorator: add_exception_handler's annotation takes only handlers of Exception itself.
    app.exception_handler(RequestValidationError)(validation_error)
    app.exception_handler(HTTPException)(http_error)
    app.exception_handler(InputError)(input_error)  # before ServiceError: its 422 names the field
    app.exception_handler(ServiceError)(service_error)
    app.exception_handler(Exception)(unexpected)
