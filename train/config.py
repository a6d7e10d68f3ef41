"""Training configuration: typed dataclasses, one per YAML section, validated in __post_init__.

A YAML file in configs/ maps onto :class:`TrainConfig` one-to-one (unknown keys
are errors), and every field can be overridden on the command line with a
dotted, type-checked flag: ``--gate.temperature=0.5``. Parsing, YAML and the
overrides are done by draccus (see docs/training.md for why draccus).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from dynprune.train.lm_config import LMSection

from dynprune.config import GateConfig, check_budget_value, check_positive

STAGES = ("dense", "gated", "static")


def _fraction(section: str, name: str, value: float, *, low_open: bool = False) -> None:
    ok = math.isfinite(value) and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{section}.{name} must be in {interval}, got {value!r}")


@dataclass
class ModelConfig:
    # Local Hugging Face model directory (config.json + weights + tokenizer); null = packaged MiniLM
    path: str | None = None
    # An already fine-tuned dense model directory to use as teacher and student start (skips the dense stage)
    teacher_path: str | None = None

    def __post_init__(self) -> None:
        for name in ("path", "teacher_path"):
            value = getattr(self, name)
            if value is not None and not (Path(value) / "config.json").is_file():
                raise ValueError(
                    f"model.{name}={value!r} is not a Hugging Face model directory (no config.json there)"
                )


@dataclass
class DataConfig:
    # Packaged dataset, used when `path` is null: rotten_tomatoes (the one 80/10/10 split) or news20
    # (20 Newsgroups, 20 classes: validation from the train file, test = the official test file)
    dataset: Literal["rotten_tomatoes", "news20"] = "rotten_tomatoes"
    # CSV / TSV / JSON-lines / parquet file with a text and a label column; null = the packaged `dataset`
    path: str | None = None
    # Optional separate validation / test files (same columns); otherwise `path` is split (stratified, seeded)
    validation_path: str | None = None
    test_path: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    # Longer texts are truncated to this many tokens
    max_length: int = 64
    # Seed of the stratified train/validation/test split (the packaged Rotten Tomatoes split uses seed 0)
    split_seed: int = 0
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    # Use only the first N training / evaluation examples (quick runs); null = all
    max_train_examples: int | None = None
    max_eval_examples: int | None = None

    def __post_init__(self) -> None:
        check_positive("data", max_length=self.max_length)
        if not self.text_column or not self.label_column:
            raise ValueError("data.text_column and data.label_column must be non-empty column names")
        if self.text_column == self.label_column:
            raise ValueError(f"data.text_column and data.label_column are both {self.text_column!r}")
        for name in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"data.{name} must be a positive number of examples or null, got {value}")
        _fraction("data", "validation_fraction", self.validation_fraction)
        _fraction("data", "test_fraction", self.test_fraction)
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(
                "data.validation_fraction + data.test_fraction must leave some training data (< 1)"
            )
        if self.path is not None and self.dataset != "rotten_tomatoes":
            raise ValueError(
                f"data.dataset={self.dataset!r} names a packaged dataset; it cannot be combined with data.path"
            )
        if self.path is None and (self.validation_path or self.test_path):
            raise ValueError("data.validation_path / data.test_path need data.path (the training file)")
        for name in ("path", "validation_path", "test_path"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ValueError(f"data.{name}: file {value!r} does not exist")


@dataclass
class GateSection(GateConfig):
    """The core dynprune.GateConfig (every field of it, same names and meaning) plus its
    training schedule. Differences from the core: ``router`` is dynamic or static, and
    ``unit_order`` adds taylor (data-driven importance, computed before gated training)."""

    # dynamic: input-adaptive router; static: budget-only router (the CoFi-like control)
    router: Literal["dynamic", "static"] = "dynamic"
    # Importance order of heads/neurons before gated training: taylor (data, |activation x gradient|),
    # weight_norm (data-free) or none
    unit_order: Literal["taylor", "weight_norm", "none"] = "taylor"  # type: ignore[assignment]
    importance_batches: int = 32
    # Gumbel (binary-concrete) temperature: annealed exponentially from `temperature` to `temperature_end`
    temperature: float = 1.0
    temperature_end: float = 0.1
    # Fraction of gated-stage steps after which gates are hard (straight-through); 1.0 = never
    hard_from: float = 0.7
    # Budgets (fractions of dense FLOPs) sampled per example in [budget_min, budget_max]:
    # uniform, or log_uniform (more examples at the hard, low budgets)
    budget_min: float = 0.2
    budget_max: float = 0.8
    budget_sampling: Literal["uniform", "log_uniform"] = "log_uniform"

    def __post_init__(self) -> None:
        check_positive("gate", temperature=self.temperature, temperature_end=self.temperature_end)
        check_positive("gate", importance_batches=self.importance_batches)
        _fraction("gate", "hard_from", self.hard_from)
        check_budget_value(self.budget_min, "gate.budget_min")
        check_budget_value(self.budget_max, "gate.budget_max")
        if self.budget_min > self.budget_max:
            raise ValueError(
                f"gate.budget_min ({self.budget_min}) must be <= gate.budget_max ({self.budget_max})"
            )
        if self.budget_min >= 1.0:
            raise ValueError(
                "gate.budget_min must be < 1 (budget 1.0 runs the dense model: nothing to train)"
            )
        if not self.budget_conditioned:
            raise ValueError(
                "gate.budget_conditioned must be true: training draws a budget per example and the "
                "router has to read it"
            )
        if self.execution != "auto":
            raise ValueError(
                f"gate.execution={self.execution!r}: training runs the masked path; choose how "
                "evaluation runs with evaluation.execution"
            )
        self.gate_config()  # the core validates the rest (slice size, router width, ...)

    def gate_config(self, router: str | None = None) -> GateConfig:
        """The core GateConfig these settings describe (``router`` overrides the kind)."""
        core = {f.name: getattr(self, f.name) for f in fields(GateConfig)}
        core["unit_order"] = "none" if self.unit_order == "none" else "weight_norm"  # taylor: orders given
        core["router"] = router or self.router
        return GateConfig(**core)


@dataclass
class OptimConfig:
    # Examples per micro-batch per process; the optimiser step sees batch_size x grad_accum x processes
    batch_size: int = 32
    grad_accum: int = 1
    eval_batch_size: int = 64
    dense_epochs: float = 3.0
    dense_lr: float = 5e-5
    gated_epochs: float = 5.0
    gated_lr: float = 3e-5
    # Routers have their own learning rate (they start from scratch)
    router_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    # Stop a stage after this many optimiser steps (null = run the epochs)
    max_steps: int | None = None
    # no / bf16 / fp16 (fp16 needs a GPU). False: YAML's reading of a bare `no`, taken as "no"
    mixed_precision: Literal["no", "bf16", "fp16", False] = "no"
    # Batches of similar lengths (less padding, less compute); order still seeded and shuffled
    group_by_length: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision is False:  # `--optim.mixed_precision=no`, `mixed_precision: no`
            self.mixed_precision = "no"
        check_positive(
            "optim",
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            eval_batch_size=self.eval_batch_size,
            dense_epochs=self.dense_epochs,
            dense_lr=self.dense_lr,
            gated_epochs=self.gated_epochs,
            gated_lr=self.gated_lr,
            router_lr=self.router_lr,
            max_grad_norm=self.max_grad_norm,
        )
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _fraction("optim", "warmup_ratio", self.warmup_ratio)
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"optim.max_steps must be > 0 or null, got {self.max_steps}")


@dataclass
class RegularizerConfig:
    """CoFi-style Lagrangian on the expected FLOPs ratio: l1*(E[r]-t) + l2*(E[r]-t)^2, per example."""

    # Learning rate of the multipliers (gradient ascent)
    lambda_lr: float = 0.01
    # Starting values: l2 > 0 acts from the first step (proportional control), which keeps the
    # expected FLOPs from overshooting the target while l1 integrates the remaining error
    lambda1_init: float = 0.0
    lambda2_init: float = 10.0
    # Fraction of gated steps over which each example's target falls linearly from 1.0 to its budget
    target_warmup: float = 0.2

    def __post_init__(self) -> None:
        check_positive("regularizer", lambda_lr=self.lambda_lr)
        if self.lambda2_init < 0:
            raise ValueError(f"regularizer.lambda2_init must be >= 0, got {self.lambda2_init}")
        _fraction("regularizer", "target_warmup", self.target_warmup)


@dataclass
class DistillConfig:
    """Gated loss = task_weight * CE + logits_weight * T^2 KL(teacher || student) + hidden_weight * MSE."""

    task_weight: float = 0.3
    logits_weight: float = 0.7
    temperature: float = 2.0
    # Hidden-state distillation (layer outputs, padding excluded); > 0 runs the teacher online
    hidden_weight: float = 0.0

    def __post_init__(self) -> None:
        check_positive("distill", temperature=self.temperature)
        for name in ("task_weight", "logits_weight", "hidden_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"distill.{name} must be >= 0, got {getattr(self, name)}")
        if self.task_weight + self.logits_weight + self.hidden_weight <= 0:
            raise ValueError(
                "distill: at least one of task_weight / logits_weight / hidden_weight must be > 0"
            )


@dataclass
class LoggingConfig:
    # wandb (offline unless wandb_mode=online and an API key is configured) or none
    report_to: Literal["wandb", "none"] = "wandb"
    wandb_mode: Literal["offline", "online"] = "offline"
    project: str = "dynprune"
    run_name: str | None = None
    log_every: int = 20
    # Validation every N optimiser steps (null = at the end of every epoch)
    eval_every: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_positive("logging", log_every=self.log_every)
        if self.eval_every is not None and self.eval_every <= 0:
            raise ValueError(f"logging.eval_every must be > 0 or null, got {self.eval_every}")


@dataclass
class CheckpointConfig:
    # Write a resumable checkpoint every N optimiser steps (and at the end of each stage)
    every_steps: int = 200
    keep_last: int = 2

    def __post_init__(self) -> None:
        check_positive("checkpoint", every_steps=self.every_steps, keep_last=self.keep_last)


@dataclass
class EvalConfig:
    # Budgets of the final report (test split): executed FLOPs vs target, accuracy, adaptivity
    budgets: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    split: Literal["validation", "test"] = "test"
    # Also copy the final report (CSV, markdown, plots) to this directory
    results_dir: str | None = None
    # How gated models run in evaluation: auto (gathered = only kept units, as served) or masked
    execution: Literal["auto", "masked", "gathered"] = "auto"

    def __post_init__(self) -> None:
        if not self.budgets:
            raise ValueError("evaluation.budgets must list at least one budget")
        for b in self.budgets:
            check_budget_value(b, "evaluation.budgets entry")


@dataclass
class TrainConfig:
    """`dynprune train`: dense fine-tune (teacher) -> gated fine-tune -> static control -> report."""

    output_dir: str = "runs/minilm_rt"
    # classification: sequence classification (dense, gated, static stages); causal_lm: a causal
    # LM (section `lm`): stages [gated] distil its routers from the frozen base itself, [dense,
    # gated] fine-tune the base on the text first and distil from that (docs/training_lm.md)
    task: Literal["classification", "causal_lm"] = "classification"
    # Stages to run, in order: dense (teacher + reference), gated (dynamic router), static (control)
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    seed: int = 0
    # Deterministic CPU kernels where torch offers them (same seed + same threads = same numbers)
    deterministic: bool = True
    # Continue the run in output_dir from its latest complete checkpoint
    resume: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    gate: GateSection = field(default_factory=GateSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    lm: LMSection = field(default_factory=LMSection)

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("output_dir must be a directory path")
        if self.task == "causal_lm":
            self._check_causal_lm()
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages or len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages must be distinct names from {list(STAGES)}, got {self.stages}")
        if [s for s in STAGES if s in self.stages] != list(self.stages):
            raise ValueError(f"stages must keep the order {list(STAGES)}, got {self.stages}")
        if self.task == "classification" and "dense" not in self.stages and self.model.teacher_path is None:
            raise ValueError("without the dense stage, model.teacher_path must name a fine-tuned dense model")
        if self.optim.mixed_precision == "fp16" and not _cuda_available():
            raise ValueError("optim.mixed_precision=fp16 needs a CUDA GPU; use no or bf16 on CPU")
        low = min(self.evaluation.budgets)
        if low < self.gate.budget_min - 1e-9 or max(self.evaluation.budgets) > self.gate.budget_max + 1e-9:
            raise ValueError(
                f"evaluation.budgets {self.evaluation.budgets} must lie inside the trained range "
                f"[gate.budget_min, gate.budget_max] = [{self.gate.budget_min}, {self.gate.budget_max}]"
            )

    def _check_causal_lm(self) -> None:
        allowed = (["gated"], ["dense", "gated"], ["dense"])
        if self.stages not in allowed:
            raise ValueError(
                "task causal_lm runs stages [gated] (routers distilled from the base itself), "
                "[dense, gated] (the base fine-tuned on the text first, then its routers, distilled from "
                f"that fine-tuned dense model) or [dense]; got {self.stages}"
            )
        if self.model.teacher_path is not None:
            raise ValueError(
                "task causal_lm: model.teacher_path must be null (the teacher is the base itself, or "
                "the dense stage's fine-tuned model with stages [dense, gated])"
            )
        if self.gate.unit_order == "taylor":
            raise ValueError(
                "task causal_lm: gate.unit_order taylor is for classification; use weight_norm or none"
            )
        if self.gate.router != "dynamic":
            raise ValueError("task causal_lm trains the dynamic router only (gate.router: dynamic)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
