"""What the routes share: the engine, its batcher, the metrics, the limits, the drain flag."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .batcher import Batcher
from .config import ServeConfig
from .engine import ClassifierEngine
from .generator import GeneratorEngine
from .metrics import ServeMetrics
from .tokens import Tokens

if TYPE_CHECKING:
    from dynprune.calibration import GovernedMean


@dataclass(frozen=True)
class TextJob:
    """One text at one budget: texts of different requests share a forward. ``text``: what
    ``ClassifierEngine.prepare`` made of it on arrival (its token ids, or the text itself)."""

    text: str | Tokens
    budget: float


@dataclass(frozen=True)
class GroupJob:
    """A request in mean-budget mode: its texts run in a forward of their own (the mean is
    over the request), ``budget`` is the library's budget object."""

    texts: tuple[str, ...]
    budget: Any


@dataclass(frozen=True)
class GroupError:
    """A GroupJob the model refused (the other jobs of its batch are unaffected)."""

    message: str


class Runtime:
    def __init__(self, engine: ClassifierEngine | GeneratorEngine, cfg: ServeConfig):
        self.engine, self.cfg = engine, cfg
        self.draining = False
        self.governed: dict[str, GovernedMean] = {}  # cfg.govern_mean: by mean-budget spec
        self.metrics = ServeMetrics(queue_depth=lambda: self.batcher.depth())
        self.batcher = Batcher(
            self.run_jobs,
            max_batch=cfg.max_batch,
            max_wait_s=cfg.max_wait_ms / 1e3,
            max_queue=cfg.max_queue,
            on_batch=self.metrics.on_batch,
            on_drop=self.metrics.dropped.inc,
        )

    def run_jobs(self, jobs: list[Any]) -> list[Any]:
        """Worker thread. Classification: all TextJobs in ONE forward (per-text budgets), each
        GroupJob alone. Generation: GeneratorEngine.run (compatible GenJobs batched)."""
        if isinstance(self.engine, GeneratorEngine):
            return self.engine.run(jobs)
        out: list[Any] = [None] * len(jobs)
        texts = [(i, j) for i, j in enumerate(jobs) if isinstance(j, TextJob)]
        if texts:
            results = self.engine.classify([j.text for _, j in texts], [j.budget for _, j in texts])
            for (i, _), r in zip(texts, results):
                out[i] = r
        for i, job in enumerate(jobs):
            if isinstance(job, GroupJob):  # its failure (e.g. no calibration for that mean) is its own
                try:
                    out[i] = self.engine.classify(list(job.texts), job.budget)
                except ValueError as err:
                    out[i] = GroupError(str(err))
        return out
