"""`dynprune train`: dense fine-tune -> gated fine-tune -> static control -> report.

Output directory layout (docs/training.md has the full description)::

    OUTPUT_DIR/config.yaml          resolved config of the run
    OUTPUT_DIR/dense/               HF model dir (+ tokenizer): teacher and dense reference
    OUTPUT_DIR/gated/               base/ gates/ config.yaml metrics.json  (dynamic router)
    OUTPUT_DIR/static/              same layout (static router: the control)
    OUTPUT_DIR/checkpoints/<stage>/step-XXXXXXXX/   resumable training state
    OUTPUT_DIR/report/              results.csv, adaptivity.csv, summary.md, keep_rates.png
    OUTPUT_DIR/logs/metrics.jsonl   every logged metric; OUTPUT_DIR/wandb/ (offline runs)

A stage whose output directory holds ``metrics.json`` is done and is skipped
on ``--resume``; an unfinished stage continues from its newest complete checkpoint.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dynprune.train import checkpoint as ckpt
from dynprune.train.config import TrainConfig
from dynprune.train.data import Collator, TaskData, encode, eval_batches, model_inputs
from dynprune.train.evaluation import collect, summarize
from dynprune.train.importance import taylor_orders
from dynprune.train.objectives import DenseObjective, GatedObjective
from dynprune.train.preflight import preflight
from dynprune.train.tracking import Tracker
from dynprune.train.trainer import StageSettings, Trainer

import dynprune

STAGE_ROUTER = {"gated": "dynamic", "static": "static"}


@dataclass
class Context:
    cfg: TrainConfig
    config_yaml: str
    out: Path
    acc: Any
    tokenizer: Any
    data: TaskData
    examples: dict[str, list[dict[str, Any]]]
    collate: Collator
    tracker: Tracker
    model_path: str
    timings: dict[str, float] = field(default_factory=dict)
    orders: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    def loader(self, split: str):
        """Length-sorted evaluation batches of a split."""
        ex = self.examples[split]
        return [self.collate([ex[i] for i in b]) for b in eval_batches(ex, self.cfg.optim.eval_batch_size)]


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic and torch.cuda.is_available():
        # CPU kernels are already deterministic for a fixed number of threads (and this call
        # costs seconds of imports); on CUDA, ask for deterministic kernels where they exist
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def make_accelerator(mixed_precision: str = "no"):
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision)


def run(cfg: TrainConfig, config_yaml: str) -> dict[str, Any]:
    """Run every configured stage and the final report; returns the report dict (main process)."""
    import transformers

    if cfg.task == "causal_lm":
        from dynprune.train.lm import run_causal_lm

        return run_causal_lm(cfg, config_yaml)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # our own bars only
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.time()
    acc = make_accelerator(cfg.optim.mixed_precision)
    out = Path(cfg.output_dir)
    model_path, data = preflight(cfg, out, is_main=acc.is_main_process)  # every bad input fails here
    acc.wait_for_everyone()
    seed_everything(cfg.seed, cfg.deterministic)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    examples = encode(data, tokenizer, cfg.data.max_length)
    collate = Collator(tokenizer.pad_token_id, getattr(tokenizer, "padding_side", "right"))
    if acc.is_main_process and not (out / "config.yaml").is_file():
        out.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(
            out / "run.json", {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "data": data.source}
        )
        from dynprune.io import atomic_write_bytes

        atomic_write_bytes(out / "config.yaml", config_yaml.encode())
    acc.wait_for_everyone()
    tracker = Tracker(cfg.logging, out, cfg.to_dict(), enabled=acc.is_main_process)
    ctx = Context(cfg, config_yaml, out, acc, tokenizer, data, examples, collate, tracker, model_path)
    try:
        dense_dir = Path(cfg.model.teacher_path) if cfg.model.teacher_path else out / "dense"
        if "dense" in cfg.stages:
            run_dense(ctx, dense_dir)
        pending = [s for s in STAGE_ROUTER if s in cfg.stages and not _stage_done(out / s)]
        if pending:
            teacher = load_classifier(dense_dir, data.label_names).to(acc.device).eval()
            if cfg.distill.logits_weight > 0:
                t0 = time.perf_counter()
                add_teacher_logits(teacher, examples["train"], collate, cfg.optim.eval_batch_size, acc.device)
                ctx.timings["teacher_logits_s"] = time.perf_counter() - t0
            online = teacher if cfg.distill.hidden_weight > 0 else None
            for stage in pending:
                run_gated(ctx, stage, dense_dir, online)
            del teacher
        report: dict[str, Any] = {}
        if ctx.main:
            from dynprune.train.report import final_report

            ctx.timings["total_wall_s"] = time.time() - start
            report = final_report(ctx, dense_dir)
        acc.wait_for_everyone()
        return report
    finally:
        tracker.finish()


# -- models -------------------------------------------------------------------------------------


def load_classifier(path: str | Path, label_names: list[str]) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    id2label = dict(enumerate(label_names))
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(label_names), id2label=id2label, label2id={v: k for k, v in id2label.items()}
    )


@torch.no_grad()
def add_teacher_logits(
    teacher, examples: list[dict[str, Any]], collate: Collator, batch_size: int, device
) -> None:
    """Cache the (eval-mode) teacher's logits in every training example (no dropout: deterministic)."""
    for idx in eval_batches(examples, batch_size):
        batch = collate([examples[i] for i in idx])
        logits = teacher(**{k: v.to(device) for k, v in model_inputs(batch).items()}).logits.float().cpu()
        for row, i in enumerate(idx):
            examples[i]["teacher_logits"] = logits[row]


def stage_settings(c: TrainConfig, name: str, epochs: float, lr: float, offset: int) -> StageSettings:
    o = c.optim
    return StageSettings(
        name=name,
        epochs=epochs,
        lr=lr,
        batch_size=o.batch_size,
        grad_accum=o.grad_accum,
        router_lr=o.router_lr,
        weight_decay=o.weight_decay,
        warmup_ratio=o.warmup_ratio,
        max_grad_norm=o.max_grad_norm,
        max_steps=o.max_steps,
        group_by_length=o.group_by_length,
        seed=c.seed + offset,
        log_every=c.logging.log_every,
        eval_every=c.logging.eval_every,
        checkpoint_every=c.checkpoint.every_steps,
        keep_last=c.checkpoint.keep_last,
        progress=c.logging.progress,
    )


def _resume_point(ctx: Context, stage: str) -> Path | None:
    root = ctx.out / "checkpoints" / stage
    if ctx.main:
        ckpt.remove_stale_temporaries(root)
    ctx.acc.wait_for_everyone()
    return ckpt.latest_checkpoint(root) if ctx.cfg.resume else None


def _stage_done(path: Path) -> bool:
    return (path / "metrics.json").is_file()


def run_dense(ctx: Context, dense_dir: Path) -> None:
    if _stage_done(dense_dir):
        return
    c = ctx.cfg
    seed_everything(c.seed, c.deterministic)
    model = load_classifier(ctx.model_path, ctx.data.label_names).to(ctx.acc.device)
    val = ctx.loader("validation")
    trainer = Trainer(
        accelerator=ctx.acc,
        model=model,
        objective=DenseObjective(),
        examples=ctx.examples["train"],
        collate=ctx.collate,
        settings=stage_settings(ctx.cfg, "dense", c.optim.dense_epochs, c.optim.dense_lr, 0),
        checkpoint_root=ctx.out / "checkpoints" / "dense",
        config_yaml=ctx.config_yaml,
        tracker=ctx.tracker,
        evaluate_fn=lambda m: _pick(summarize(collect(m, val)), "accuracy", "loss"),
    )
    resume = _resume_point(ctx, "dense")
    if resume is not None:
        trainer.resume(resume)
    result = trainer.fit()
    ctx.timings["dense_train_s"] = result["train_seconds"]
    if ctx.main:
        metrics = {"stage": "dense", "train": result, "validation": summarize(collect(model, val))}
        _save_dir(dense_dir, lambda tmp: (model.save_pretrained(tmp), ctx.tokenizer.save_pretrained(tmp)))
        _finish_stage(ctx.config_yaml, dense_dir, metrics)
    ctx.acc.wait_for_everyone()


def unit_orders(ctx: Context, student: torch.nn.Module, router_layer: int):
    """Taylor importance orders (computed once per run and router layer), or None for the core's choice."""
    if ctx.cfg.gate.unit_order != "taylor":
        return None
    if router_layer not in ctx.orders:
        t0 = time.perf_counter()
        ctx.orders[router_layer] = taylor_orders(
            student,
            ctx.examples["train"],
            ctx.collate,
            n_batches=ctx.cfg.gate.importance_batches,
            batch_size=ctx.cfg.optim.batch_size,
            router_layer=router_layer,
            seed=ctx.cfg.seed,
        )
        ctx.timings["importance_s"] = time.perf_counter() - t0
    return ctx.orders[router_layer]


def run_gated(ctx: Context, stage: str, dense_dir: Path, teacher: torch.nn.Module | None) -> None:
    target = ctx.out / stage
    c = ctx.cfg
    offset = list(STAGE_ROUTER).index(stage) + 1
    seed_everything(c.seed + offset, c.deterministic)
    student = load_classifier(dense_dir, ctx.data.label_names).to(ctx.acc.device)
    resume = _resume_point(ctx, stage)
    if resume is not None:
        from safetensors.torch import load_file

        extra = load_file(str(resume / "extra.safetensors"))
        orders = (extra["head_perm"], extra["ffn_perm"])
    else:
        orders = unit_orders(ctx, student, c.gate.router_layer)
    gated = dynprune.wrap(student, c.gate.gate_config(router=STAGE_ROUTER[stage]), orders=orders)
    objective = GatedObjective(
        gated, c.gate, c.regularizer, c.distill, c.seed + offset, ctx.acc.process_index, teacher
    )
    val = ctx.loader("validation")
    budgets = c.evaluation.budgets

    def evaluate_fn(m: torch.nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for b in budgets:
            spend: Any = b
            if c.gate.budget_mode == "mean" and b < 1.0:  # calibrate the threshold on validation first
                spend = calibrate_mean(gated, val, b)
            s = summarize(collect(m, val, budget=spend, execution=c.evaluation.execution))
            out[f"accuracy@{b}"], out[f"flops_ratio@{b}"] = s["accuracy"], s["flops_ratio_mean"]
        return out

    trainer = Trainer(
        accelerator=ctx.acc,
        model=gated,
        objective=objective,
        examples=ctx.examples["train"],
        collate=ctx.collate,
        settings=stage_settings(ctx.cfg, stage, c.optim.gated_epochs, c.optim.gated_lr, offset),
        checkpoint_root=ctx.out / "checkpoints" / stage,
        config_yaml=ctx.config_yaml,
        tracker=ctx.tracker,
        evaluate_fn=evaluate_fn,
        extra_tensors={"head_perm": gated.head_perm.cpu(), "ffn_perm": gated.ffn_perm.cpu()},
    )
    if resume is not None:
        trainer.resume(resume)
    result = trainer.fit()
    ctx.timings[f"{stage}_train_s"] = result["train_seconds"]
    if ctx.main:
        metrics = {
            "stage": stage,
            "router": STAGE_ROUTER[stage],
            "train": result,
            "multipliers": objective.lagrangian.state_dict(),
            "validation": evaluate_fn(gated),
        }
        dynprune.save_gated_model(gated, target, ctx.tokenizer)
        _finish_stage(ctx.config_yaml, target, metrics)
    ctx.acc.wait_for_everyone()


# -- helpers ------------------------------------------------------------------------------------


def calibrate_mean(gated: dynprune.GatedModel, val: list, target: float) -> dynprune.MeanBudget:
    """Fit (and keep in ``gated.calibration``) the threshold for mean ``target`` on validation."""
    from dynprune.calibration_fit import fit

    budget = dynprune.MeanBudget(target)
    gated.calibration.add(fit(gated, val, budget, policy="threshold"))
    return budget


def _pick(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: d[k] for k in keys}


def _save_dir(target: Path, write) -> None:
    """Write a directory via ``write(tmp)`` into a temporary sibling, then rename it into place."""
    from dynprune.io import atomic_directory

    with atomic_directory(target) as tmp:
        write(tmp)


def _finish_stage(config_yaml: str, target: Path, metrics: dict[str, Any]) -> None:
    """config.yaml, then metrics.json last: its presence marks the stage as done."""
    from dynprune.io import atomic_write_bytes

    atomic_write_bytes(target / "config.yaml", config_yaml.encode())
    ckpt.write_json(target / "metrics.json", metrics)
