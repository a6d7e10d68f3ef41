"""The sweep's ``static_cascade`` and ``static_cascade_ft`` points: the static control run at a
*mean* budget by a cascade.

The seed's static control (one set of learned static gates per budget, shared weights) runs every
input at a low budget and re-runs the least confident at a higher one; both passes count. Per swept
budget the (low, high, confidence) triple is fitted on the validation split
(:func:`dynprune.calibration_fit.fit_cascade`: the pair with the best validation accuracy at mean
FLOPs <= the budget; the candidate passes are run once per seed and shared by every budget). With
``cascade.governor`` the confidence threshold is corrected online while the evaluation batches run
in a seeded random order (:func:`dynprune.govern`), as early exit's threshold is.

No fine-tuning: its training is the static control's alone, so it has fewer steps than
``static_gates_ft`` and ``static_early_exit`` (the row says how many) and the same as ``static_gates``.
``static_cascade_ft`` is the same cascade at equal steps (:func:`point_static_cascade_ft`): the
fitted pair's two static_gates exports, each fine-tuned half of ``static_gates_ft``'s steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from dynprune.eval.runners import GatedRunner, Runner, StructureRunner
from dynprune.eval.sparse_io import weights_bytes
from dynprune.eval.sweep_context import SweepContext, _batches, finetune
from dynprune.eval.sweep_measure import measure_point
from dynprune.eval.sweep_methods import load_static_export, static_export
from dynprune.eval.timing import materialize
from torch import Tensor

import dynprune
from dynprune.calibration import GovernedMean
from dynprune.calibration_fit import Pass, best_cascade, cascade_curve, fit
from dynprune.governor import MeanGovernor, curve_solver


class CascadeRunner(GatedRunner):
    """A GatedRunner at a (possibly governed) mean budget that records, during the accuracy pass,
    which inputs the cascade re-ran (``rerun``: one bool tensor per call, in call order)."""

    def __init__(self, gated: dynprune.GatedModel, budget: Any) -> None:
        super().__init__(gated, budget, name="static_cascade")
        self.rerun: list[Tensor] = []

    def __call__(self, batch: dict[str, Tensor]) -> Tensor:
        logits = super().__call__(batch)
        info = self.model.last
        if self.evaluating and info is not None and info.passes is not None:
            self.rerun.append(info.passes.cpu() > 1)
        return logits


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


def _fit(ctx: SweepContext, budget: float, seed: int) -> Any:
    """The cascade entry for ``budget`` fitted on the unfine-tuned static control (validation split)."""
    gated, passes, val = _static_model(ctx, seed)
    mean = dynprune.MeanBudget(budget)
    entry = fit(gated, val, mean, policy="cascade", trained=ctx.run_for(seed).budget_range(), passes=passes)
    gated.calibration.add(entry)  # in memory: the training run is never written
    return entry


def _governed_order(ctx: SweepContext, seed: int) -> list[int] | None:
    """Governed: the evaluation batches in a random order seeded by ``seed`` (else the fixed order)."""
    if not ctx.cfg.cascade.governor:
        return None
    return np.random.default_rng(seed).permutation(len(ctx.eval_batches)).tolist()


def point_static_cascade(ctx: SweepContext, budget: float, seed: int) -> dict[str, Any]:
    run = ctx.run_for(seed)
    gated, _, _ = _static_model(ctx, seed)
    entry = _fit(ctx, budget, seed)
    mean = entry.budget
    policy = entry.policy
    order = _governed_order(ctx, seed)
    arg: Any = mean if order is None else dynprune.govern(gated, mean)
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


# -- static_cascade_ft: the same cascade between two fine-tuned exports, at equal steps -----------
class ExportCascadeRunner(Runner):
    """Two physically pruned models as a cascade: ``low`` for every input, ``high`` for those whose
    max softmax probability is below the confidence (the governor's knob when governed); FLOPs of
    both passes count. ``rerun`` logs which inputs were re-run during the accuracy pass."""

    name = "static_cascade_ft"

    def __init__(
        self, low: StructureRunner, high: StructureRunner, confidence: float, governor: MeanGovernor | None
    ) -> None:
        super().__init__()
        self.low, self.high, self.confidence, self.governor = low, high, confidence, governor
        self.model = low.model  # params() counts both below
        self.rerun: list[Tensor] = []

    def params(self) -> int:
        return self.low.params() + self.high.params()

    def __call__(self, batch: dict[str, Tensor]) -> Tensor:
        logits = self.low(batch)
        assert self.low.last_flops is not None
        flops = self.low.last_flops.clone()  # (B,)
        c = self.confidence if self.governor is None else self.governor.knob
        rows = (logits.float().softmax(-1).amax(-1) < c).nonzero().squeeze(1)  # (R,)
        if rows.numel():
            n = logits.shape[0]
            sub = {
                k: v.index_select(0, rows) if v.dim() > 0 and v.shape[0] == n else v for k, v in batch.items()
            }
            logits = logits.index_copy(0, rows, self.high(sub).to(logits.dtype))
            assert self.high.last_flops is not None
            flops = flops.index_add(0, rows, self.high.last_flops)
        self.last_flops = flops
        if self.governor is not None:
            self.governor.observe((flops / self.low.fm.dense(batch["input_ids"].shape[1])).numpy())
        if self.evaluating:
            self.rerun.append(torch.zeros(logits.shape[0], dtype=torch.bool).index_fill(0, rows, True))
        return logits


def _passes(ctx: SweepContext, runner: StructureRunner, batches: list[Any]) -> Pass:
    """One model over the validation batches: per-example FLOPs ratio, correctness, confidence."""
    ratio, correct, conf = [], [], []
    with torch.inference_mode():
        for batch in batches:
            logits = runner(batch).float()
            assert runner.last_flops is not None
            ratio.append(runner.last_flops / ctx.fm.dense(batch["input_ids"].shape[1]))
            correct.append(logits.argmax(-1) == batch["labels"])
            conf.append(logits.softmax(-1).amax(-1))
    return Pass(*(torch.cat(t).numpy() for t in (ratio, correct, conf)))


def _finetuned_export(
    ctx: SweepContext, budget: float, seed: int, steps: int
) -> tuple[StructureRunner, Path]:
    """The static_gates export at ``budget`` fine-tuned ``steps`` steps (built and cached once)."""
    from dynprune.eval.sweep_static_gates import static_gates_export

    base = static_gates_export(ctx, budget, seed)

    def build():
        model, structure = load_static_export(base)
        info = finetune(ctx, model, steps, f"static_cascade_ft@{budget:g} s{seed}", seed=seed)
        info["notes"] = f"static_gates export {base} fine-tuned {int(info.get('steps', 0))} steps"
        return model, structure, info

    path, _ = static_export(ctx, "static_cascade_ft", budget, build, seed)
    model, structure = load_static_export(path)
    return StructureRunner(materialize(model), structure, ctx.fm, f"static_cascade_ft@{budget:g}"), path


def point_static_cascade_ft(ctx: SweepContext, budget: float, seed: int) -> dict[str, Any]:
    """static_cascade's (low, high) pair (fitted on the unfine-tuned static control), each budget's
    static_gates export fine-tuned half the grid's steps — together what ``static_gates_ft`` gets — and
    the confidence re-fitted on validation for the fine-tuned pair (then governed like static_cascade)."""
    run = ctx.run_for(seed)
    pair = _fit(ctx, budget, seed).policy
    half = max(1, ctx.grid_steps // 2)
    (low, low_dir), (high, high_dir) = (_finetuned_export(ctx, b, seed, half) for b in (pair.low, pair.high))
    _, _, val = _static_model(ctx, seed)
    lo_pass, hi_pass = _passes(ctx, low, val), _passes(ctx, high, val)
    val_acc, val_mean, confidence, k = best_cascade(lo_pass, hi_pass, budget)
    if val_acc < 0:
        raise ValueError(
            f"static_cascade_ft: the fine-tuned pair cannot reach a mean of {budget:g} on validation"
        )
    order = _governed_order(ctx, seed)
    governor = None
    if order is not None:
        solve, bounds = curve_solver(cascade_curve(lo_pass, hi_pass, confidence))
        governor = MeanGovernor(budget, solve, bounds)
    runner = ExportCascadeRunner(low, high, confidence, governor)
    row = measure_point(ctx, runner, order)
    rerun = float(torch.cat(runner.rerun).double().mean()) if runner.rerun else 0.0
    notes = (
        f"static_gates exports at {pair.low:g} and {pair.high:g} (static_cascade's pair), each fine-tuned {half} "
        f"steps; the least confident re-run at {pair.high:g} (confidence < {confidence:.4f}, re-fitted on "
        f"{len(lo_pass.ratio)} validation examples: accuracy {val_acc:.4f}, mean FLOPs {val_mean:.3f}, "
        f"{k / len(lo_pass.ratio):.1%} re-run)"
    )
    if governor is not None:
        notes += (
            f", governed while evaluating: final confidence {governor.knob:.4f} (bias {governor.bias:+.3f})"
        )
        row.update(confidence_final=governor.knob, governor_bias=governor.bias)
    row.update(
        disk_bytes=weights_bytes(low_dir) + weights_bytes(high_dir),
        finetune_steps=2 * half,
        static_control_steps=run.stage_steps("static") or 0,
        training_run=str(run.root),
        structure=f"low {low.structure.summary()} | high {high.structure.summary()}",
        cascade={"low": pair.low, "high": pair.high, "confidence": confidence},
        calibration_flops_ratio=val_mean,
        calibration_examples=len(lo_pass.ratio),
        rerun_share=rerun,
        notes=notes + f"; {rerun:.1%} of evaluation inputs re-run",
    )
    return row
