"""Loss parts of gated training: distillation and the Lagrangian FLOPs regulariser."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def logits_distillation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over the batch."""
    t = temperature
    log_p_student = F.log_softmax(student.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * (t * t)


def hidden_distillation(
    student: Sequence[Tensor], teacher: Sequence[Tensor], attention_mask: Tensor | None
) -> Tensor:
    """Mean squared error between matching hidden states (B, T, H), padding excluded, averaged over layers."""
    if len(student) != len(teacher):
        raise ValueError(
            f"hidden distillation needs as many student ({len(student)}) as teacher ({len(teacher)}) states"
        )
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher):
        err = (s.float() - t.float()).pow(2).mean(-1)  # (B, T)
        if attention_mask is not None:
            m = attention_mask.to(err.dtype)
            err = (err * m).sum() / m.sum().clamp_min(1.0)
        else:
            err = err.mean()
        total = total + err
    return total / len(student)


class Lagrangian:
    """CoFi-style multipliers for "expected FLOPs ratio = target", per example.

    penalty = l1 * mean(gap) + l2 * mean(gap^2), gap = E[flops ratio] - target.
    The model minimises it; the multipliers maximise it by gradient ascent
    (dL/dl1 = mean gap, dL/dl2 = mean gap^2), so the pressure grows until the
    expected FLOPs sit on the target. Gradients of the multipliers are averaged
    over micro-batches and processes before each update, so every process holds
    the same multipliers.
    """

    def __init__(self, lr: float, l1: float = 0.0, l2: float = 0.0) -> None:
        self.lr, self.l1, self.l2 = lr, l1, l2
        self._grad = torch.zeros(2, dtype=torch.float64)
        self._count = 0

    def penalty(self, gap: Tensor) -> Tensor:
        mean, sq = gap.mean(), gap.pow(2).mean()
        self._grad += torch.stack([mean.detach(), sq.detach()]).double().cpu()
        self._count += 1
        return self.l1 * mean + self.l2 * sq

    def step(self, reduce: Callable[[Tensor], Tensor] = lambda t: t) -> None:
        if self._count == 0:
            return
        grad = reduce(self._grad / self._count)
        self.l1 += self.lr * float(grad[0])
        self.l2 += self.lr * float(grad[1])
        self._grad.zero_()
        self._count = 0

    def state_dict(self) -> dict[str, float]:
        return {"lambda1": self.l1, "lambda2": self.l2, "lambda_lr": self.lr}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.l1, self.l2 = float(state["lambda1"]), float(state["lambda2"])
