"""Helpers every task endpoint uses: the runtime, draining, queueing with timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from fastapi import Request

from ..batcher import Draining, QueueFull
from ..errors import ApiError
from ..runtime import Runtime

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": None, "description": desc}
    for code, desc in {
        413: "body too large",
        415: "content type is not application/json",
        422: "invalid request (the error names the field)",
        429: "queue full; see Retry-After",
        501: "this model does not serve this task",
        503: "shutting down",
        504: "not answered within the server's timeout (the work was dropped)",
    }.items()
}


def refuse_untrained(rt: Runtime, where: str, what: str) -> None:
    """422 for any budget below dense on a plain model's untrained router (``--model``), unless the
    server runs with --untrained-budgets."""
    if not rt.engine.trained_router and not rt.cfg.untrained_budgets:
        raise ApiError(
            422,
            "invalid_request",
            f"{what}: this server runs a plain model (--model) whose router is untrained, so only "
            "budget 1.0 (the original model) gives meaningful output; serve gates trained with "
            "`dynprune train` via --checkpoint (or start with --untrained-budgets for smoke tests)",
            field=where,
            reason="invalid",
        )


def check_budget(rt: Runtime, value: float, where: str, always_run: str) -> None:
    """422 naming ``where`` for a budget this server cannot honour meaningfully: below the model's
    floor (``always_run``: what every forward runs), or below 1.0 on an untrained router (``--model``)."""
    engine = rt.engine
    if value < 1.0:
        refuse_untrained(rt, where, f"{where} = {value}")
    if value < engine.min_budget:
        raise ApiError(
            422,
            "invalid_request",
            f"{where} = {value} is below this model's smallest budget {engine.min_budget} ({always_run} always run)",
            field=where,
            reason="invalid",
        )


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def refuse_if_draining(rt: Runtime) -> None:
    if rt.draining or rt.batcher.closing:
        raise ApiError(
            503, "shutting_down", "server is shutting down; retry on another replica", reason="draining"
        )


def enqueue(rt: Runtime, jobs: Sequence[Any]) -> list[asyncio.Future]:
    """Queue ``jobs`` now; overload -> 429 with Retry-After, shutdown -> 503."""
    try:
        return rt.batcher.enqueue(jobs)
    except QueueFull as err:
        raise ApiError(
            429,
            "queue_full",
            f"server is at capacity ({err.depth} texts queued, limit {rt.cfg.max_queue}); retry after {err.retry_after_s} s",
            headers={"Retry-After": str(err.retry_after_s)},
            reason="queue_full",
        ) from None
    except Draining:
        refuse_if_draining(rt)
        raise


def timeout_error(rt: Runtime) -> ApiError:
    return ApiError(
        504,
        "timeout",
        f"not answered within {rt.cfg.timeout_s} s; the queued work was dropped",
        reason="timeout",
    )


async def run_queued(rt: Runtime, jobs: Sequence[Any]) -> list[Any]:
    """Queue ``jobs`` with the batcher and wait for their results; map overload, drain and
    timeout to HTTP errors (a timed-out request's queued jobs are dropped)."""
    return await wait_results(rt, enqueue(rt, jobs))


async def wait_results(rt: Runtime, futures: list[asyncio.Future]) -> list[Any]:
    """The results of queued jobs, in order; 504 after the server's timeout, and whatever has not
    run when the wait ends (timeout, disconnect) is dropped."""
    try:
        return list(await asyncio.wait_for(asyncio.gather(*futures), timeout=rt.cfg.timeout_s))
    except asyncio.TimeoutError:
        raise timeout_error(rt) from None
    finally:
        for future in futures:  # timeout / disconnect: drop what has not run
            future.cancel()
