"""Every error leaves the server as JSON: {"error": {"type", "field", "message", "details"}}."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """An error with its HTTP status, a machine-readable type and the request field at fault."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ):
        super().__init__(message)
        self.status, self.type, self.message, self.field = status, type, message, field
        self.headers = headers or {}
        self.reason = reason  # rejection reason for /metrics (None: not counted)


def error_body(type: str, message: str, field: str | None, details: list[dict[str, Any]] | None = None):
    return {"error": {"type": type, "field": field, "message": message, "details": details or []}}


def error_bytes(status: int, type: str, message: str, field: str | None) -> bytes:
    return json.dumps(error_body(type, message, field)).encode()


def _field(loc: tuple[Any, ...]) -> str:
    """('body', 'texts', 3) -> 'texts[3]'; ('body',) -> 'body'."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _message(err: dict[str, Any], field: str) -> str:
    kind, msg = err.get("type", ""), str(err.get("msg", ""))
    if kind == "json_invalid":
        pos = err["loc"][1] if len(err.get("loc", ())) > 1 else "?"
        return f"body is not valid JSON (error at character {pos}: {err.get('ctx', {}).get('error', msg)})"
    if kind == "missing":
        if field == "body":
            return "request body is missing: send a JSON object"
        return f"{field} is required"
    if kind == "model_attributes_type" and field == "body":
        return f"body must be a JSON object, got {type(err.get('input')).__name__}"
    if kind == "extra_forbidden":
        return f"unknown field {field!r} (this endpoint does not accept it)"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        return msg if msg.startswith(field.split("[")[0].split(".")[0]) else f"{field}: {msg}"
    return f"{field}: {msg}"


def install_error_handlers(app: FastAPI, reject: Any) -> None:
    """``reject(reason)`` counts a rejection in /metrics."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.reason:
            reject(exc.reason)
        return JSONResponse(
            error_body(exc.type, exc.message, exc.field), status_code=exc.status, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        reject("invalid")
        details = []
        for err in exc.errors():
            loc = tuple(err.get("loc", ()))
            field = "body" if err.get("type") == "json_invalid" else _field(loc)
            details.append({"field": field, "message": _message(err, field), "type": err.get("type")})
        first = details[0] if details else {"field": "body", "message": "invalid request"}
        return JSONResponse(
            error_body("invalid_request", first["message"], first["field"], details), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no endpoint {request.url.path}; see /docs"
        elif exc.status_code == 400 and message == "There was an error parsing the body":
            kind, message = "invalid_json", "body could not be parsed as JSON (is it nested too deeply?)"
            return JSONResponse(error_body(kind, message, "body"), status_code=400)
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see /docs"
        return JSONResponse(
            error_body(kind, message, None),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        reject("error")
        return JSONResponse(
            error_body("internal_error", f"{type(exc).__name__}: {exc}", None), status_code=500
        )
