"""The sweep's ``early_exit`` and ``static_early_exit`` points: train the multi-exit model once per
seed (and static width), calibrate, measure.

One early-exit model serves every budget (like the dynamic checkpoint): it is
fine-tuned once per seed for :attr:`SweepContext.grid_steps` steps — what one
method spends over the grid — with the sweep's fine-tuning settings and the
shared teacher, and cached in ``work_dir/models/early_exit_s{seed}``. Per
budget, the exit threshold is calibrated on the validation split's inputs (the first
``early_exit.calibration_examples`` of it, batched and padded like the
evaluation batches; ``early_exit.calibration_split: evaluation`` uses the evaluation inputs) to the
largest mean FLOPs ratio not above the budget, then the model is measured by the same code as every
other method. ``static_early_exit`` does the same on a static_gates model at a wider budget
(:func:`point_static_early_exit`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from dynprune.eval.baselines.early_exit import (
    EarlyExitModel,
    EarlyExitObjective,
    EarlyExitRunner,
    calibrate_threshold,
    exit_costs,
    load_early_exit,
    save_early_exit,
    threshold_governor,
)
from dynprune.eval.sweep_context import SweepContext, _batches, finetune
from dynprune.eval.timing import materialize

WEIGHTS = "early_exit.safetensors"


def cheapest_ratio(dense_dir: Any, max_length: int) -> float:
    """The lowest mean FLOPs ratio early exit can reach: every input leaving at the first exit
    (the worst case over padded lengths 1..max_length). Built on the meta device: no weights read."""
    import torch
    from dynprune.eval.structure import static_flops_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(dense_dir))
    fm = static_flops_model(model)
    return max(exit_costs(fm, t, fm.n_layers)[0] / fm.dense(t) for t in range(1, max_length + 1))


def trained_early_exit(
    ctx: SweepContext, seed: int, name: str | None = None, base: Any = None
) -> tuple[EarlyExitModel, dict[str, Any]]:
    """The multi-exit model of ``seed``, fine-tuned once and cached as ``work/models/<name>``.

    ``base() -> (model, structure)``: what the exits are put on (default: a fresh dense copy, no
    structure; ``static_early_exit``: a static_gates export and its structure)."""
    name = name or f"early_exit_s{seed}"
    path = ctx.work / "models" / name
    model, structure = base() if base is not None else (ctx.fresh_dense(), None)
    if (path / "early_exit.json").is_file():
        model, info = load_early_exit(model, path, structure)
    else:
        model = EarlyExitModel(model, structure)
        info = finetune(ctx, model, ctx.grid_steps, name, seed=seed, objective=EarlyExitObjective)
        save_early_exit(model, path, info)  # a crash after this point never repeats the fine-tune
    for p in model.parameters():
        p.requires_grad_(False)
    return materialize(model.eval()), {**info, "path": str(path)}


def calibration_profile(ctx: SweepContext, model: EarlyExitModel, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, FLOPs ratio) of every exit on the calibration examples: (L, N) each (the first
    ``early_exit.calibration_examples`` inputs of ``early_exit.calibration_split``; labels unused)."""
    ee = ctx.cfg.early_exit
    split = ctx.cfg.evaluation.split if ee.calibration_split == "evaluation" else "validation"
    key = ("early_exit_profile", key, split)
    if key not in ctx.cache:
        n = ee.calibration_examples
        examples = ctx.examples[split][:n] if n else ctx.examples[split]
        conf, ratios = [], []
        for batch in _batches(examples, ctx.collate, ctx.cfg.evaluation.batch_size):
            c = model.exit_profile(batch).numpy()  # (L, B)
            seq = batch["input_ids"].shape[1]
            cost = model.exit_costs(ctx.fm, seq) / ctx.fm.dense(seq)  # (L,)
            conf.append(c)
            ratios.append(np.repeat(cost[:, None], c.shape[1], axis=1))
        ctx.cache[key] = (np.concatenate(conf, axis=1), np.concatenate(ratios, axis=1))
    return ctx.cache[key]


def point_early_exit(ctx: SweepContext, budget: float, seed: int) -> dict[str, Any]:
    model, info = trained_early_exit(ctx, seed)
    return _measure(ctx, model, info, budget, "early_exit", seed)


def static_width(ctx: SweepContext, budget: float) -> float:
    """The static width under ``static_early_exit`` at ``budget``: ``early_exit.width_factor`` x the
    budget, at most the top of the static control's trained budget range."""
    return round(min(ctx.run.budget_range()[1], ctx.cfg.early_exit.width_factor * budget), 4)


def point_static_early_exit(ctx: SweepContext, budget: float, seed: int) -> dict[str, Any]:
    """Width from the static control, depth from exits: the static_gates model at
    :func:`static_width` (the same export the static_gates point would build) gets an exit after
    each kept layer, is fine-tuned like ``early_exit`` (its own steps, on top of the static
    control's training) and is calibrated down to ``budget`` mean FLOPs."""
    from dynprune.eval.sweep_methods import load_static_export
    from dynprune.eval.sweep_static_gates import static_gates_export

    width = static_width(ctx, budget)
    path = static_gates_export(ctx, width, seed)
    model, info = trained_early_exit(
        ctx, seed, f"static_early_exit@{width:g}_s{seed}", base=lambda: load_static_export(path)
    )
    row = _measure(ctx, model, info, budget, "static_early_exit", seed)
    assert model.structure is not None
    row.update(
        static_width=width,
        structure=model.structure.summary(),
        notes=f"static_gates model at {width:g} ({model.structure.summary()}) with exits; " + row["notes"],
    )
    return row


def _measure(
    ctx: SweepContext, model: EarlyExitModel, info: dict[str, Any], budget: float, method: str, seed: int
) -> dict[str, Any]:
    """Calibrate ``model``'s threshold to ``budget`` (:func:`calibration_profile`), then measure it like
    every method. With ``early_exit.governor`` the threshold is corrected online while the evaluation
    batches run, in a random order seeded by ``seed`` (:func:`threshold_governor`)."""
    from dynprune.eval.sweep_methods import measure_point

    conf, ratios = calibration_profile(ctx, model, info["path"])
    threshold, val_ratio = calibrate_threshold(conf, ratios, budget)
    governor, order = None, None
    if ctx.cfg.early_exit.governor:
        governor = threshold_governor(conf, ratios, budget)
        order = np.random.default_rng(seed).permutation(len(ctx.eval_batches)).tolist()
    runner = EarlyExitRunner(model, threshold, ctx.fm, method, governor)
    row = measure_point(ctx, runner, order)
    # where the evaluation inputs left (the runner logs the accuracy pass only, not the timing calls)
    exits = np.concatenate([e.numpy() for e in runner.exit_log])
    share = np.bincount(exits, minlength=model.n_exits + 1)[1:] / len(exits)
    split = ctx.cfg.early_exit.calibration_split
    notes = (
        f"confidence threshold {threshold:.4f} ({split} inputs' mean FLOPs "
        f"ratio {val_ratio:.3f} on {conf.shape[1]} examples)"
    )
    if governor is not None:
        notes += (
            f", governed while evaluating (batches in random order): final threshold {governor.knob:.4f}; "
            f"the evaluation inputs spent {governor.bias:+.3f} of dense FLOPs per input against the calibration's "
            "prediction"
        )
        row.update(threshold_final=governor.knob, governor_bias=governor.bias)
    row.update(
        disk_bytes=(Path(info["path"]) / WEIGHTS).stat().st_size,
        finetune_steps=int(info.get("steps", 0)),
        threshold=threshold,
        calibration_flops_ratio=val_ratio,
        calibration_examples=int(conf.shape[1]),
        exit_share=[round(float(x), 4) for x in share],
        notes=(
            notes
            + f"; share of inputs leaving at exits 1..{model.n_exits}: "
            + ", ".join(f"{x:.2f}" for x in share)
            + f"; fine-tuned once for all budgets, {int(info.get('steps', 0))} steps"
        ),
    )
    return row
