"""GET /health (readiness) and GET /metrics (Prometheus)."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .common import runtime

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 ``ready`` once the model is loaded and warmed; 503 ``draining`` during shutdown."""
    rt = runtime(request)
    draining = rt.draining or rt.batcher.closing
    body = {
        "status": "draining" if draining else "ready",
        "pid": os.getpid(),  # which replica answered (under Ray Serve)
        "model": rt.engine.model_name,
        "source": rt.engine.source,
        "task": rt.engine.task,
        "labels": rt.engine.labels,
        "context": getattr(rt.engine, "context", None),  # causal LMs: prompt + new tokens
        "min_budget": rt.engine.min_budget,
        # False (--model): budgets below 1.0 are refused unless the server runs with --untrained-budgets
        "trained_router": rt.engine.trained_router,
        "default_budget": rt.engine.gated.gate_config.default_budget,
        "max_batch": rt.cfg.max_batch,
        "max_texts": rt.cfg.max_texts,
        "max_queue": rt.cfg.max_queue,
        "queue_depth": rt.batcher.depth(),
    }
    return JSONResponse(body, status_code=503 if draining else 200)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    rt = runtime(request)
    return Response(rt.metrics.render(), media_type=rt.metrics.content_type)
