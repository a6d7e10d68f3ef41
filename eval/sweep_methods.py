"""One sweep point per call: build (prune, fine-tune, export) a method's model at a budget, then
measure it with the same code as every other method (:func:`measure_point`).

Methods (the ``method`` column): ``dense``, ``dynamic`` (the budget-conditioned
gated checkpoint), ``magnitude`` (global unstructured L1), ``ln_structured``
(norm-scored heads/neurons, uniform per layer, physically removed),
``iterative`` (ln_structured in rounds, fine-tuning between them),
``static_gates`` (the training run's input-independent router, frozen to its
most common mask and physically removed), ``search`` (EagleEye-style search
over per-layer keep ratios) and ``random`` (random units, ln_structured's
per-layer counts); ``early_exit`` (a classifier after every layer, calibrated confidence
threshold, :mod:`dynprune.eval.sweep_early_exit`); ``static_early_exit`` (width from the
static control, depth from exits: the static_gates model at a wider budget with exits calibrated
down to the target mean); ``static_gates_ft`` (static_gates fine-tuned for the exits' extra steps,
no exits: their equal-steps control, :mod:`dynprune.eval.sweep_static_gates`); ``static_cascade``
(the static control at a mean budget: run low, the least confident re-run high) and
``static_cascade_ft`` (that pair fine-tuned at equal steps, :mod:`dynprune.eval.sweep_cascade`). Every point function is
``(ctx, budget, seed) -> row``: the contenders (dynamic, static_gates, early_exit, static_early_exit, static_gates_ft, static_cascade)
use ``seed`` (a training run per seed for the first two), the classic methods run
once with the sweep's ``seed``. Every static method's model is exported as a smaller HF
directory (sparse for magnitude) and the *reloaded export* is what is
evaluated and timed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from dynprune.eval.baselines import magnitude as mag
from dynprune.eval.baselines.search import SubnetSearch
from dynprune.eval.baselines.structured import (
    expand_into,
    ln_scores,
    random_units,
    select,
    top_units,
    uniform_counts,
)
from dynprune.eval.export import frozen_structure, load_pruned
from dynprune.eval.physical import physically_prune
from dynprune.eval.runners import DenseRunner, GatedRunner, StructureRunner
from dynprune.eval.sparse_io import load_sparse, save_sparse, weights_bytes
from dynprune.eval.structure import Structure
from dynprune.eval.sweep_context import SweepContext, dynamic_budget, finetune
from dynprune.eval.sweep_measure import evaluate_runner, measure_point
from dynprune.eval.timing import materialize
from dynprune.train.data import model_inputs
from dynprune.train.evaluation import collect
from torch import nn

import dynprune

DONE = "sweep_done.json"


# -- cached artifacts (a crash never loses a fine-tune) -----------------------------------------
def _artifact(ctx: SweepContext, method: str, budget: float, seed: int) -> Path:
    return ctx.work / "models" / f"{method}@{budget:g}_s{seed}"


def _finished(path: Path) -> dict[str, Any] | None:
    f = path / DONE
    return json.loads(f.read_text()) if f.is_file() else None


def _mark(path: Path, info: dict[str, Any]) -> None:
    (path / DONE).write_text(json.dumps(info, indent=1))


def static_point(
    ctx: SweepContext,
    method: str,
    budget: float,
    build: Any,
    extra: dict[str, Any] | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """``build() -> (pruned model, structure, info)`` unless an export exists; evaluate the export."""
    path, info = static_export(ctx, method, budget, build, seed)
    model, structure = load_static_export(path)
    model = materialize(model)
    row = measure_point(ctx, StructureRunner(model, structure, ctx.fm, method))
    row.update(
        disk_bytes=weights_bytes(path),
        structure=structure.summary(),
        finetune_steps=info.get("steps", 0),
        notes=info.get("notes", ""),
        export=str(path),
        **(extra or {}),
    )
    row["build"] = {k: v for k, v in info.items() if k != "notes"}
    return row


def static_export(
    ctx: SweepContext, method: str, budget: float, build: Any, seed: int | None = None
) -> tuple[Path, dict[str, Any]]:
    """The export of ``method`` at ``budget`` (built by ``build()`` and exported unless it exists):
    (its directory, the build's info)."""
    path = _artifact(ctx, method, budget, ctx.cfg.seed if seed is None else seed)
    info = _finished(path)
    if info is None:
        pruned, structure, info = build()
        info.update(export_static_model(ctx, pruned, structure, path))
        _mark(path, info)
    return path, info


def load_static_export(path: Path) -> tuple[nn.Module, Structure]:
    """A static export reloaded: (the physically pruned model, its structure)."""
    structure = Structure.from_dict(json.loads((path / "dynprune_structure.json").read_text()))
    return load_pruned(path), structure


def export_static_model(
    ctx: SweepContext, pruned: nn.Module, structure: Structure, path: Path
) -> dict[str, Any]:
    from dynprune.eval.export import save_pruned

    e = save_pruned(pruned, structure, path, ctx.fm.n_heads, ctx.tokenizer)
    return {"stock_hf_loadable": e.stock_loadable, "why_not_stock": e.reason}


def prune_physically(model: nn.Module, structure: Structure) -> nn.Module:
    return physically_prune(model, structure.heads, structure.neurons, structure.layers)


def _uniform(ctx: SweepContext, budget: float) -> tuple[int, int]:
    return uniform_counts(ctx.fm, budget, ctx.ref_seq, multiple=ctx.cfg.structured.neuron_multiple)


# -- methods -------------------------------------------------------------------------------------
def point_dense(ctx: SweepContext, budget: float, seed: int) -> dict[str, Any]:
    row = measure_point(ctx, ctx.dense_runner)  # dense against itself: an A/A check of the timing
    aa = {k: row[f"speedup_{k}"] for k in ("bs1", "bs16") if f"speedup_{k}" in row}
    for k in aa:  # the reference is 1.0 by definition
        row[f"speedup_{k}"] = row[f"ideal_speedup_{k}"] = row[f"ratio_to_ideal_{k}"] = 1.0
    row.update(disk_bytes=weights_bytes(ctx.run.dense_dir), finetune_steps=ctx.run.stage_steps("dense") or 0)
    row["notes"] = (
        "fine-tuned dense model of the training run (the teacher of every method); A/A timing check "
        + (", ".join(f"{k} {v:.3f}" for k, v in aa.items()))
    )
    return row


def point_dynamic(ctx: SweepContext, budget: float, seed: int) -> dict[str, Any]:
    from dynprune.train.adaptivity import mask_stats

    run = ctx.run_for(seed)
    gated, _ = dynprune.load_gated_model(run.gated_dir)
    materialize(gated)
    arg = dynamic_budget(ctx.cfg, budget)
    row = measure_point(ctx, GatedRunner(gated, arg))
    rec = collect(gated, ctx.eval_batches, budget=arg, keep_masks=True)
    stats = mask_stats(rec)
    # the same weights frozen to the most common mask: what input-adaptivity is worth here
    structure, share = most_common_structure(gated, rec, ctx)
    frozen = prune_physically(dynprune.unwrap(gated), structure)
    frozen_eval = evaluate_runner(ctx, StructureRunner(frozen, structure, ctx.fm, "dynamic frozen"))
    row.update(
        disk_bytes=weights_bytes(run.gated_dir),
        finetune_steps=run.stage_steps("gated") or 0,
        training_run=str(run.root),
        gate_stats=stats,
        frozen={"structure": structure.summary(), "mask_share": share, **frozen_eval},
        notes=(
            f"per-input gates: {stats['distinct_masks']} distinct masks over {len(rec.labels)} inputs, "
            f"mean pairwise Hamming {stats['hamming_frac']:.3f} of units; frozen to its most common mask "
            f"({share:.0%} of inputs, no fine-tuning): accuracy {frozen_eval['accuracy']:.4f} at FLOPs ratio "
            f"{frozen_eval['flops_ratio']:.3f}"
        ),
    )
    return row


def most_common_structure(gated: dynprune.GatedModel, rec: Any, ctx: SweepContext) -> tuple[Structure, float]:
    p = gated.parts
    return frozen_structure(
        rec.head, rec.ffn, rec.layer, gated.head_perm.cpu(), gated.ffn_perm.cpu(),
        gated.gate_config.ffn_slice_size, p.n_layers, p.n_heads, p.ffn_dim,
    )  # fmt: skip


def point_magnitude(ctx: SweepContext, budget: float, seed: int) -> dict[str, Any]:
    path = _artifact(ctx, "magnitude", budget, ctx.cfg.seed)
    info = _finished(path)
    if info is None:
        model = ctx.fresh_dense()
        mag.magnitude_prune(model, keep=budget)
        info = finetune(ctx, model, ctx.finetune_steps, f"magnitude@{budget:g}")
        mag.make_permanent(model)
        save_sparse(model, path, ctx.tokenizer)
        _mark(path, info)
    model = materialize(load_sparse(path))
    row = measure_point(ctx, DenseRunner(model, ctx.fm, "magnitude"))
    sparsity = mag.sparsity(model)
    row.update(
        disk_bytes=weights_bytes(path),
        sparsity=sparsity,
        nonzero_flops_ratio=mag.nonzero_flops_ratio(model, ctx.fm, ctx.ref_seq),
        finetune_steps=info["steps"],
        params=sum(int((p != 0).sum()) for p in model.parameters()),
        notes=(
            f"{sparsity:.1%} of layer weights are zero, but a dense machine still multiplies them: "
            "executed FLOPs and time stay dense; params = non-zeros; disk = bitmap-sparse safetensors"
        ),
    )
    return row


def point_ln_structured(ctx: SweepContext, budget: float, seed: int) -> dict[str, Any]:
    def build():
        model = ctx.fresh_dense()
        hs, ns = ln_scores(model, ctx.head_dim, ctx.cfg.structured.norm)
        h, n = _uniform(ctx, budget)
        structure = Structure.from_indices(top_units(hs, [h] * len(hs)), top_units(ns, [n] * len(ns)))
        pruned = prune_physically(model, structure)
        info = finetune(ctx, pruned, ctx.finetune_steps, f"ln_structured@{budget:g}")
        return pruned, structure, info

    return static_point(ctx, "ln_structured", budget, build)


def point_random(ctx: SweepContext, budget: float, seed: int) -> dict[str, Any]:
    def build():
        model = ctx.fresh_dense()
        h, n = _uniform(ctx, budget)
        layers = ctx.fm.n_layers
        structure = random_units(
            ctx.fm.n_heads, ctx.fm.ffn_dim, [h] * layers, [n] * layers, seed=ctx.cfg.seed
        )
        pruned = prune_physically(model, structure)
        info = finetune(ctx, pruned, ctx.finetune_steps, f"random@{budget:g}")
        info["notes"] = "random heads and FFN neurons with ln_structured's per-layer counts"
        return pruned, structure, info

    return static_point(ctx, "random", budget, build)


def point_iterative(ctx: SweepContext, budget: float, seed: int) -> dict[str, Any]:
    def build():
        rounds = ctx.cfg.structured.iterative_rounds
        full = ctx.fresh_dense()  # full-size index space: every round prunes from here
        model = full
        current = Structure.full(ctx.fm.n_layers, ctx.fm.n_heads, ctx.fm.ffn_dim)
        steps_left, total, seconds, schedule = ctx.finetune_steps, 0, 0.0, []
        for r in range(1, rounds + 1):
            b = budget ** (r / rounds)
            hs, ns = ln_scores(model, ctx.head_dim, ctx.cfg.structured.norm)  # of the current model
            h, n = _uniform(ctx, b)
            layers = ctx.fm.n_layers
            new = select(current, hs, ns, [h] * layers, [n] * layers)
            if model is not full:
                expand_into(full, model, current, ctx.head_dim)  # fine-tuned weights back in place
            model = prune_physically(full, new)
            current = new
            steps = steps_left // (rounds - r + 1)
            steps_left -= steps
            res = finetune(ctx, model, steps, f"iterative@{budget:g} round {r}", seed_offset=r)
            total += res["steps"]
            seconds += res["train_seconds"]
            schedule.append(round(current.flops_ratio(ctx.fm, ctx.ref_seq), 4))
        info = {
            "steps": total,
            "train_seconds": seconds,
            "notes": f"FLOPs ratio after each round: {schedule}",
        }
        return model, current, info

    return static_point(ctx, "iterative", budget, build)


@torch.inference_mode()
def calibration_score(ctx: SweepContext, structure: Structure) -> float:
    """KL(teacher || candidate) (or cross-entropy) on the calibration batches, lower is better."""
    model = prune_physically(ctx.dense, structure)
    total, n = 0.0, 0
    for batch, teacher in zip(ctx.calib_batches, ctx.calib_teacher):
        logits = model(**model_inputs(batch)).logits.float()
        if ctx.cfg.search.score == "kl":
            total += float(
                F.kl_div(logits.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="sum")
            )
        else:
            total += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
        n += logits.shape[0]
    return total / n


def point_search(ctx: SweepContext, budget: float, seed: int) -> dict[str, Any]:
    def build():
        from tqdm.auto import tqdm

        s = ctx.cfg.search
        hs, ns = ln_scores(ctx.dense, ctx.head_dim, ctx.cfg.structured.norm)
        search = SubnetSearch(
            ctx.fm, budget, ctx.ref_seq, hs, ns, min_ratio=s.min_ratio,
            multiple=ctx.cfg.structured.neuron_multiple, seed=ctx.cfg.seed,
        )  # fmt: skip
        t0 = time.perf_counter()
        total = s.candidates + s.generations * s.children
        with tqdm(total=total, desc=f"search@{budget:g}", leave=False, unit="cand") as bar:
            result = search.run(
                lambda st: calibration_score(ctx, st), s.candidates, s.population, s.generations, s.children,
                progress=bar.update,
            )  # fmt: skip
        search_s = time.perf_counter() - t0
        structure = result.best.structure
        pruned = prune_physically(ctx.fresh_dense(), structure)
        info = finetune(ctx, pruned, ctx.finetune_steps, f"search@{budget:g}")
        first = min(c.score for c in result.history[: s.candidates])
        info.update(
            search_seconds=search_s,
            candidates_scored=len(result.history),
            best_score=result.best.score,
            best_random_score=first,
            notes=(
                f"{len(result.history)} candidates scored ({s.score} on {sum(b['labels'].shape[0] for b in ctx.calib_batches)} "
                f"calibration examples, {search_s:.0f}s); best {result.best.score:.4f} vs best random {first:.4f}"
            ),
        )
        return pruned, structure, info

    return static_point(ctx, "search", budget, build)


POINTS = {
    "dense": point_dense,
    "dynamic": point_dynamic,
    "magnitude": point_magnitude,
    "ln_structured": point_ln_structured,
    "iterative": point_iterative,
    "static_gates": lambda ctx, budget, seed: _static_gates(ctx, budget, seed),
    "static_gates_ft": lambda ctx, budget, seed: _static_gates(ctx, budget, seed, finetuned=True),
    "search": point_search,
    "random": point_random,
    "early_exit": lambda ctx, budget, seed: _early_exit(ctx, budget, seed),
    "static_early_exit": lambda ctx, budget, seed: _static_early_exit(ctx, budget, seed),
    "static_cascade": lambda ctx, budget, seed: _static_cascade(ctx, budget, seed),
    "static_cascade_ft": lambda ctx, budget, seed: _static_cascade(ctx, budget, seed, finetuned=True),
}


def _early_exit(ctx: SweepContext, budget: float, seed: int) -> dict[str, Any]:
    from dynprune.eval.sweep_early_exit import point_early_exit

    return point_early_exit(ctx, budget, seed)


def _static_early_exit(ctx: SweepContext, budget: float, seed: int) -> dict[str, Any]:
    from dynprune.eval.sweep_early_exit import point_static_early_exit

    return point_static_early_exit(ctx, budget, seed)


def _static_cascade(ctx: SweepContext, budget: float, seed: int, finetuned: bool = False) -> dict[str, Any]:
    from dynprune.eval.sweep_cascade import point_static_cascade, point_static_cascade_ft

    return (point_static_cascade_ft if finetuned else point_static_cascade)(ctx, budget, seed)


def _static_gates(ctx: SweepContext, budget: float, seed: int, finetuned: bool = False) -> dict[str, Any]:
    from dynprune.eval.sweep_static_gates import point_static_gates, point_static_gates_ft

    return (point_static_gates_ft if finetuned else point_static_gates)(ctx, budget, seed)
