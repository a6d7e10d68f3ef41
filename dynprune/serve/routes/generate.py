"""POST /v1/generate and OpenAI-style POST /v1/completions (causal LMs).

Requests are validated now; they are answered once the server's engine is a
generation engine (dynprune decoder support, issue 13). Until then, and whenever
the loaded model is not a causal LM, they get 501 naming what is needed.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..errors import ApiError
from ..schemas import CompletionRequest, GenerateRequest
from .common import ERROR_RESPONSES, refuse_if_draining, runtime

router = APIRouter()


def _not_served(request: Request, endpoint: str) -> ApiError:
    engine = runtime(request).engine
    return ApiError(
        501,
        "task_not_served",
        f"{endpoint} needs a causal language model; this server serves {engine.model_name} "
        f"({engine.task}). Start `dynprune serve` with a gated causal-LM checkpoint "
        "(needs dynprune's decoder support, issue 13).",
        field=None,
        reason="unsupported",
    )


@router.post("/v1/generate", responses=ERROR_RESPONSES, tags=["generation"])
async def generate(req: GenerateRequest, request: Request) -> None:
    """Generate up to ``max_new_tokens`` after ``prompt`` at ``budget`` (``stream``: SSE)."""
    refuse_if_draining(runtime(request))
    raise _not_served(request, "/v1/generate")


@router.post("/v1/completions", responses=ERROR_RESPONSES, tags=["generation"])
async def completions(req: CompletionRequest, request: Request) -> None:
    """OpenAI-compatible completions; ``budget`` selects the compute per request."""
    refuse_if_draining(runtime(request))
    raise _not_served(request, "/v1/completions")
