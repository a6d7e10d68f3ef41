"""Public training API (``from dynprune.train import ...``).

Data::

    data = load_task_data()                                   # packaged Rotten Tomatoes, the one split
    data = load_task_data(DataConfig(path="reviews.csv", text_column="review", label_column="stars"))
    test = eval_dataloader(data, tokenizer, "test")           # length-sorted, dynamically padded

Fine-tune a plain HF model (e.g. a statically pruned baseline) with the same
data, loop and step budget as the dense stage of ``dynprune train``::

    result = finetune(model, data, tokenizer, steps=957)      # or epochs=3.0
    metrics = evaluate(model, test)                           # accuracy, loss, FLOPs stats

Evaluate a gated model at a budget::

    gated, tok = dynprune.load_gated_model("runs/rt/gated")
    evaluate(gated, eval_dataloader(data, tok, "test"), budget=0.25)

Run the whole recipe from Python: ``train(load_config("configs/minilm_rt.yaml", ["--output_dir=x"]))``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from dynprune.train.config import DataConfig, DistillConfig, OptimConfig, TrainConfig
from dynprune.train.data import (
    Collator,
    DataError,
    TaskData,
    encode,
    load_task_data,
    make_dataloader,
)
from dynprune.train.evaluation import Records, collect, evaluate, summarize

__all__ = [
    "DataConfig",
    "DataError",
    "OptimConfig",
    "Records",
    "TaskData",
    "TrainConfig",
    "collect",
    "encode",
    "eval_dataloader",
    "evaluate",
    "finetune",
    "load_config",
    "load_task_data",
    "make_dataloader",
    "summarize",
    "train",
]


def eval_dataloader(
    data: TaskData, tokenizer: Any, split: str = "test", batch_size: int = 64, max_length: int = 64
) -> torch.utils.data.DataLoader:
    """Batches of one split, sorted by length and padded per batch (for :func:`evaluate`)."""
    if split not in data.splits:
        raise ValueError(f"unknown split {split!r}; choose from {list(data.splits)}")
    examples = encode(data, tokenizer, max_length)[split]
    return make_dataloader(examples, tokenizer, batch_size)


def finetune(
    model: torch.nn.Module,
    data: TaskData,
    tokenizer: Any,
    *,
    optim: OptimConfig | None = None,
    epochs: float | None = None,
    steps: int | None = None,
    lr: float | None = None,
    max_length: int = 64,
    seed: int = 0,
    teacher: torch.nn.Module | None = None,
    distill: DistillConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    objective: Any = None,
) -> dict[str, Any]:
    """Fine-tune a plain HF sequence-classification model in place on ``data["train"]``.

    Same loop as the dense stage of ``dynprune train``: AdamW, linear warmup and
    decay, seeded length-grouped batches, dynamic padding, accelerate (run it
    under torchrun for several processes). Batch size, weight decay, warmup,
    clipping and accumulation come from ``optim`` (default :class:`OptimConfig`);
    ``epochs`` / ``lr`` default to its ``dense_epochs`` / ``dense_lr``.
    ``steps``: an exact number of optimiser steps instead of epochs (to give
    several methods the same step budget). ``teacher``: distil its logits too
    (weights from ``distill``, default :class:`DistillConfig`).
    ``checkpoint_dir``: write resumable checkpoints there; ``resume=True``
    continues from the newest complete one. ``objective``: a factory ``distill -> objective``
    (distill is None without a teacher) for models whose loss is not the dense one (e.g. the
    sweep's early-exit model, one loss per exit); default :class:`DenseObjective`.
    Returns {"steps", "train_seconds", "validation": evaluate(...) on data["validation"], ...}.
    """
    from dynprune.train import checkpoint as ckpt
    from dynprune.train.objectives import DenseObjective
    from dynprune.train.pipeline import add_teacher_logits, make_accelerator, seed_everything
    from dynprune.train.trainer import StageSettings, Trainer

    o = optim or OptimConfig()
    if steps is not None and (not isinstance(steps, int) or steps <= 0):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    acc = make_accelerator(o.mixed_precision)
    seed_everything(seed, True)
    device = acc.device
    model.to(device)
    examples = encode(data, tokenizer, max_length)
    collate = Collator(tokenizer.pad_token_id, getattr(tokenizer, "padding_side", "right"))
    if teacher is not None:
        teacher.to(device).eval()
        add_teacher_logits(teacher, examples["train"], collate, o.eval_batch_size, device)
    n_epochs = o.dense_epochs if epochs is None else epochs
    if steps is not None:  # enough epochs for `steps`, then stop exactly there
        per_epoch = max(1, len(examples["train"]) // (o.batch_size * acc.num_processes))
        n_epochs = math.ceil(steps * o.grad_accum / per_epoch) + 1
    settings = StageSettings(
        name="finetune",
        epochs=n_epochs,
        lr=o.dense_lr if lr is None else lr,
        router_lr=o.router_lr,  # parameters the model added (e.g. early-exit heads), if any
        batch_size=o.batch_size,
        grad_accum=o.grad_accum,
        weight_decay=o.weight_decay,
        warmup_ratio=o.warmup_ratio,
        max_grad_norm=o.max_grad_norm,
        max_steps=steps if steps is not None else o.max_steps,
        group_by_length=o.group_by_length,
        seed=seed,
        progress=progress,
    )
    root = None if checkpoint_dir is None else Path(checkpoint_dir)
    trainer = Trainer(
        accelerator=acc,
        model=model,
        objective=(objective or DenseObjective)(
            (distill or DistillConfig()) if teacher is not None else None
        ),
        examples=examples["train"],
        collate=collate,
        settings=settings,
        checkpoint_root=root,
    )
    if resume and root is not None and (point := ckpt.latest_checkpoint(root)) is not None:
        trainer.resume(point)
    result = trainer.fit()
    model.eval()
    val = make_dataloader(examples["validation"], tokenizer, o.eval_batch_size)
    return {**result, "validation": evaluate(model, val)}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A validated TrainConfig from a YAML file plus ``--section.key=value`` overrides."""
    from dynprune.train.cli import parse_config

    args = ([f"--config={path}"] if path is not None else []) + list(overrides or [])
    return parse_config(args)


def train(config: TrainConfig) -> dict[str, Any]:
    """Run ``dynprune train`` with a config object; returns the final report (main process)."""
    from dynprune.train.cli import dump_config
    from dynprune.train.pipeline import run

    return run(config, dump_config(config))
