"""Latency of a method next to the dense model, in the same process, on real inputs.

Inputs are fixed, seeded draws from the evaluation split: ``n_bs1`` single
reviews (each at its own length: batch 1 has no padding) and ``n_bs16``
batches of 16 random reviews padded to their longest (dynamic padding, as a
server would batch them). One timed call runs the whole set; the time per
forward is that divided by the set size. Dense and method calls alternate
(:func:`dynprune.eval.timing.time_interleaved`), the speedup is the median
of paired per-round ratios, and the *ideal* speedup is dense FLOPs /
executed FLOPs on exactly the same inputs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from dynprune.eval.runners import Batch, Runner
from dynprune.eval.timing import paired_ratio, time_interleaved


@dataclass
class TimingInputs:
    bs1: list[Batch]
    bs16: list[Batch]

    @classmethod
    def draw(
        cls,
        examples: Sequence[dict[str, Any]],
        collate: Callable[[list[dict[str, Any]]], Batch],
        n_bs1: int,
        n_bs16: int,
        seed: int = 0,
    ) -> TimingInputs:
        if not examples:
            raise ValueError("no examples to time on")
        rng = random.Random(seed)
        pick = lambda k: [examples[rng.randrange(len(examples))] for _ in range(k)]  # noqa: E731
        bs1 = [collate([e]) for e in pick(n_bs1)]
        bs16 = [collate(pick(16)) for _ in range(n_bs16)]
        return cls(bs1, bs16)


@dataclass
class Latency:
    batch: int
    dense_ms: float
    method_ms: float
    dense_iqr_ms: float
    method_iqr_ms: float
    speedup: float  # median of paired dense/method ratios
    ideal_speedup: float  # dense FLOPs / executed FLOPs on the same inputs
    rounds: int

    @property
    def ratio_to_ideal(self) -> float:
        return self.speedup / self.ideal_speedup

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "ratio_to_ideal": self.ratio_to_ideal}


def _run_all(runner: Runner, batches: list[Batch]) -> Callable[[], None]:
    def call() -> None:
        for b in batches:
            runner(b)

    return call


@torch.inference_mode()
def _flops(runner: Runner, batches: list[Batch]) -> float:
    total = 0.0
    for b in batches:
        runner(b)
        assert runner.last_flops is not None
        total += float(runner.last_flops.sum())
    return total


def measure(
    dense: Runner, method: Runner, inputs: TimingInputs, warmup: int = 2, repeats: int = 10
) -> dict[str, Latency]:
    """{"bs1": Latency, "bs16": Latency} of ``method`` vs ``dense`` (see module docstring)."""
    out = {}
    for name, batches, size in (("bs1", inputs.bs1, 1), ("bs16", inputs.bs16, 16)):
        if not batches:
            continue
        ideal = _flops(dense, batches) / _flops(method, batches)
        stats = time_interleaved(
            {"dense": _run_all(dense, batches), "method": _run_all(method, batches)},
            warmup=warmup,
            repeats=repeats,
        )
        n = len(batches)
        out[name] = Latency(
            batch=size,
            dense_ms=stats["dense"].median_ms / n,
            method_ms=stats["method"].median_ms / n,
            dense_iqr_ms=stats["dense"].iqr_ms / n,
            method_iqr_ms=stats["method"].iqr_ms / n,
            speedup=paired_ratio(stats["dense"], stats["method"]),
            ideal_speedup=ideal,
            rounds=stats["dense"].n,
        )
    return out
