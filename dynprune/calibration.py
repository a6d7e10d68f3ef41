"""Mean budgets at inference: the calibrated policy per target, saved as ``gates/calibration.json``.

Two policies spend a :class:`~dynprune.budget.MeanBudget` (fitted on the
validation split by :mod:`dynprune.calibration_fit` / ``dynprune calibrate``):

- ``threshold`` (checkpoints trained with ``gate.budget_mode=mean``): the router
  reads the target; every unit whose logit exceeds the calibrated threshold is
  eligible (greedy under the cap, if any): easy inputs get fewer units.
- ``cascade`` (any checkpoint; no training needed): every input runs at budget
  ``low``; inputs whose confidence (max softmax probability) is below the
  calibrated ``confidence`` run again at ``high``. Their FLOPs are the sum of
  both passes; with a cap, ``low + high <= cap``.

Each entry also keeps the fit's curve (the policy's knob — threshold or confidence — against the
mean FLOPs it gave on the calibration inputs), so :func:`govern` can correct the knob online
(:class:`~dynprune.governor.MeanGovernor`) when the inputs served spend more or less than those.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dynprune.budget import MeanBudget, ThresholdRoute
from dynprune.config import check_budget_value
from dynprune.governor import MeanGovernor, curve_solver
from dynprune.state import ForwardInfo

if TYPE_CHECKING:
    from dynprune.model import GatedModel

CALIBRATION_JSON = "calibration.json"
FORMAT_VERSION = 1
Tensor = torch.Tensor


class MissingCalibrationError(ValueError):
    """A MeanBudget was asked of a checkpoint that has no calibration for it."""


class BudgetModeError(ValueError):
    """A policy was asked of a checkpoint that was not trained for it."""


def how_to_calibrate(budget: MeanBudget, replace: bool = False) -> str:
    cap = "" if budget.cap is None else f" --cap {budget.cap:g}"
    verb, flag = ("re-fit it", " --overwrite") if replace else ("make one", "")
    return (
        f"{verb} with `dynprune calibrate --checkpoint DIR --target {budget.target:g}{cap}{flag}` "
        "(fits the policy on the validation split and saves it in DIR/gates/calibration.json)"
    )


@dataclass(frozen=True)
class ThresholdPolicy:
    """Units (and layers) with logit > ``threshold`` are eligible; needs a mean-mode checkpoint."""

    threshold: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold):
            raise ValueError(f"ThresholdPolicy.threshold must be finite, got {self.threshold!r}")


@dataclass(frozen=True)
class CascadePolicy:
    """Run at ``low``; re-run at ``high`` the inputs whose max softmax probability < ``confidence``."""

    low: float
    high: float
    confidence: float

    def __post_init__(self) -> None:
        check_budget_value(self.low, "CascadePolicy.low")
        check_budget_value(self.high, "CascadePolicy.high")
        if not self.low < self.high:
            raise ValueError(f"CascadePolicy: low ({self.low}) must be < high ({self.high})")
        if not (math.isfinite(self.confidence) and self.confidence >= 0):
            raise ValueError(
                f"CascadePolicy.confidence must be a finite number >= 0, got {self.confidence!r}"
            )


Policy = ThresholdPolicy | CascadePolicy
_POLICIES: dict[str, type] = {"threshold": ThresholdPolicy, "cascade": CascadePolicy}


def policy_name(policy: Policy) -> str:
    return "threshold" if isinstance(policy, ThresholdPolicy) else "cascade"


@dataclass(frozen=True)
class CalibrationEntry:
    """One mean budget's policy and what the fit measured (split, n, batch size, mean FLOPs, accuracy)."""

    budget: MeanBudget
    policy: Policy
    fitted: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.budget.target,
            "cap": self.budget.cap,
            "policy": policy_name(self.policy),
            "params": asdict(self.policy),
            "fitted": self.fitted,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationEntry:
        kind = data["policy"]
        if kind not in _POLICIES:
            raise ValueError(f"unknown calibration policy {kind!r}; known: {sorted(_POLICIES)}")
        return cls(
            MeanBudget(data["target"], data.get("cap")), _POLICIES[kind](**data["params"]), data["fitted"]
        )


@dataclass
class Calibration:
    """Calibrated policies by mean-budget spec (``mean:0.25``, ``mean:0.25,cap:0.6``)."""

    entries: dict[str, CalibrationEntry] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def add(self, entry: CalibrationEntry) -> None:
        self.entries[entry.budget.spec] = entry

    def lookup(self, budget: MeanBudget) -> CalibrationEntry:
        entry = self.entries.get(budget.spec)
        if entry is None:
            have = ", ".join(sorted(self.entries)) or "none"
            raise MissingCalibrationError(
                f"this gated model has no calibration for {budget.spec} (it has: {have}); "
                + how_to_calibrate(budget)
            )
        return entry

    def to_json(self) -> str:
        entries = {k: e.to_dict() for k, e in sorted(self.entries.items())}
        return json.dumps({"format": FORMAT_VERSION, "entries": entries}, indent=2)

    def save(self, directory: str | os.PathLike) -> Path:
        from dynprune.io import atomic_write_bytes

        path = Path(directory) / CALIBRATION_JSON
        atomic_write_bytes(path, self.to_json().encode())
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Calibration:
        """The calibration saved in a gates directory (empty if there is none)."""
        path = Path(directory) / CALIBRATION_JSON
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {data.get('format')!r}, this dynprune reads {FORMAT_VERSION}")
            out = cls()
            for spec, raw in data["entries"].items():
                entry = CalibrationEntry.from_dict(raw)
                if entry.budget.spec != spec:
                    raise ValueError(f"entry {spec!r} describes {entry.budget.spec!r}")
                out.add(entry)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path} is not a valid calibration ({err}); delete it and run `dynprune calibrate` again"
            ) from err
        return out


def check_policy_fits(gated: GatedModel, policy: Policy | str) -> None:
    """The threshold policy needs a router trained in mean mode."""
    name = policy if isinstance(policy, str) else policy_name(policy)
    if name == "threshold" and gated.gate_config.budget_mode != "mean":
        raise BudgetModeError(
            "the threshold policy needs a router trained for mean budgets (gate.budget_mode=mean); this "
            "checkpoint was trained with a cap per input: use the cascade policy "
            "(`dynprune calibrate ... --policy cascade`, no training needed) or retrain with "
            "--gate.budget_mode=mean"
        )


@dataclass
class GovernedMean:
    """A :class:`MeanBudget` whose calibrated knob is corrected online: pass it as ``budget=`` to every
    forward of a stream (keep the one object); each forward runs the policy at the governor's knob
    and tells it what the batch spent (:mod:`dynprune.governor`). Made by :func:`govern`."""

    budget: MeanBudget
    governor: MeanGovernor

    @property
    def spec(self) -> str:
        return self.budget.spec


def govern(gated: GatedModel, budget: MeanBudget, prior: int = 128) -> GovernedMean:
    """``budget``'s calibrated policy with its knob governed (its entry's curve gives the solver;
    ``prior``: inputs the calibration counts as, see :class:`~dynprune.governor.MeanGovernor`)."""
    if budget.target >= 1.0:  # dense: nothing to govern (mean_budget_forward runs the model as is)
        return GovernedMean(budget, MeanGovernor(1.0, lambda aim: (0.0, 1.0), (1.0, 1.0), prior))
    entry = gated.calibration.lookup(budget)
    curve = entry.fitted.get("curve")
    if not curve:
        raise MissingCalibrationError(
            f"the calibration of {budget.spec} has no curve (fitted before governed budgets existed): "
            + how_to_calibrate(budget, replace=True)
        )
    solve, bounds = curve_solver(curve)
    return GovernedMean(budget, MeanGovernor(budget.target, solve, bounds, prior))


def _with_knob(policy: Policy, knob: float) -> Policy:
    if isinstance(policy, ThresholdPolicy):
        return replace(policy, threshold=knob)
    return replace(policy, confidence=max(knob, 0.0))


def mean_budget_forward(
    gated: GatedModel, budget: MeanBudget | GovernedMean, args: tuple, kwargs: dict[str, Any]
) -> Any:
    """``gated(..., budget=MeanBudget(...))``: the calibrated policy for ``budget``; a
    :class:`GovernedMean` runs it at its governor's knob and reports what the inputs spent."""
    governed = budget if isinstance(budget, GovernedMean) else None
    mean = budget if governed is None else governed.budget
    if mean.target >= 1.0:
        return gated(*args, budget=1.0, **kwargs)
    policy = gated.calibration.lookup(mean).policy
    if governed is not None:
        policy = _with_knob(policy, governed.governor.knob)
    check_policy_fits(gated, policy)
    if isinstance(policy, ThresholdPolicy):
        out = gated(*args, budget=ThresholdRoute(mean.target, policy.threshold, mean.cap), **kwargs)
    else:
        out = cascade_forward(gated, policy, mean, args, kwargs)
    if governed is not None:
        info = gated.last
        assert info is not None
        governed.governor.observe((info.flops / info.dense_flops).double().cpu().numpy())
    return out


def cascade_forward(
    gated: GatedModel, policy: CascadePolicy, budget: MeanBudget, args: tuple, kwargs: dict[str, Any]
) -> Any:
    """Run at ``policy.low``; re-run the least confident inputs at ``policy.high``; FLOPs of both count."""
    if args:
        raise ValueError("the cascade policy needs keyword inputs (input_ids=..., attention_mask=...)")
    if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
        raise ValueError(
            "the cascade policy returns logits only: output_hidden_states/attentions are not supported"
        )
    out = gated(budget=policy.low, **kwargs)
    lo = gated.last
    assert lo is not None
    logits = out.logits  # (B, C)
    batch = logits.shape[0]
    conf = logits.detach().float().softmax(-1).amax(-1)  # (B,)
    rows = (conf < policy.confidence).nonzero().squeeze(1)  # (R,)
    flops, spent_bound = lo.flops.clone(), lo.budget.clone()
    passes = torch.ones(batch, dtype=torch.int64, device=flops.device)
    masks = lo.masks
    if rows.numel():
        sub = {
            k: v.index_select(0, rows) if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch else v
            for k, v in kwargs.items()
        }
        out_hi = gated(budget=policy.high, **sub)
        hi = gated.last
        assert hi is not None and hi.seq_len == lo.seq_len
        out.logits = logits.index_copy(0, rows, out_hi.logits)
        flops = flops.index_add(0, rows.to(flops.device), hi.flops)
        spent_bound = spent_bound.index_add(0, rows.to(spent_bound.device), hi.budget)
        passes[rows] = 2
        if masks is not None:
            hm = hi.masks
            parts = []
            for kind in ("head", "ffn", "layer"):
                m = getattr(masks, kind)
                new = torch.ones_like(m[rows]) if hm is None else getattr(hm, kind)
                parts.append(m.index_copy(0, rows, new))
            masks = type(masks)(*parts)
    gated.last = ForwardInfo(
        spent_bound,
        lo.seq_len,
        lo.dense_flops,
        flops,
        gates=None if masks is None else masks.to_gates(logits.dtype),
        masks=masks,
        passes=passes,
    )
    return out
