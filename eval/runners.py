"""One interface for every evaluated model: logits and executed FLOPs per sample.

A runner wraps what a method serves — the dense model, a gated model at one
budget, a physically pruned smaller model, a magnitude-pruned (still dense)
model — so that accuracy, FLOPs and latency are measured by the same code on
the same batches. FLOPs always come from the one FLOPs module: the gated
model's own accounting (``gated.last.flops``) or :class:`FlopsModel` formulas
(``Structure.flops``) at the batch's padded length.
"""

from __future__ import annotations

from typing import Any

import torch
from dynprune.eval.structure import Structure
from dynprune.train.data import model_inputs
from torch import nn

from dynprune.calibration import GovernedMean
from dynprune.flops import FlopsModel
from dynprune.gates import UnitMasks
from dynprune.model import GatedModel

Tensor = torch.Tensor
Batch = dict[str, Tensor]


def _logits(out: Any) -> Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


class Runner:
    """Base: ``runner(batch) -> logits``; ``runner.last_flops`` (B,) float64 after each call."""

    name: str = "runner"
    model: nn.Module

    def __init__(self) -> None:
        self.last_flops: Tensor | None = None
        self.governor: Any = None  # a runner that adapts between batches: its MeanGovernor
        self.evaluating = True  # the accuracy pass; False once timing calls may follow

    def __call__(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def end_evaluation(self) -> None:
        """Called after the accuracy pass, before timing: a runner that adapts between batches stops
        (its governor keeps its last knob) and per-call logs stop growing."""
        self.evaluating = False
        if self.governor is not None:
            self.governor.freeze()


class DenseRunner(Runner):
    """An unpruned HF model (also a magnitude-pruned one: its zeros still execute)."""

    def __init__(self, model: nn.Module, fm: FlopsModel, name: str = "dense") -> None:
        super().__init__()
        self.model, self.fm, self.name = model, fm, name

    def __call__(self, batch: Batch) -> Tensor:
        ids = batch["input_ids"]
        logits = _logits(self.model(**model_inputs(batch)))
        self.last_flops = torch.full((ids.shape[0],), self.fm.dense(ids.shape[1]), dtype=torch.float64)
        return logits


class StructureRunner(Runner):
    """A physically pruned model of ``structure``; FLOPs from the original model's formulas."""

    def __init__(self, model: nn.Module, structure: Structure, fm: FlopsModel, name: str) -> None:
        super().__init__()
        self.model, self.structure, self.fm, self.name = model, structure, fm, name

    def __call__(self, batch: Batch) -> Tensor:
        ids = batch["input_ids"]
        logits = _logits(self.model(**model_inputs(batch)))
        flops = self.structure.flops(self.fm, ids.shape[1])
        self.last_flops = torch.full((ids.shape[0],), flops, dtype=torch.float64)
        return logits


class GatedRunner(Runner):
    """A GatedModel at one budget: router-chosen masks, per sample.

    Runs the PyTorch gathered path (``backend="torch"``), like every other runner here runs
    PyTorch eager: the sweep compares methods on one engine. Engines (ONNX Runtime dense, the
    gated model's default ORT engine on CPU) are compared by ``dynprune bench cpu``."""

    def __init__(self, gated: GatedModel, budget: Any, name: str = "dynamic") -> None:
        super().__init__()
        self.model, self.budget, self.name = gated, budget, name
        self.governor = budget.governor if isinstance(budget, GovernedMean) else None
        self.last_masks: UnitMasks | None = None

    def __call__(self, batch: Batch) -> Tensor:
        gated = self.model
        with gated.running(backend="torch"):
            logits = _logits(gated(**model_inputs(batch), budget=self.budget))
        info = gated.last
        assert info is not None
        self.last_flops = info.flops.detach().double().cpu()
        self.last_masks = info.masks
        return logits
