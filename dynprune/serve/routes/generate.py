"""POST /v1/generate and OpenAI-style POST /v1/completions (causal LMs), JSON or SSE.

A request becomes one :class:`~dynprune.serve.generator.GenJob` (a prompt at a budget);
the batcher runs compatible jobs of concurrent requests in one ``generate`` call
(``generator.py``). Everything that can be checked before generating is (prompt length
against the context, ``max_new_tokens``, the budget's floor): 4xx naming the field.

``stream: true`` answers ``text/event-stream``. /v1/generate sends ``token`` events, then
one ``done`` event with the whole answer; /v1/completions sends OpenAI chunks, then
``data: [DONE]``. A stream that cannot finish (timeout, a failed generate, shutdown)
ends with an ``error`` event and no ``done`` / ``[DONE]``: never a silent truncation.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..errors import ApiError, error_body
from ..generator import GeneratorEngine, GenError, GenJob, GenResult, Sampling
from ..runtime import Runtime
from ..schemas import CompletionRequest, GenerateRequest, GenerateResponse, MeanBudget, TimeBudget
from .common import (
    ERROR_RESPONSES,
    check_budget,
    enqueue,
    refuse_if_draining,
    run_queued,
    runtime,
    timeout_error,
)

router = APIRouter()
_END = object()  # the job's future is done: no more token events


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_request", message, field=field, reason="invalid")


def _engine(request: Request, endpoint: str) -> tuple[Runtime, GeneratorEngine]:
    rt = runtime(request)
    refuse_if_draining(rt)
    if not isinstance(rt.engine, GeneratorEngine):
        raise ApiError(
            501,
            "task_not_served",
            f"{endpoint} needs a causal language model; this server serves {rt.engine.model_name} "
            f"({rt.engine.task}). Start `dynprune serve` with a causal-LM checkpoint or --model.",
            reason="unsupported",
        )
    return rt, rt.engine


def make_job(
    rt: Runtime,
    engine: GeneratorEngine,
    prompt: str,
    new_tokens: tuple[str, int],
    budget: Any,
    sampling: dict,
) -> GenJob:
    """Check the request against this server and model; the job to queue."""
    new_field, max_new = new_tokens
    if len(prompt) > rt.cfg.max_text_chars:
        raise _invalid(
            "prompt", f"prompt is {len(prompt)} characters; this server takes at most {rt.cfg.max_text_chars}"
        )
    if isinstance(budget, (MeanBudget, TimeBudget, tuple)):
        raise _invalid(
            "budget",
            "budget for generation is one number in (0, 1] (a list, {mean} or {ms} is for /v1/classify)",
        )
    value = engine.gated.gate_config.default_budget if budget is None else float(budget)
    check_budget(rt, value, "budget", "embeddings, router and LM head")
    ids = engine.encode(prompt)
    if not ids:
        raise _invalid("prompt", "prompt has no tokens after tokenization")
    context = engine.context
    if context is not None:
        if len(ids) >= context:
            raise _invalid(
                "prompt",
                f"prompt is {len(ids)} tokens; this model's context is {context} tokens (prompts are never truncated)",
            )
        if len(ids) + max_new > context:
            raise _invalid(
                new_field,
                f"{new_field} = {max_new}: prompt ({len(ids)} tokens) + {new_field} exceeds this model's "
                f"context of {context} tokens; at most {context - len(ids)}",
            )
    return GenJob(tuple(ids), value, Sampling(max_new_tokens=max_new, **sampling))


def _sampling(temperature: float, top_p: float, top_k: int, seed: int | None) -> dict:
    return {"temperature": float(temperature), "top_p": float(top_p), "top_k": top_k, "seed": seed}


def _check(rt: Runtime, result: GenResult | GenError) -> GenResult:
    if isinstance(result, GenError):
        raise ApiError(500, "generation_failed", f"generation failed: {result.message}", reason="error")
    rt.metrics.flops_ratio.observe(result.flops_ratio)
    rt.metrics.generated_tokens.inc(len(result.token_ids))
    return result


async def _answer(rt: Runtime, job: GenJob) -> GenResult:
    try:
        (result,) = await run_queued(rt, [job])
    finally:
        job.cancel.set()  # no-op once answered; a timed-out / disconnected request stops its row
    return _check(rt, result)


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"{head}data: {body}\n\n".encode()


def _stream(
    rt: Runtime,
    job: GenJob,
    token_event: Callable[[int, str], bytes],
    done_events: Callable[[GenResult, str], list[bytes]],
) -> StreamingResponse:
    """Queue ``job`` now (429 / 503 as JSON before any byte is streamed) and stream its tokens."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job.on_token = lambda token, delta: loop.call_soon_threadsafe(events.put_nowait, (token, delta))
    (future,) = enqueue(rt, [job])
    future.add_done_callback(lambda _: events.put_nowait(_END))  # after every token event
    deadline = time.monotonic() + rt.cfg.timeout_s

    async def body() -> AsyncIterator[bytes]:
        sent = ""
        try:
            while True:
                item = await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
                if item is _END:
                    break
                token, delta = item
                sent += delta
                yield token_event(token, delta)
            result = _check(rt, future.result())
            rest = result.text[len(sent) :] if result.text.startswith(sent) else ""
            for event in done_events(result, rest):
                yield event
        except asyncio.TimeoutError:
            err = timeout_error(rt)
            rt.metrics.reject("timeout")
            yield _sse(
                error_body(err.type, f"{err.message} (the stream ends here, incomplete)", None), "error"
            )
        except ApiError as err:
            if err.reason:
                rt.metrics.reject(err.reason)
            yield _sse(error_body(err.type, err.message, err.field), "error")
        except Exception as err:
            rt.metrics.reject("error")
            yield _sse(error_body("internal_error", f"{type(err).__name__}: {err}", None), "error")
        finally:  # also on client disconnect (the task is cancelled): stop this row, drop it if queued
            job.cancel.set()
            future.cancel()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# -- /v1/generate ------------------------------------------------------------------------
def _generate_response(engine: GeneratorEngine, job: GenJob, r: GenResult) -> GenerateResponse:
    return GenerateResponse(
        model=engine.model_name,
        text=r.text,
        token_ids=list(r.token_ids),
        finish_reason=r.finish_reason,
        prompt_tokens=r.prompt_tokens,
        completion_tokens=len(r.token_ids),
        budget=job.budget,
        flops_ratio=r.flops_ratio,
        padded_len=r.padded_len,
        batch_size=r.batch_size,
    )


@router.post("/v1/generate", response_model=GenerateResponse, responses=ERROR_RESPONSES, tags=["generation"])
async def generate(req: GenerateRequest, request: Request) -> Any:
    """Generate up to ``max_new_tokens`` after ``prompt`` at ``budget``. ``stream``: SSE ``token``
    events, then ``done`` (the whole answer) or ``error``. Concurrent compatible requests are batched."""
    rt, engine = _engine(request, "/v1/generate")
    sampling = _sampling(req.temperature, req.top_p, req.top_k, req.seed)
    job = make_job(rt, engine, req.prompt, ("max_new_tokens", req.max_new_tokens), req.budget, sampling)
    if not req.stream:
        return _generate_response(engine, job, await _answer(rt, job))

    def done(r: GenResult, rest: str) -> list[bytes]:
        events = [_sse({"token_id": None, "text": rest}, "token")] if rest else []
        return [*events, _sse(_generate_response(engine, job, r).model_dump(), "done")]

    return _stream(rt, job, lambda token, delta: _sse({"token_id": token, "text": delta}, "token"), done)


# -- /v1/completions (OpenAI) ------------------------------------------------------------
def _completion(engine: GeneratorEngine, job: GenJob, cid: str, created: int, text: str, r: GenResult | None):
    body: dict[str, Any] = {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": engine.model_name,
        "choices": [
            {
                "text": text,
                "index": 0,
                "logprobs": None,
                "finish_reason": None if r is None else r.finish_reason,
            }
        ],
    }
    if r is not None:
        n = len(r.token_ids)
        body["usage"] = {
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": r.prompt_tokens + n,
        }
        body["dynprune"] = {
            "budget": job.budget,
            "flops_ratio": r.flops_ratio,
            "padded_len": r.padded_len,
            "batch_size": r.batch_size,
        }
    return body


@router.post("/v1/completions", responses=ERROR_RESPONSES, tags=["generation"])
async def completions(req: CompletionRequest, request: Request) -> Any:
    """OpenAI-compatible completions (``n`` = 1); ``budget`` (dynprune's extension) selects the
    compute. ``stream``: OpenAI chunks, then ``data: [DONE]`` (or an ``error`` event)."""
    rt, engine = _engine(request, "/v1/completions")
    sampling = _sampling(req.temperature, req.top_p, 0, req.seed)
    job = make_job(rt, engine, req.prompt, ("max_tokens", req.max_tokens), req.budget, sampling)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if not req.stream:
        r = await _answer(rt, job)
        return _completion(engine, job, cid, created, r.text, r)

    def done(r: GenResult, rest: str) -> list[bytes]:
        return [_sse(_completion(engine, job, cid, created, rest, r)), _sse("[DONE]")]

    def chunk(token: int, delta: str) -> bytes:
        return _sse(_completion(engine, job, cid, created, delta, None))

    return _stream(rt, job, chunk, done)
