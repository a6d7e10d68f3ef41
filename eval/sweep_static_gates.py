"""The sweep's ``static_gates`` points and their equal-steps control ``static_gates_ft``.

``static_gates``: the seed's static control (the training run's input-independent router) frozen
to its most common mask at the budget, physically pruned, exported and measured.

``static_gates_ft``: that same export fine-tuned for :attr:`SweepContext.grid_steps` more steps
(labels + distillation, no exits), then exported and measured. ``static_early_exit`` gets those
extra steps (its exit fine-tune) on top of the static control's training; without this control
its gain over ``static_gates`` cannot be told apart from the extra training (on the quick recipes it
was all extra training: results/news20/static_early_exit/). It counts as a static method, so the
goals' "best static method" includes it when it ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dynprune.eval.structure import Structure
from dynprune.eval.sweep_context import SweepContext, finetune
from dynprune.eval.sweep_methods import (
    load_static_export,
    most_common_structure,
    prune_physically,
    static_export,
    static_point,
)
from dynprune.train.evaluation import collect, summarize

import dynprune


def point_static_gates(ctx: SweepContext, budget: float, seed: int) -> dict[str, Any]:
    run = ctx.run_for(seed)
    return static_point(
        ctx,
        "static_gates",
        budget,
        static_gates_build(ctx, budget, seed),
        {"training_run": str(run.root)},
        seed,
    )


def static_gates_build(ctx: SweepContext, budget: float, seed: int) -> Any:
    """``build()`` of the static_gates model at ``budget``: the seed's static control frozen to its
    most common mask and physically pruned (at budget 1: its backbone at full width, e.g. a
    cascade's dense second pass)."""
    run = ctx.run_for(seed)

    def build():
        gated, _ = dynprune.load_gated_model(run.static_dir)
        rec = collect(gated, ctx.eval_batches, budget=budget, keep_masks=budget < 1.0)
        gated_acc = summarize(rec)["accuracy"]
        if budget >= 1.0:  # the dense forward keeps no masks: every unit
            p = gated.parts
            structure, share = Structure.full(p.n_layers, p.n_heads, p.ffn_dim), 1.0
        else:
            structure, share = most_common_structure(gated, rec, ctx)
        plain = dynprune.unwrap(gated)
        info = {
            "steps": run.stage_steps("static") or 0,
            "notes": (
                f"input-independent router frozen to its most common mask ({share:.0%} of inputs; masks "
                f"differ only through sequence length); gated-model accuracy {gated_acc:.4f}"
            ),
        }
        return prune_physically(plain, structure), structure, info

    return build


def static_gates_export(ctx: SweepContext, budget: float, seed: int) -> Path:
    """The directory of the static_gates export at ``budget`` for ``seed`` (built and cached if missing):
    the base of ``static_gates_ft`` and of ``static_early_exit``."""
    return static_export(ctx, "static_gates", budget, static_gates_build(ctx, budget, seed), seed)[0]


def point_static_gates_ft(ctx: SweepContext, budget: float, seed: int) -> dict[str, Any]:
    """The static_gates export at ``budget`` (built if missing) fine-tuned for the grid's steps."""
    run = ctx.run_for(seed)
    base = static_gates_export(ctx, budget, seed)

    def build():
        model, structure = load_static_export(base)
        info = finetune(ctx, model, ctx.grid_steps, f"static_gates_ft@{budget:g} s{seed}", seed=seed)
        steps = int(info.get("steps", 0))
        info["notes"] = (
            f"static_gates export {base} fine-tuned {steps} more steps (labels + distillation, no exits): "
            "the equal-steps control of static_early_exit"
        )
        return model, structure, info

    row = static_point(ctx, "static_gates_ft", budget, build, {"training_run": str(run.root)}, seed)
    row["static_control_steps"] = run.stage_steps("static") or 0
    return row
