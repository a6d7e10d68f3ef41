"""ASGI middleware at the HTTP boundary: body guard (size, content type, UTF-8) and timing.

Pure ASGI (not BaseHTTPMiddleware) so a body is read once, bounded, and replayed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .errors import error_bytes

Scope = dict[str, Any]
BODY_METHODS = {"POST", "PUT", "PATCH"}


async def send_json(send: Callable, status: int, body: bytes) -> None:
    """A whole JSON response (``body`` already serialised) on the raw ASGI ``send``."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Callable, status: int, type: str, message: str, field: str | None) -> None:
    await send_json(send, status, error_bytes(status, type, message, field))


class BodyGuard:
    """Refuse, before any parsing: bodies over ``max_bytes`` (413), non-JSON content types
    (415) and bodies that are not UTF-8 (400); ``reject(reason)`` counts them."""

    def __init__(self, app: Callable, max_bytes: int, reject: Callable[[str], None]):
        self.app, self.max_bytes, self.reject = app, max_bytes, reject

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        too_big = f"request body exceeds {self.max_bytes} bytes"
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            self.reject("too_large")
            await _send_error(send, 413, "body_too_large", too_big, "body")
            return
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            self.reject("invalid")
            got = f"got {ctype!r}" if ctype else "none given"
            msg = f"content-type must be application/json ({got})"
            await _send_error(send, 415, "unsupported_media_type", msg, "content-type")
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                self.reject("too_large")
                await _send_error(send, 413, "body_too_large", too_big, "body")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as err:
            self.reject("invalid")
            msg = f"body is not valid UTF-8 (byte 0x{body[err.start]:02x} at offset {err.start})"
            await _send_error(send, 400, "invalid_encoding", msg, "body")
            return
        await self.app(scope, replay_body(body, receive), send)


def replay_body(body: bytes, receive: Callable) -> Callable:
    """A ``receive`` that hands over the already-read ``body`` once, then waits on the real one."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class Timing:
    """Observe each request's latency and status in ``observe(path, status, seconds)``."""

    def __init__(self, app: Callable, observe: Callable[[str, int, float], None], paths: set[str]):
        self.app, self.observe, self.paths = app, observe, paths

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"] if scope["path"] in self.paths else "other"
            self.observe(path, status, time.perf_counter() - start)
