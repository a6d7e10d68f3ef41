"""POST /v1/classify answered without FastAPI's per-request machinery, when the request is plain.

On the benchmark machine FastAPI's routing, dependency solving, body and response plumbing and
exception middleware took ~0.24 ms of CPU per classify request, four times uvicorn's own HTTP
handling (~0.06 ms). A loaded server on two cores runs that CPU beside the model's two threads,
and every millisecond taken from one of them stalls the other at the next synchronisation: it
came out of the forward's time at about twice its size.

:class:`FastClassify` sits inside ``BodyGuard`` and ``Timing`` (size, content type, UTF-8 and
latency are handled as before) and answers a classify POST itself when it is plain: a body the
same ``ClassifyRequest`` validates (``json.loads`` then ``model_validate``, as FastAPI does), a
number / list / null budget, the server's limits met, the texts queued. It runs the route's own
functions (``check_limits``, ``per_text_budgets``, ``text_jobs``, ``response_of``), so the answer
is the route's, byte for byte (the same pydantic model serialised). Anything else — an invalid
body, budget objects, a limit exceeded, draining, a full queue (nothing was queued) — goes, body
replayed, to the FastAPI app, whose route and error handlers answer it as they always did. A
timeout after the texts were queued is answered here in the app's error JSON (504, counted); an
error of the forward propagates to the app's outermost handler (500), as it did from the route.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from .batcher import Draining, QueueFull
from .errors import ApiError, error_bytes
from .middleware import replay_body, send_json
from .routes.classify import check_limits, per_text_budgets, response_of, text_jobs
from .routes.common import wait_results
from .runtime import Runtime
from .schemas import ClassifyRequest

PATH = "/v1/classify"


class FastClassify:
    """ASGI layer in front of the FastAPI app (see the module docstring)."""

    def __init__(self, app: Callable, runtime: Runtime):
        self.app, self.rt = app, runtime

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        queued = self._queue(body)
        if queued is None:  # not plain: the FastAPI route answers it
            await self.app(scope, replay_body(body, receive), send)
            return
        futures, budgets = queued
        rt = self.rt
        try:
            results = await wait_results(rt, futures)
        except ApiError as err:  # the timeout: answered here as the app's error handler would
            rt.metrics.reject(err.reason or "timeout")
            await send_json(send, err.status, error_bytes(err.status, err.type, err.message, err.field))
            return
        await send_json(send, 200, response_of(rt, results, budgets).model_dump_json().encode())

    def _queue(self, body: bytes) -> tuple[list[asyncio.Future], list[float | None]] | None:
        """The request's texts queued (their futures, and the budgets to report), or None when the
        request is not plain (nothing was queued)."""
        rt = self.rt
        if rt.draining or rt.batcher.closing or rt.engine.task != "classification":
            return None
        try:
            req = ClassifyRequest.model_validate(json.loads(body))
        except (ValueError, ValidationError, RecursionError):
            return None
        if req.budget is not None and not isinstance(req.budget, float | tuple):
            return None  # a budget object: the route's group path
        try:
            check_limits(req, rt)
            budgets = per_text_budgets(req, rt)
            futures = rt.batcher.enqueue(text_jobs(rt, req.texts, budgets))
        except (ApiError, QueueFull, Draining):
            return None
        return futures, list(budgets)
