"""Sweep configuration: typed dataclasses, one per YAML section, validated in __post_init__.

``configs/sweep_*.yaml`` map onto :class:`SweepConfig` one-to-one (unknown keys
are errors); every field can be overridden on the command line with a dotted,
type-checked flag (``--finetune.steps=200``), parsed by draccus like the
training configs. ``--quick`` applies the ``quick`` section on top.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from dynprune.eval.report import METHODS

from dynprune.config import check_budget_value, check_positive


@dataclass
class FinetuneConfig:
    """How every pruned baseline is fine-tuned (through dynprune.train's API, same data for all)."""

    # Optimiser steps per (method, budget) point; null = derived from the training run's gated stage
    # (G steps: one checkpoint for every budget) by `match`
    steps: int | None = None
    # per_method: G / len(budgets) per point, so each method's fine-tuning over the whole grid costs
    # what the dynamic model's training cost; per_point: G per point (budgets x more compute)
    match: Literal["per_method", "per_point"] = "per_method"
    # Learning rate; null = the training run's optim.gated_lr
    lr: float | None = None
    batch_size: int = 32
    # Distil from the dense teacher (computed once, shared), like the gated stage; false = labels only
    distill: bool = True
    # A progress bar per fine-tune (inside the sweep's bar)
    progress: bool = True

    def __post_init__(self) -> None:
        check_positive("finetune", batch_size=self.batch_size)
        if self.lr is not None:
            check_positive("finetune", lr=self.lr)
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"finetune.steps must be > 0 or null, got {self.steps}")


@dataclass
class StructuredConfig:
    """Norm-based structured pruning (ln_structured, iterative, search, random)."""

    # L_p norm of a unit's weights (1 or 2)
    norm: float = 2.0
    # FFN widths are rounded down to a multiple of this (matmul-friendly)
    neuron_multiple: int = 16
    # Iterative: prune -> fine-tune rounds; the budget falls geometrically; steps are split evenly
    iterative_rounds: int = 3

    def __post_init__(self) -> None:
        check_positive("structured", norm=self.norm, neuron_multiple=self.neuron_multiple)
        check_positive("structured", iterative_rounds=self.iterative_rounds)


@dataclass
class SearchConfig:
    """EagleEye-style sub-network search: random candidates, quick score, evolution, fine-tune the best."""

    candidates: int = 48
    generations: int = 2
    population: int = 8
    children: int = 12
    # Per-layer keep ratios are drawn from [min_ratio, 1]
    min_ratio: float = 0.1
    # Calibration examples (from the validation split) used to score a candidate
    calibration_examples: int = 256
    # kl: KL(teacher || candidate) on calibration logits (lower is better); loss: cross-entropy on labels
    score: Literal["kl", "loss"] = "kl"

    def __post_init__(self) -> None:
        check_positive("search", candidates=self.candidates, calibration_examples=self.calibration_examples)
        if self.generations < 0 or self.children < 0 or self.population < 1:
            raise ValueError("search.generations / children must be >= 0 and population >= 1")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"search.min_ratio must be in [0, 1], got {self.min_ratio}")


@dataclass
class EvalSection:
    split: Literal["test", "validation"] = "test"
    # Use only the first N examples of the split (null = all)
    max_examples: int | None = None
    batch_size: int = 64

    def __post_init__(self) -> None:
        check_positive("evaluation", batch_size=self.batch_size)
        if self.max_examples is not None and self.max_examples <= 0:
            raise ValueError(f"evaluation.max_examples must be > 0 or null, got {self.max_examples}")


@dataclass
class TimingConfig:
    """Latency next to the dense model (interleaved medians, see dynprune.eval.latency)."""

    bs1_inputs: int = 8
    bs16_batches: int = 2
    warmup: int = 2
    repeats: int = 12
    threads: int = 2

    def __post_init__(self) -> None:
        check_positive("timing", repeats=self.repeats, threads=self.threads)
        if self.bs1_inputs < 0 or self.bs16_batches < 0 or self.warmup < 0:
            raise ValueError("timing.bs1_inputs / bs16_batches / warmup must be >= 0")


@dataclass
class EarlyExitSection:
    """The early-exit competitor: exit thresholds calibrated on the validation split."""

    # Validation examples the thresholds are fitted on (null = all of the split the sweep loaded)
    calibration_examples: int | None = None
    # The split whose *inputs* (never labels) the thresholds are fitted on: validation (default), or
    # the evaluation split itself ("evaluation": transductive, as a server calibrating on a sample of
    # its own traffic would; it lands the evaluation mean on the target when validation and test
    # inputs differ, e.g. 20 Newsgroups' later-dated test file)
    calibration_split: Literal["validation", "evaluation"] = "validation"
    # Correct the threshold online while evaluating (dynprune.governor.MeanGovernor, no labels): after
    # each batch it moves so the running mean FLOPs lands on the budget even when the evaluation
    # inputs spend more than the calibration inputs did; batches then run in a seeded random order
    governor: bool = False
    # static_early_exit: the static width is this factor x the target budget (capped at the static
    # control's largest trained budget); the exits bring the mean down to the target
    width_factor: float = 2.0

    def __post_init__(self) -> None:
        if not self.width_factor >= 1.0:
            raise ValueError(
                f"early_exit.width_factor must be >= 1 (a width at least the budget), got {self.width_factor}"
            )
        if self.calibration_examples is not None and self.calibration_examples <= 0:
            raise ValueError(
                f"early_exit.calibration_examples must be > 0 or null, got {self.calibration_examples}"
            )


@dataclass
class CascadeSection:
    """static_cascade: the static control at a mean budget, run low and the least confident re-run high."""

    # Validation examples the (low, high, confidence) triple is fitted on (labels used: the pair with
    # the best validation accuracy at mean FLOPs <= the budget); null = all of the split the sweep loaded
    calibration_examples: int | None = None
    # Correct the confidence threshold online while evaluating (dynprune.govern, no labels), batches in
    # a seeded random order, as early_exit.governor does for exit thresholds
    governor: bool = True

    def __post_init__(self) -> None:
        if self.calibration_examples is not None and self.calibration_examples <= 0:
            raise ValueError(
                f"cascade.calibration_examples must be > 0 or null, got {self.calibration_examples}"
            )


@dataclass
class StatsConfig:
    """How the summary compares methods: paired bootstrap over test examples, seed counts."""

    resamples: int = 10000
    confidence: float = 0.95
    # A comparison gets a MET/MISSED verdict only when both sides have at least this many seeds
    # (the dense model and the classic methods count as one deterministic run each: see docs)
    min_seeds: int = 3

    def __post_init__(self) -> None:
        check_positive("stats", resamples=self.resamples, min_seeds=self.min_seeds)
        if not 0.5 < self.confidence < 1.0:
            raise ValueError(f"stats.confidence must be in (0.5, 1), got {self.confidence}")


@dataclass
class QuickConfig:
    """What ``--quick`` changes (a smaller grid that finishes in minutes)."""

    budgets: list[float] = field(default_factory=lambda: [0.25, 0.5])
    # null = the same methods as the full sweep
    methods: list[str] | None = None
    training_dir: str | None = None
    output_dir: str | None = None
    work_dir: str | None = None
    # null = derived like the full sweep (finetune.match): the same fine-tuning budget as the dynamic model
    finetune_steps: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    max_train_examples: int | None = None
    eval_max_examples: int | None = 400
    search_candidates: int = 8
    search_generations: int = 1
    search_children: int = 4
    calibration_examples: int = 128
    timing_repeats: int = 5


@dataclass
class SweepConfig:
    """`dynprune sweep`: every method over a list of budgets, on the same split, side by side."""

    # A `dynprune train` output directory: dense/ (teacher + dense reference), gated/, static/
    training_dir: str = "runs/minilm_rt"
    # sweep.csv, pareto.png, summary.md and points/ (one JSON per finished point)
    output_dir: str = "results/minilm_rt"
    # Fine-tuned baselines, exported models, cached teacher logits (not committed)
    work_dir: str = "runs/sweep_minilm_rt"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    budgets: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    # The classic methods' seed (fine-tuning order, random units, search) and the timing inputs' draw
    seed: int = 0
    # Seeds of the contenders (dynamic, static_gates, early_exit, static_early_exit, static_gates_ft);
    # null = [seed]. For dynamic and static_gates a seed is a training run: training_dir for its own seed, seed_training_dir otherwise
    seeds: list[int] | None = None
    # The training run of a contender seed other than training_dir's own ({training_dir}, {seed} filled in)
    seed_training_dir: str = "{training_dir}_seed{seed}"
    # How the dynamic method reads a budget: cap = per-input ceiling (every input <= budget);
    # mean = a mean over inputs (dynprune.parse_budget("mean:B"), per-input FLOPs may vary)
    budget_mode: Literal["cap", "mean"] = "cap"
    # Limit the training examples the baselines fine-tune on (null = all); the split is the training run's
    max_train_examples: int | None = None
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    structured: StructuredConfig = field(default_factory=StructuredConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    evaluation: EvalSection = field(default_factory=EvalSection)
    timing: TimingConfig = field(default_factory=TimingConfig)
    early_exit: EarlyExitSection = field(default_factory=EarlyExitSection)
    cascade: CascadeSection = field(default_factory=CascadeSection)
    stats: StatsConfig = field(default_factory=StatsConfig)
    quick: QuickConfig = field(default_factory=QuickConfig)
    # When set (--quick sets it), comparisons are printed under this label, without MET/MISSED verdicts
    indicative: str | None = None
    # Extra lines for the summary's notes (e.g. follow-up checks); never changes a point
    summary_notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be a non-empty list of distinct names from {list(METHODS)}")
        check_budgets(self.budgets, "budgets")
        check_budgets(self.quick.budgets, "quick.budgets")
        if self.max_train_examples is not None and self.max_train_examples <= 0:
            raise ValueError(f"max_train_examples must be > 0 or null, got {self.max_train_examples}")
        for what, seeds in (("seeds", self.seeds), ("quick.seeds", self.quick.seeds)):
            if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
                raise ValueError(f"{what} must be a non-empty list of distinct seeds, got {seeds}")
        if "{seed}" not in self.seed_training_dir:
            raise ValueError(f"seed_training_dir must contain '{{seed}}', got {self.seed_training_dir!r}")

    @property
    def contender_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else [self.seed]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def apply_quick(self, keep: Iterable[str] = ()) -> SweepConfig:
        """A copy with the ``quick`` section applied; the dotted keys in ``keep`` (given on the
        command line, e.g. ``methods`` or ``finetune.steps``) keep their values: what a user asks
        for explicitly wins over the quick section."""
        q = self.quick
        mine = self.to_dict()
        d = self.to_dict()
        d["budgets"] = list(q.budgets)
        if q.methods is not None:
            d["methods"] = list(q.methods)
        for key in ("training_dir", "output_dir", "work_dir"):
            if getattr(q, key):
                d[key] = getattr(q, key)
        d["finetune"]["steps"] = q.finetune_steps
        d["seeds"] = list(q.seeds)
        d["seed"] = q.seeds[0]
        d["max_train_examples"] = q.max_train_examples
        d["evaluation"]["max_examples"] = q.eval_max_examples
        d["search"].update(
            candidates=q.search_candidates,
            generations=q.search_generations,
            children=q.search_children,
            calibration_examples=q.calibration_examples,
        )
        d["timing"]["repeats"] = q.timing_repeats
        for key in keep:
            *sections, name = key.split(".")
            src, dst = mine, d
            for section in sections:
                src, dst = src[section], dst[section]
            dst[name] = src[name]
        if "seeds" in keep and "seed" not in keep:
            d["seed"] = d["seeds"][0]
        n_seeds = len(d["seeds"])
        if n_seeds < self.stats.min_seeds:  # one or two seeds: numbers only, no verdict
            d["indicative"] = quick_label(n_seeds)
        else:  # enough seeds for the intervals: verdicts, about this reduced recipe
            note = f"quick grid ({n_seeds} seeds, reduced steps): verdicts are about this reduced recipe"
            d["summary_notes"] = [*d["summary_notes"], note]
        return from_dict(d)


def quick_label(n_seeds: int) -> str:
    seeds = "one seed" if n_seeds == 1 else f"{n_seeds} seeds"
    return f"quick grid: indicative only ({seeds}, reduced steps)"


def check_budgets(budgets: list[float], what: str) -> None:
    if not budgets:
        raise ValueError(f"{what}: the budget list is empty; give fractions of dense FLOPs in (0, 1)")
    for b in budgets:
        check_budget_value(b, f"{what} entry")
        if b >= 1.0:
            raise ValueError(f"{what}: {b} is the dense model (1.0); the dense row is always included")
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"{what}: duplicated budgets in {budgets}")


def from_dict(d: dict[str, Any]) -> SweepConfig:
    sections = {
        "finetune": FinetuneConfig,
        "structured": StructuredConfig,
        "search": SearchConfig,
        "evaluation": EvalSection,
        "timing": TimingConfig,
        "early_exit": EarlyExitSection,
        "cascade": CascadeSection,
        "stats": StatsConfig,
        "quick": QuickConfig,
    }
    kw = {k: (sections[k](**v) if k in sections else v) for k, v in d.items()}
    return SweepConfig(**kw)


# Sections whose change invalidates finished points (a re-run with other values starts over).
POINT_KEYS = (
    "training_dir", "seed", "seed_training_dir", "budget_mode", "max_train_examples", "finetune",
    "structured", "search", "evaluation", "early_exit", "cascade",
)  # fmt: skip


def fingerprint(cfg: SweepConfig) -> dict[str, Any]:
    """The settings that define a point (POINT_KEYS), as JSON values (what sweep_meta.json holds)."""
    d = json.loads(json.dumps(cfg.to_dict()))
    return {k: d[k] for k in POINT_KEYS}


def changed_settings(saved: dict[str, Any], cfg: SweepConfig) -> list[str]:
    """The POINT_KEYS sections in which ``cfg`` differs from the ``saved`` fingerprint of finished points.
    A setting added to the config since (absent from ``saved``) counts as unchanged at its default:
    points computed before it existed were computed as that default computes them."""
    now, default = fingerprint(cfg), fingerprint(SweepConfig())
    return sorted(
        k
        for k in set(saved) | set(now)
        if (_changed(saved[k], now.get(k), default.get(k)) if k in saved else now[k] != default.get(k))
    )


def _changed(saved: Any, now: Any, default: Any) -> bool:
    if isinstance(saved, dict) and isinstance(now, dict):
        default = default if isinstance(default, dict) else {}
        return any(
            _changed(saved[k], now.get(k), default.get(k))
            if k in saved
            else now[k] != default.get(k, object())
            for k in set(saved) | set(now)
        )
    return saved != now
