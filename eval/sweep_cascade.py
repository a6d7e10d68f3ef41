"""The sweep's ``static_cascade`` points: the static control run at a *mean* budget by a cascade.

The seed's static control (one set of learned static gates per budget, shared weights) runs every
input at a low budget and re-runs the least confident at a higher one; both passes count. Per swept
budget the (low, high, confidence) triple is fitted on the validation split
(:func:`dynprune.calibration_fit.fit_cascade`: the pair with the best validation accuracy at mean
FLOPs <= the budget; the candidate passes are run once per seed and shared by every budget). With
``cascade.governor`` the confidence threshold is corrected online while the evaluation batches run
in a seeded random order (:func:`dynprune.govern`), as early exit's threshold is.

No fine-tuning: its training is the static control's alone, so it has fewer steps than
``static_gates_ft`` and ``static_early_exit`` (the row says how many) and the same as ``static_gates``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from dynprune.eval.runners import GatedRunner
from dynprune.eval.sparse_io import weights_bytes
from dynprune.eval.sweep_context import SweepContext, _batches
from dynprune.eval.sweep_measure import measure_point
from dynprune.eval.timing import materialize
from torch import Tensor

import dynprune
from dynprune.calibration import GovernedMean
from dynprune.calibration_fit import fit


class CascadeRunner(GatedRunner):
    """A GatedRunner at a (possibly governed) mean budget that records, during the accuracy pass,
    which inputs the cascade re-ran (``rerun``: one bool tensor per call, in call order)."""

    def __init__(self, gated: dynprune.GatedModel, budget: Any) -> None:
        super().__init__(gated, budget, name="static_cascade")
        self.rerun: list[Tensor] = []
        self.evaluating = True

    def __call__(self, batch: dict[str, Tensor]) -> Tensor:
        logits = super().__call__(batch)
        info = self.model.last
        if self.evaluating and info is not None and info.passes is not None:
            self.rerun.append(info.passes.cpu() > 1)
        return logits

    def end_evaluation(self) -> None:
        super().end_evaluation()
        self.evaluating = False


def _static_model(ctx: SweepContext, seed: int) -> tuple[dynprune.GatedModel, dict[float, Any], list[Any]]:
    """The seed's static control, its cache of validation passes and the validation batches (once per seed)."""
    key = ("static_cascade", seed)
    if key not in ctx.cache:
        gated, _ = dynprune.load_gated_model(ctx.run_for(seed).static_dir)
        materialize(gated.eval())
        n = ctx.cfg.cascade.calibration_examples
        examples = ctx.examples["validation"][:n] if n else ctx.examples["validation"]
        batches = _batches(examples, ctx.collate, ctx.cfg.evaluation.batch_size)
        ctx.cache[key] = (gated, {}, batches)
    return ctx.cache[key]


def point_static_cascade(ctx: SweepContext, budget: float, seed: int) -> dict[str, Any]:
    run = ctx.run_for(seed)
    gated, passes, val = _static_model(ctx, seed)
    mean = dynprune.MeanBudget(budget)
    entry = fit(gated, val, mean, policy="cascade", trained=run.budget_range(), passes=passes)
    gated.calibration.add(entry)  # in memory: the training run is never written
    policy = entry.policy
    arg: Any = mean
    order = None
    if ctx.cfg.cascade.governor:
        arg = dynprune.govern(gated, mean)
        order = np.random.default_rng(seed).permutation(len(ctx.eval_batches)).tolist()
    runner = CascadeRunner(gated, arg)
    row = measure_point(ctx, runner, order)
    rerun = float(torch.cat(runner.rerun).double().mean()) if runner.rerun else 0.0
    fitted = entry.fitted
    notes = (
        f"static control run at {policy.low:g}, the least confident re-run at {policy.high:g} "
        f"(confidence < {policy.confidence:.4f}; fitted on {fitted['n']} validation examples: accuracy "
        f"{fitted['accuracy']:.4f}, mean FLOPs {fitted['flops_ratio_mean']:.3f}, {fitted['rerun_fraction']:.1%} re-run)"
    )
    if isinstance(arg, GovernedMean):
        gov = arg.governor
        notes += (
            f", governed while evaluating (batches in random order): final confidence {gov.knob:.4f}; the "
            f"evaluation inputs spent {gov.bias:+.3f} of dense FLOPs per input against the fit's prediction"
        )
        row.update(confidence_final=gov.knob, governor_bias=gov.bias)
    steps = run.stage_steps("static") or 0
    row.update(
        disk_bytes=weights_bytes(run.static_dir),
        finetune_steps=0,
        static_control_steps=steps,
        training_run=str(run.root),
        cascade={"low": policy.low, "high": policy.high, "confidence": policy.confidence},
        calibration_flops_ratio=fitted["flops_ratio_mean"],
        calibration_examples=int(fitted["n"]),
        rerun_share=rerun,
        notes=notes
        + f"; {rerun:.1%} of evaluation inputs re-run; no fine-tuning (static control: {steps} steps)",
    )
    return row
