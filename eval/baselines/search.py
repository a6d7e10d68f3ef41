"""Sub-network search under a FLOPs budget (EagleEye-style, with a small evolutionary refinement).

1. Sample ``n_random`` static sub-networks: per-layer keep ratios for heads and
   for FFN neurons drawn uniformly from ``[min_ratio, 1]``, scaled together to
   spend the budget (:func:`counts_from_ratios`); inside a layer the units with
   the highest L_p norm are kept.
2. Score each quickly (the caller's ``score_fn``: lower is better, e.g. the
   KL divergence to the dense model on a small calibration split).
3. Evolution: for ``generations`` rounds, breed ``children`` new candidates from
   the ``population`` best (uniform per-layer crossover + log-normal mutation of
   the ratios), re-scaled to the budget, scored.
4. The best candidate is returned (the sweep then fine-tunes it).

Every candidate fits the budget at the reference sequence length (tested).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dynprune.eval.baselines.structured import counts_from_ratios, top_units
from dynprune.eval.structure import Structure
from torch import Tensor

from dynprune.flops import FlopsModel


@dataclass
class Candidate:
    head_ratios: tuple[float, ...]
    ffn_ratios: tuple[float, ...]
    structure: Structure
    score: float = math.inf


@dataclass
class SearchResult:
    best: Candidate
    history: list[Candidate] = field(default_factory=list)

    def table(self) -> list[dict]:
        return [
            {"rank": i, "score": c.score, "structure": c.structure.summary()}
            for i, c in enumerate(sorted(self.history, key=lambda c: c.score))
        ]


class SubnetSearch:
    """Samples, scores and evolves static sub-networks of one model under one budget."""

    def __init__(
        self,
        fm: FlopsModel,
        budget: float,
        seq_len: int,
        head_scores: Sequence[Tensor],
        neuron_scores: Sequence[Tensor],
        min_ratio: float = 0.05,
        multiple: int = 1,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"search min_ratio must be in [0, 1], got {min_ratio}")
        self.fm, self.budget, self.seq_len = fm, budget, seq_len
        self.head_scores, self.neuron_scores = list(head_scores), list(neuron_scores)
        self.min_ratio, self.multiple = min_ratio, multiple
        self.rng = random.Random(seed)
        self.n_layers = len(self.head_scores)

    def realize(self, head_ratios: Sequence[float], ffn_ratios: Sequence[float]) -> Candidate:
        h, n = counts_from_ratios(
            self.fm, self.budget, self.seq_len, head_ratios, ffn_ratios, multiple=self.multiple
        )
        structure = Structure.from_indices(
            top_units(self.head_scores, h), top_units(self.neuron_scores, n), [True] * self.n_layers
        )
        return Candidate(tuple(head_ratios), tuple(ffn_ratios), structure)

    def sample(self) -> Candidate:
        u = lambda: self.rng.uniform(self.min_ratio, 1.0)  # noqa: E731
        return self.realize([u() for _ in range(self.n_layers)], [u() for _ in range(self.n_layers)])

    def child(self, a: Candidate, b: Candidate, sigma: float = 0.3, p_mutate: float = 0.3) -> Candidate:
        def mix(x: Sequence[float], y: Sequence[float]) -> list[float]:
            out = []
            for xi, yi in zip(x, y):
                v = xi if self.rng.random() < 0.5 else yi
                if self.rng.random() < p_mutate:
                    v *= math.exp(self.rng.gauss(0.0, sigma))
                out.append(min(1.0, max(self.min_ratio, v)))
            return out

        return self.realize(mix(a.head_ratios, b.head_ratios), mix(a.ffn_ratios, b.ffn_ratios))

    def run(
        self,
        score_fn: Callable[[Structure], float],
        n_random: int,
        population: int = 8,
        generations: int = 2,
        children: int = 16,
        progress: Callable[[int], None] | None = None,
    ) -> SearchResult:
        """Score ``n_random`` samples then ``generations`` × ``children`` bred ones; best = lowest score."""
        seen: dict[str, Candidate] = {}

        def evaluate(c: Candidate) -> Candidate:
            key = c.structure.key()
            if key not in seen:
                c.score = float(score_fn(c.structure))
                seen[key] = c
                if progress is not None:
                    progress(1)
            return seen[key]

        pool = [evaluate(self.sample()) for _ in range(n_random)]
        for _ in range(generations):
            parents = sorted(pool, key=lambda c: c.score)[:population]
            for _ in range(children):
                a, b = self.rng.sample(parents, 2) if len(parents) > 1 else (parents[0], parents[0])
                pool.append(evaluate(self.child(a, b)))
        history = list(seen.values())
        return SearchResult(best=min(history, key=lambda c: c.score), history=history)
