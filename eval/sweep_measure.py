"""How every sweep point is measured, whatever the method: accuracy, loss and per-sample FLOPs over
the evaluation batches (:func:`evaluate_runner`), then latency next to dense (:func:`timed`);
:func:`measure_point` does both."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from dynprune.eval.latency import measure
from dynprune.eval.runners import Runner
from dynprune.eval.sweep_context import SweepContext
from dynprune.eval.sweep_stats import encode_correct
from torch import Tensor


def evaluate_runner(ctx: SweepContext, runner: Runner, order: Sequence[int] | None = None) -> dict[str, Any]:
    """Accuracy, loss and per-sample FLOPs ratio over the evaluation batches; ``correct``: per-example
    correctness in the batches' fixed order (for paired comparisons between methods). ``order``: the
    batches are run in this order (a runner that adapts between batches), results kept in the fixed one."""
    correct, loss, n = 0, 0.0, 0
    order = range(len(ctx.eval_batches)) if order is None else order
    if sorted(order) != list(range(len(ctx.eval_batches))):
        raise ValueError("evaluation order must be a permutation of the evaluation batches")
    ratios: list[Tensor] = [torch.empty(0)] * len(ctx.eval_batches)
    hits: list[Tensor] = [torch.empty(0)] * len(ctx.eval_batches)
    with torch.inference_mode():
        for i in order:
            batch = ctx.eval_batches[i]
            logits = runner(batch).float()
            labels = batch["labels"]
            hit = logits.argmax(-1) == labels
            hits[i] = hit.cpu()
            correct += int(hit.sum())
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            n += labels.shape[0]
            dense = ctx.fm.dense(batch["input_ids"].shape[1])
            assert runner.last_flops is not None
            ratios[i] = runner.last_flops / dense
    r = torch.cat(ratios).numpy()
    return {
        "accuracy": correct / n,
        "loss": loss / n,
        "flops_ratio": float(r.mean()),
        "flops_ratio_p5": float(np.percentile(r, 5)),
        "flops_ratio_p50": float(np.percentile(r, 50)),
        "flops_ratio_p95": float(np.percentile(r, 95)),
        "correct": encode_correct(torch.cat(hits).numpy()),
    }


def measure_point(ctx: SweepContext, runner: Runner, order: Sequence[int] | None = None) -> dict[str, Any]:
    """Accuracy and FLOPs (:func:`evaluate_runner`, batches in ``order``), then latency vs dense."""
    row = evaluate_runner(ctx, runner, order)
    runner.end_evaluation()
    lat, attempts = timed(ctx, runner)
    row["timing_attempts"] = attempts
    for key, value in lat.items():
        row[f"latency_ms_{key}"] = value.method_ms
        row[f"speedup_{key}"] = value.speedup
        row[f"ideal_speedup_{key}"] = value.ideal_speedup
        row[f"ratio_to_ideal_{key}"] = value.ratio_to_ideal
    row["params"] = runner.params()
    row["timing"] = {k: v.to_dict() for k, v in lat.items()}
    return row


def timed(ctx: SweepContext, runner: Runner, tries: int = 3) -> tuple[dict[str, Any], int]:
    """Latency vs dense; re-timed (up to ``tries``) when the dense model itself ran more than 1.5x
    off its reference time (the shared machine was busy: both sides of the ratio are suspect)."""
    t = ctx.cfg.timing
    for attempt in range(1, tries + 1):
        lat = measure(ctx.dense_runner, runner, ctx.timing, warmup=t.warmup, repeats=t.repeats)
        ref = ctx.dense_reference_ms
        if not ref:  # the first measurement of the sweep sets the reference
            ctx.dense_reference_ms = {k: v.dense_ms for k, v in lat.items()}
            return lat, attempt
        off = [k for k, v in lat.items() if k in ref and not (ref[k] / 1.5 <= v.dense_ms <= ref[k] * 1.5)]
        if not off or attempt == tries:
            return lat, attempt
        time.sleep(10.0)
    raise AssertionError("unreachable")
