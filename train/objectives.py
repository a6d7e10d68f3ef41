"""What one training step minimises: dense fine-tuning, or gated fine-tuning to a FLOPs target.

An objective computes the loss of one micro-batch (and what to log), sets its
schedules before each optimiser step, updates its own state after it (the
Lagrange multipliers), and has a state_dict that goes into every checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from dynprune.train.config import DistillConfig, GateSection, RegularizerConfig
from dynprune.train.data import model_inputs
from dynprune.train.losses import Lagrangian, hidden_distillation, logits_distillation

from dynprune.budget import ThresholdRoute
from dynprune.model import GatedModel
from dynprune.state import Relaxation

Tensor = torch.Tensor


class DenseObjective:
    """Cross-entropy on the labels; plus logits distillation when batches carry teacher logits."""

    name = "dense"

    def __init__(self, distill: DistillConfig | None = None) -> None:
        self.distill = distill

    def begin_step(self, step: int, total: int) -> dict[str, float]:
        return {}

    def loss(self, model: torch.nn.Module, batch: dict[str, Tensor], step: int, micro: int):
        out = model(**model_inputs(batch))
        task = F.cross_entropy(out.logits.float(), batch["labels"])
        logs = {"loss_task": task.detach(), "train_acc": _accuracy(out.logits, batch["labels"])}
        if self.distill is None or "teacher_logits" not in batch:
            return task, logs
        kd = logits_distillation(out.logits, batch["teacher_logits"], self.distill.temperature)
        logs["loss_kd"] = kd.detach()
        return self.distill.task_weight * task + self.distill.logits_weight * kd, logs

    def after_step(self, reduce: Callable[[Tensor], Tensor]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class GatedObjective:
    """Task loss + distillation + Lagrangian on the expected FLOPs ratio, across budgets.

    Per example a budget is drawn from [budget_min, budget_max] (uniform or log-uniform)
    (seeded by seed, step, micro-batch and process: reproducible after a
    resume). Its target ratio falls linearly from 1.0 to the budget over the
    first ``target_warmup`` of the steps. The Gumbel temperature falls
    exponentially from ``temperature`` to ``temperature_end`` over the soft
    phase; from ``hard_from`` on, gates are hard (straight-through), chosen by
    the same greedy selection under the budget that inference uses.

    ``gate.budget_mode=mean``: one budget per micro-batch is the target of the
    batch-MEAN expected FLOPs ratio (one Lagrangian gap per micro-batch); the
    router reads it, and hard gates keep the units whose noisy logit > 0
    (:class:`~dynprune.budget.ThresholdRoute`), so inputs may spend different amounts.
    """

    name = "gated"

    def __init__(
        self,
        core: GatedModel,
        gate: GateSection,
        regularizer: RegularizerConfig,
        distill: DistillConfig,
        seed: int,
        rank: int = 0,
        teacher: torch.nn.Module | None = None,
    ) -> None:
        self.core, self.gate, self.reg, self.distill = core, gate, regularizer, distill
        self.seed, self.rank = seed, rank
        self.teacher = teacher
        if distill.hidden_weight > 0 and teacher is None:
            raise ValueError("distill.hidden_weight > 0 needs the teacher model online")
        self.lagrangian = Lagrangian(
            regularizer.lambda_lr, regularizer.lambda1_init, regularizer.lambda2_init
        )
        self.ramp = 1.0

    # -- schedules ---------------------------------------------------------------------
    def schedule(self, step: int, total: int) -> tuple[float, bool, float]:
        """(temperature, hard, target ramp in [0, 1]) at optimiser step ``step`` of ``total``."""
        g = self.gate
        progress = step / max(total, 1)
        hard = progress >= g.hard_from
        soft_span = max(g.hard_from, 1e-12)
        frac = min(progress / soft_span, 1.0)
        temperature = g.temperature * math.exp(frac * math.log(g.temperature_end / g.temperature))
        warm = self.reg.target_warmup
        ramp = 1.0 if warm <= 0 else min(progress / warm, 1.0)
        return temperature, hard, ramp

    def begin_step(self, step: int, total: int) -> dict[str, float]:
        temperature, hard, self.ramp = self.schedule(step, total)
        self.core.relaxation = Relaxation(temperature, hard)
        return {"temperature": temperature, "hard": float(hard), "target_ramp": self.ramp}

    def sample_budgets(self, n: int, step: int, micro: int) -> Tensor:
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + step) * 1_009 + micro) * 101 + self.rank)
        u = torch.rand(n, generator=g, dtype=torch.float64)
        lo, hi = self.gate.budget_min, self.gate.budget_max
        if self.gate.budget_sampling == "log_uniform":
            return lo * (hi / lo) ** u
        return lo + (hi - lo) * u

    # -- loss --------------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, batch: dict[str, Tensor], step: int, micro: int):
        inputs = model_inputs(batch)
        labels = batch["labels"]
        mean_mode = self.gate.budget_mode == "mean"
        if mean_mode:  # one target per micro-batch, spent as a mean over its examples
            target = float(self.sample_budgets(1, step, micro)[0])
            budgets = torch.full((labels.shape[0],), target, dtype=torch.float64, device=labels.device)
            budget_arg: Any = ThresholdRoute(target, threshold=0.0)
        else:
            budgets = self.sample_budgets(labels.shape[0], step, micro).to(labels.device)
            budget_arg = budgets
        want_hidden = self.distill.hidden_weight > 0
        out = model(**inputs, budget=budget_arg, output_hidden_states=want_hidden)
        info = self.core.last  # read now: nothing below may run the gated model again first
        d = self.distill
        task = F.cross_entropy(out.logits.float(), labels)
        loss = d.task_weight * task
        logs: dict[str, Any] = {"loss_task": task.detach(), "train_acc": _accuracy(out.logits, labels)}
        teacher_logits = batch.get("teacher_logits")
        teacher_out = None
        if self.teacher is not None and (want_hidden or teacher_logits is None):
            with torch.no_grad():
                teacher_out = self.teacher(**inputs, output_hidden_states=want_hidden)
            teacher_logits = teacher_out.logits
        if d.logits_weight > 0:
            if teacher_logits is None:
                raise ValueError("logits distillation needs teacher logits in the batch or a teacher model")
            kd = logits_distillation(out.logits, teacher_logits, d.temperature)
            loss = loss + d.logits_weight * kd
            logs["loss_kd"] = kd.detach()
        if want_hidden:
            assert teacher_out is not None
            hid = hidden_distillation(
                out.hidden_states[1:], teacher_out.hidden_states[1:], inputs.get("attention_mask")
            )
            loss = loss + d.hidden_weight * hid
            logs["loss_hidden"] = hid.detach()
        loss = loss + self.flops_penalty(budgets, logs, info=info, mean_mode=mean_mode)
        return loss, logs

    def flops_penalty(
        self, budgets: Tensor, logs: dict[str, Any], info: Any = None, mean_mode: bool = False
    ) -> Tensor | float:
        """The Lagrangian on a forward's expected FLOPs ratio (``info``, default the last one) vs
        each example's (ramped) target — vs the batch mean's in ``mean_mode``; adds the FLOPs and
        keep-rate logs. 0 when nothing was routed (all budgets 1)."""
        info = self.core.last if info is None else info
        logs["lambda1"], logs["lambda2"] = self.lagrangian.l1, self.lagrangian.l2
        if info is None or info.expected_flops is None:
            return 0.0
        rows = info.routed_rows
        b = budgets if rows is None else budgets.index_select(0, rows)
        expected = info.expected_flops.double() / info.dense_flops  # (B_routed,)
        target = 1.0 - (1.0 - b) * self.ramp
        if mean_mode:  # (1,): the batch mean is what must meet the target
            expected, target = expected.mean(0, keepdim=True), target[:1]
        gap = expected - target
        reg = self.lagrangian.penalty(gap)
        logs.update(
            loss_reg=reg.detach(),
            expected_ratio=expected.mean().detach(),
            target_ratio=target.mean(),
            gap=gap.mean().detach(),
            abs_gap=gap.abs().mean().detach(),
        )
        logs["flops_ratio"] = info.flops_ratio.mean()
        if info.gates is not None:
            logs.update(
                keep_head=info.gates.head.detach().mean(),
                keep_ffn=info.gates.ffn.detach().mean(),
                keep_layer=info.gates.layer.detach().mean(),
            )
        return reg

    def after_step(self, reduce: Callable[[Tensor], Tensor]) -> None:
        self.lagrangian.step(reduce)

    def state_dict(self) -> dict[str, Any]:
        return {"lagrangian": self.lagrangian.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lagrangian.load_state_dict(state["lagrangian"])


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.detach().argmax(-1) == labels).float().mean()
