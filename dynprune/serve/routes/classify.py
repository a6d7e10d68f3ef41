"""POST /v1/classify: texts (+ budgets) -> labels, scores and executed FLOPs per text."""

from __future__ import annotations

from fastapi import APIRouter, Request

import dynprune
from dynprune.cost_model import how_to_calibrate

from ..errors import ApiError
from ..runtime import GroupError, GroupJob, Runtime, TextJob
from ..schemas import ClassifyItem, ClassifyRequest, ClassifyResponse, MeanBudget, TimeBudget
from .common import ERROR_RESPONSES, check_budget, refuse_if_draining, refuse_untrained, run_queued, runtime

router = APIRouter()


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_request", message, field=field, reason="invalid")


def check_limits(req: ClassifyRequest, rt: Runtime) -> None:
    cfg = rt.cfg
    if len(req.texts) > cfg.max_texts:
        raise _invalid(
            "texts", f"too many texts: {len(req.texts)} (this server takes at most {cfg.max_texts})"
        )
    for i, text in enumerate(req.texts):
        if len(text) > cfg.max_text_chars:
            raise _invalid(
                f"texts[{i}]",
                f"text is {len(text)} characters; this server takes at most {cfg.max_text_chars}",
            )


def per_text_budgets(req: ClassifyRequest, rt: Runtime) -> list[float]:
    """The request's budget as one number per text, checked against the model's floor."""
    budget = req.budget
    if budget is None:
        budgets = [rt.engine.gated.gate_config.default_budget] * len(req.texts)
    elif isinstance(budget, tuple):
        if len(budget) != len(req.texts):
            raise _invalid(
                "budget",
                f"budget list has {len(budget)} entries for {len(req.texts)} texts; give one per text "
                "or a single number",
            )
        budgets = list(budget)
    else:
        budgets = [float(budget)] * len(req.texts)
    for i, b in enumerate(budgets):
        check_budget(
            rt, b, "budget" if not isinstance(budget, tuple) else f"budget[{i}]", "router and task head"
        )
    return budgets


def text_jobs(rt: Runtime, texts: list[str], budgets: list[float]) -> list[TextJob]:
    """One job per text, tokenized now (while the model runs the previous batch)."""
    prepare = rt.engine.prepare
    return [TextJob(prepare(t), b) for t, b in zip(texts, budgets)]


def group_budget(spec: MeanBudget | TimeBudget, rt: Runtime):
    """The library's budget object for a request-wide ``spec`` (its texts run in a forward of their
    own); a 422 now for what the model cannot do at all (no cost table, an untrained router)."""
    refuse_untrained(rt, "budget", "a budget object")
    if isinstance(spec, MeanBudget):
        mean = dynprune.MeanBudget(spec.mean, cap=spec.cap)
        if not rt.cfg.govern_mean:
            return mean
        if mean.spec not in rt.governed:
            try:
                rt.governed[mean.spec] = dynprune.govern(rt.engine.gated, mean)
            except ValueError as err:  # no calibration (or one without a curve) for this mean
                raise ApiError(
                    422, "unsupported", f"budget: {err}", field="budget", reason="unsupported"
                ) from err
            rt.metrics.watch_governor(mean.spec, rt.governed[mean.spec].governor)
        return rt.governed[mean.spec]
    if rt.engine.gated.cost_table is None:
        raise _invalid(
            "budget", f"budget.ms needs this machine's cost table saved with the gates: {how_to_calibrate()}"
        )
    return dynprune.TimeBudget(spec.ms)


@router.post(
    "/v1/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES, tags=["classification"]
)
async def classify(req: ClassifyRequest, request: Request) -> ClassifyResponse:
    """Classify ``texts``, each at its budget. Concurrent requests are batched into one forward."""
    rt = runtime(request)
    refuse_if_draining(rt)
    if rt.engine.task != "classification":
        raise ApiError(
            501,
            "task_not_served",
            f"/v1/classify needs a sequence-classification model; this server serves "
            f"{rt.engine.model_name} ({rt.engine.task}): use /v1/generate or /v1/completions",
            reason="unsupported",
        )
    check_limits(req, rt)
    if isinstance(req.budget, MeanBudget | TimeBudget):
        job = GroupJob(tuple(req.texts), group_budget(req.budget, rt))
        (results,) = await run_queued(rt, [job])
        if isinstance(results, GroupError):
            raise ApiError(
                422, "unsupported", f"budget: {results.message}", field="budget", reason="unsupported"
            )
        budgets: list[float | None] = [None] * len(req.texts)
    else:
        budgets = list(per_text_budgets(req, rt))
        results = await run_queued(rt, text_jobs(rt, req.texts, budgets))
    return response_of(rt, results, budgets)


def response_of(rt: Runtime, results: list, budgets: list[float | None]) -> ClassifyResponse:
    """The answer to a request whose texts ran (``results``: ClassifyResults in text order);
    each text's executed-FLOPs ratio is observed in /metrics."""
    labels = rt.engine.labels
    items = []
    for r, b in zip(results, budgets):
        rt.metrics.flops_ratio.observe(r.flops_ratio)
        items.append(
            ClassifyItem(
                label=labels[r.label_id],
                label_id=r.label_id,
                scores=list(r.scores),
                budget=b,
                flops_ratio=r.flops_ratio,
                tokens=r.tokens,
                padded_len=r.padded_len,
                truncated=r.truncated,
            )
        )
    return ClassifyResponse(
        model=rt.engine.model_name, items=items, batch_size=max(r.batch_size for r in results)
    )
