"""What every point of a sweep shares: data, the dense model and teacher, FLOPs model, inputs.

Built once per sweep (:func:`build_context`): the training run's split and
tokenizer, the dense fine-tuned model (reference, teacher and starting point
of every static method), its cached logits on the training split (the
distillation targets of every baseline fine-tune, computed once), the
evaluation batches (length-sorted, dynamically padded), the timing inputs
and a calibration set for the sub-network search.

:func:`finetune` is the one way a baseline is fine-tuned: dynprune.train's
Trainer with its dense objective (labels + distillation from the cached
teacher logits), the same settings for every method.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from dynprune.eval.latency import TimingInputs
from dynprune.eval.runners import Batch, DenseRunner
from dynprune.eval.structure import static_flops_model
from dynprune.eval.sweep_config import SweepConfig
from dynprune.eval.timing import materialize
from torch import nn

from dynprune.flops import FlopsModel


class SweepError(ValueError):
    """A sweep cannot start (bad config, missing training run, ...): the message says what to do."""


@dataclass
class TrainingRun:
    """The parts of a `dynprune train` output directory the sweep uses."""

    root: Path
    config: dict[str, Any]

    @property
    def dense_dir(self) -> Path:
        teacher = (self.config.get("model") or {}).get("teacher_path")
        return Path(teacher) if teacher else self.root / "dense"

    @property
    def gated_dir(self) -> Path:
        return self.root / "gated"

    @property
    def static_dir(self) -> Path:
        return self.root / "static"

    def budget_range(self) -> tuple[float, float]:
        gate = self.config.get("gate") or {}
        return float(gate.get("budget_min", 0.0)), float(gate.get("budget_max", 1.0))

    def stage_steps(self, stage: str) -> int | None:
        f = self.root / stage / "metrics.json"
        if not f.is_file():
            return None
        return int(json.loads(f.read_text()).get("train", {}).get("steps", 0)) or None

    @classmethod
    def open(cls, root: str | Path) -> TrainingRun:
        import yaml

        path = Path(root)
        cfg_file = path / "config.yaml"
        if not cfg_file.is_file():
            raise SweepError(
                f"training_dir {str(path)!r} is not a `dynprune train` output directory (no config.yaml); "
                "run `dynprune train --config configs/minilm_rt.yaml` first, or point training_dir at its output_dir"
            )
        return cls(path, yaml.safe_load(cfg_file.read_text()) or {})


def seed_run(cfg: SweepConfig, base: TrainingRun, seed: int) -> TrainingRun:
    """The training run of a contender seed: the base run for its own seed, else seed_training_dir."""
    if seed == int(base.config.get("seed", 0)):
        return base
    root = Path(cfg.seed_training_dir.format(training_dir=cfg.training_dir, seed=seed))
    if not (root / "config.yaml").is_file():
        return TrainingRun(root, {})  # preflight reports the missing stages with the command to run
    return TrainingRun.open(root)


def dynamic_budget(cfg: Any, budget: float) -> Any:
    """What the dynamic model is given for a swept budget: the float (a per-input cap) or, with
    budget_mode=mean, ``dynprune.parse_budget("mean:B")`` (a mean over inputs, calibrated)."""
    if cfg.budget_mode == "cap":
        return budget
    import dynprune

    return dynprune.parse_budget(f"mean:{budget:g}")


@dataclass
class SweepContext:
    cfg: SweepConfig
    run: TrainingRun
    out: Path
    work: Path
    tokenizer: Any
    label_names: list[str]
    examples: dict[str, list[dict[str, Any]]]
    collate: Any
    dense: nn.Module
    fm: FlopsModel
    head_dim: int
    eval_batches: list[Batch]
    timing: TimingInputs
    ref_seq: int
    calib_batches: list[Batch]
    calib_teacher: list[torch.Tensor]
    finetune_steps: int
    data: Any = None  # dynprune.train.TaskData of the training run's split
    teacher: CachedTeacher | None = None
    lr: float = 5e-5
    max_length: int = 64
    dense_reference_ms: dict[str, float] = field(default_factory=dict)  # set by the first timing
    notes: list[str] = field(default_factory=list)
    # Results several points share, computed once per sweep (e.g. an early-exit model's calibration profile)
    cache: dict[Any, Any] = field(default_factory=dict)

    def run_for(self, seed: int) -> TrainingRun:
        return seed_run(self.cfg, self.run, seed)

    @property
    def grid_steps(self) -> int:
        """Fine-tuning steps of a model that serves every budget at once (early exit): what one
        method spends over the grid (finetune.match=per_method), or one point's steps (per_point)."""
        if self.cfg.finetune.match == "per_point":
            return self.finetune_steps
        gated = self.run.stage_steps("gated") if self.cfg.finetune.steps is None else None
        return gated or self.finetune_steps * len(self.cfg.budgets)  # derived: exactly the gated stage's G

    @property
    def dense_runner(self) -> DenseRunner:
        return DenseRunner(self.dense, self.fm, "dense")

    def fresh_dense(self) -> nn.Module:
        """A new copy of the dense fine-tuned model (train-ready: grads on)."""
        import copy

        model = copy.deepcopy(self.dense)
        for p in model.parameters():
            p.requires_grad_(True)
        return model


def _batches(examples: list[dict[str, Any]], collate: Any, batch_size: int) -> list[Batch]:
    from dynprune.train.data import eval_batches

    return [collate([examples[i] for i in idx]) for idx in eval_batches(examples, batch_size)]


def mean_padded_length(batches: list[Batch]) -> int:
    """Per-sample mean of the padded length (what the FLOPs of these batches are computed at)."""
    total = sum(b["input_ids"].shape[0] * b["input_ids"].shape[1] for b in batches)
    n = sum(b["input_ids"].shape[0] for b in batches)
    return max(1, round(total / n))


@torch.no_grad()
def _logits(model: nn.Module, batches: list[Batch]) -> list[torch.Tensor]:
    from dynprune.train.data import model_inputs

    return [model(**model_inputs(b)).logits.float() for b in batches]


def build_context(cfg: SweepConfig, run: TrainingRun) -> SweepContext:
    import transformers
    from dynprune.train.config import DataConfig
    from dynprune.train.data import Collator, encode, load_task_data
    from dynprune.train.pipeline import load_classifier

    transformers.logging.set_verbosity_error()
    data_cfg = DataConfig(**(run.config.get("data") or {}))
    if cfg.max_train_examples is not None:
        data_cfg.max_train_examples = cfg.max_train_examples
    data_cfg.max_eval_examples = cfg.evaluation.max_examples  # the first N of validation and test
    tokenizer = transformers.AutoTokenizer.from_pretrained(run.dense_dir)
    data = load_task_data(data_cfg)
    examples = encode(data, tokenizer, data_cfg.max_length)
    collate = Collator(tokenizer.pad_token_id, getattr(tokenizer, "padding_side", "right"))
    dense = materialize(load_classifier(run.dense_dir, data.label_names).eval())
    from dynprune.arch import resolve

    parts = resolve(dense)
    fm = static_flops_model(dense)
    eval_ex = examples[cfg.evaluation.split]
    eval_batches = _batches(eval_ex, collate, cfg.evaluation.batch_size)
    timing = TimingInputs.draw(
        eval_ex, collate, cfg.timing.bs1_inputs, cfg.timing.bs16_batches, seed=cfg.seed
    )
    calib_ex = examples["validation"][: cfg.search.calibration_examples]
    calib_batches = _batches(calib_ex, collate, cfg.evaluation.batch_size)
    steps = cfg.finetune.steps
    if steps is None and (gated_steps := run.stage_steps("gated")) is not None:
        steps = (
            gated_steps
            if cfg.finetune.match == "per_point"
            else max(1, round(gated_steps / len(cfg.budgets)))
        )
    if steps is None:
        raise SweepError(
            "finetune.steps is null (= derived from the gated stage's steps), but the training run has no finished gated "
            "stage to read it from; set --finetune.steps"
        )
    return SweepContext(
        cfg=cfg,
        run=run,
        out=Path(cfg.output_dir),
        work=Path(cfg.work_dir),
        tokenizer=tokenizer,
        label_names=data.label_names,
        examples=examples,
        collate=collate,
        dense=dense,
        fm=fm,
        head_dim=parts.head_dim,
        eval_batches=eval_batches,
        timing=timing,
        ref_seq=mean_padded_length(eval_batches),
        calib_batches=calib_batches,
        calib_teacher=_logits(dense, calib_batches),
        finetune_steps=int(steps),
        data=data,
        teacher=CachedTeacher(dense),
        lr=cfg.finetune.lr or float((run.config.get("optim") or {}).get("gated_lr", 5e-5)),
        max_length=data_cfg.max_length,
    )


class CachedTeacher(nn.Module):
    """The dense teacher, computed once per input batch and then served from a cache.

    ``dynprune.train.finetune(..., teacher=...)`` runs the teacher over the training split in a
    fixed (length-sorted) batch order on every call; with this wrapper only the first call pays
    for it, so every baseline shares one teacher pass (the teacher is frozen, in eval mode).
    """

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher
        self._cache: dict[bytes, torch.Tensor] = {}

    @staticmethod
    def _key(inputs: dict[str, torch.Tensor]) -> bytes:
        parts = [inputs[k].cpu().numpy().tobytes() for k in sorted(inputs)]
        return b"|".join([*parts, str(tuple(inputs["input_ids"].shape)).encode()])

    def forward(self, **inputs: torch.Tensor) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        key = self._key(inputs)
        if key not in self._cache:
            with torch.no_grad():
                self._cache[key] = self.teacher(**inputs).logits.detach()
        return SequenceClassifierOutput(logits=self._cache[key])


def finetune(
    ctx: SweepContext,
    model: nn.Module,
    steps: int,
    name: str,
    seed_offset: int = 0,
    seed: int | None = None,
    objective: Any = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` in place for ``steps`` optimiser steps on the training split, through
    ``dynprune.train.finetune`` (the training run's optimiser settings; distillation from the
    shared dense teacher with the training run's distillation weights). ``name`` is for logs;
    ``seed`` (default the sweep's) + ``seed_offset`` seeds the batch order; ``objective``: a
    factory ``distill -> objective`` for a model whose loss is not the dense one (early exit)."""
    from dynprune.train import finetune as train_finetune
    from dynprune.train.config import DistillConfig, OptimConfig

    if steps <= 0:
        model.eval()
        return {"steps": 0, "train_seconds": 0.0}
    f = ctx.cfg.finetune
    o = ctx.run.config.get("optim") or {}
    optim = OptimConfig(
        batch_size=f.batch_size,
        eval_batch_size=ctx.cfg.evaluation.batch_size,
        weight_decay=o.get("weight_decay", 0.01),
        warmup_ratio=o.get("warmup_ratio", 0.06),
        max_grad_norm=o.get("max_grad_norm", 1.0),
        router_lr=o.get("router_lr", OptimConfig.router_lr),  # the added parameters (exit heads)
        group_by_length=o.get("group_by_length", True),
    )
    d = ctx.run.config.get("distill") or {}
    distill = DistillConfig(
        task_weight=d.get("task_weight", 0.3),
        logits_weight=d.get("logits_weight", 0.7),
        temperature=d.get("temperature", 2.0),
    )
    for p in model.parameters():
        p.requires_grad_(True)
    result = train_finetune(
        model,
        ctx.data,
        ctx.tokenizer,
        optim=optim,
        steps=int(steps),
        lr=ctx.lr,
        max_length=ctx.max_length,
        seed=(ctx.cfg.seed if seed is None else seed) + seed_offset,
        teacher=ctx.teacher if f.distill else None,
        distill=distill,
        progress=f.progress,
        objective=objective,
    )
    model.eval()
    return {"steps": int(result["steps"]), "train_seconds": float(result["train_seconds"])}
