"""Gate values from router scores: relaxation for training, hard choice under a budget.

Scores are logits, one per unit: ``head`` (B, L, n_heads), ``ffn`` (B, L,
n_slices), ``layer`` (B, L); ``None`` for a kind that is not gated. With nested
gates the logits of one kind in one layer are non-increasing along the unit
axis, so the units kept are always a prefix of the layer's importance order.

- Training, soft: binary-concrete (Gumbel-sigmoid) samples
  ``sigmoid((logit + logistic noise) / temperature)``. Nested units share one
  noise draw per (sample, layer, kind), which keeps the sample nested.
- Training, hard (straight-through): the hard choice below, made on the
  noisy logits, in the forward pass; the relaxed sample's gradient backward.
- Inference: the hard choice on the clean logits. One code path for both, so
  what is trained is what is served.

The hard choice (:func:`select_under_budget`): layers whose layer logit is > 0
are kept; then units of kept layers are taken greedily by score per FLOP —
``log sigmoid(logit) - log(cost)`` — until the sample's FLOPs budget is spent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynprune.config import UnitRanking
from dynprune.flops import FlopsModel

Tensor = torch.Tensor


@dataclass
class GateScores:
    """Router logits for one batch (see module docstring for shapes)."""

    head: Tensor | None
    ffn: Tensor | None
    layer: Tensor | None

    def index_rows(self, rows: Tensor) -> GateScores:
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return GateScores(pick(self.head), pick(self.ffn), pick(self.layer))


@dataclass
class UnitMasks:
    """Hard keep masks: head (B, L, n_heads), ffn (B, L, n_slices), layer (B, L), all bool.

    A unit of a skipped layer is never kept (normalised by :meth:`canonical`).
    """

    head: Tensor
    ffn: Tensor
    layer: Tensor

    @property
    def batch_size(self) -> int:
        return self.layer.shape[0]

    def canonical(self) -> UnitMasks:
        keep = self.layer.bool()
        return UnitMasks(self.head.bool() & keep[..., None], self.ffn.bool() & keep[..., None], keep)

    def check_shape(self, batch: int, n_layers: int, n_heads: int, n_slices: int) -> None:
        want = {
            "head": (batch, n_layers, n_heads),
            "ffn": (batch, n_layers, n_slices),
            "layer": (batch, n_layers),
        }
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"UnitMasks.{name} has shape {got}, expected {shape} (batch, layers, units)")

    @classmethod
    def full(
        cls, batch: int, n_layers: int, n_heads: int, n_slices: int, device: torch.device | str = "cpu"
    ) -> UnitMasks:
        ones = lambda *s: torch.ones(*s, dtype=torch.bool, device=device)  # noqa: E731
        return cls(ones(batch, n_layers, n_heads), ones(batch, n_layers, n_slices), ones(batch, n_layers))

    def counts(self) -> Tensor:
        """(B, L, 3) int64 per sample and layer: kept (0/1), kept heads, kept FFN slices
        (of the canonical masks: a skipped layer keeps no unit)."""
        m = self.canonical()
        return torch.stack([m.layer.long(), m.head.sum(-1), m.ffn.sum(-1)], dim=-1)

    @classmethod
    def from_counts(cls, counts: Tensor, n_heads: int, n_slices: int) -> UnitMasks:
        """Prefix masks from (B, L, 3) counts (:meth:`counts` of nested masks, inverted)."""
        heads = torch.arange(n_heads, device=counts.device) < counts[..., 1:2]  # (B, L, n_heads)
        ffn = torch.arange(n_slices, device=counts.device) < counts[..., 2:3]  # (B, L, n_slices)
        return cls(heads, ffn, counts[..., 0] > 0).canonical()

    def to_gates(self, dtype: torch.dtype = torch.float32) -> Gates:
        m = self.canonical()
        return Gates(m.head.to(dtype), m.ffn.to(dtype), m.layer.to(dtype), hard=True)


@dataclass
class Gates:
    """Gate values the layers multiply by (masked path): floats, (B, L, ·) like UnitMasks.

    ``hard`` means every value is exactly 0 or 1 in the forward pass.
    """

    head: Tensor
    ffn: Tensor
    layer: Tensor
    hard: bool

    def masks(self) -> UnitMasks:
        if not self.hard:
            raise ValueError("soft gates have no hard masks; use hard=True or eval mode")
        return UnitMasks(self.head > 0.5, self.ffn > 0.5, self.layer > 0.5).canonical()


def nested_logits(raw: Tensor, offset: float) -> Tensor:
    """Map raw router outputs (..., n) to non-increasing logits (..., n).

    logit_0 = raw_0 + offset; logit_r = logit_{r-1} - softplus(raw_r - 4).
    At raw = 0 every logit is close to ``offset`` (gates open at init).
    """
    first = raw[..., :1] + offset
    drops = F.softplus(raw[..., 1:] - 4.0)
    return torch.cat([first, first - torch.cumsum(drops, dim=-1)], dim=-1)


def logistic_noise(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    u = torch.rand(shape, device=like.device, dtype=like.dtype, generator=generator).clamp_(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def add_noise(scores: GateScores, nested: bool, generator: torch.Generator | None = None) -> GateScores:
    """Logistic noise on every logit; nested kinds share one draw per (sample, layer)."""

    def noisy(t: Tensor | None, shared: bool) -> Tensor | None:
        if t is None:
            return None
        shape = (*t.shape[:-1], 1) if shared else tuple(t.shape)
        return t + logistic_noise(shape, t, generator)

    return GateScores(noisy(scores.head, nested), noisy(scores.ffn, nested), noisy(scores.layer, False))


def relaxed(scores: GateScores, temperature: float) -> GateScores:
    """sigmoid(logit / temperature) for every kind (call on noisy logits)."""
    f = lambda t: None if t is None else torch.sigmoid(t / temperature)  # noqa: E731
    return GateScores(f(scores.head), f(scores.ffn), f(scores.layer))


def probabilities(scores: GateScores) -> GateScores:
    """Marginal keep probabilities sigmoid(logit) (for the expected-FLOPs regulariser)."""
    f = lambda t: None if t is None else torch.sigmoid(t)  # noqa: E731
    return GateScores(f(scores.head), f(scores.ffn), f(scores.layer))


def fill_ungated(
    values: GateScores, batch: int, n_layers: int, n_heads: int, n_slices: int, like: Tensor
) -> Gates:
    """Gates with ones for kinds that are not gated."""
    ones = lambda *s: torch.ones(*s, device=like.device, dtype=like.dtype)  # noqa: E731
    return Gates(
        head=values.head if values.head is not None else ones(batch, n_layers, n_heads),
        ffn=values.ffn if values.ffn is not None else ones(batch, n_layers, n_slices),
        layer=values.layer if values.layer is not None else ones(batch, n_layers),
        hard=False,
    )


def log_sigmoid(x: Tensor) -> Tensor:
    """log σ(x) = min(x, 0) − log(1 + e^−|x|): exact for any x in float64, and exported to ONNX
    without ``Log(Sigmoid(x))`` (which ONNX Runtime evaluates as −inf below x ≈ −37)."""
    return x.clamp(max=0.0) - torch.log1p(torch.exp(-x.abs()))


#: added to the (negative) keys of dropped layers' units so they sort after every kept layer's
_REFILL_OFFSET = 1e6


def select_under_budget(
    scores: GateScores,
    available: Tensor,
    flops: FlopsModel,
    seq_len: int,
    threshold: float | None = None,
    costs: tuple[Tensor, Tensor] | None = None,
    overhead: float = 0.0,
    ranking: UnitRanking = "per_flop",
) -> UnitMasks:
    """Hard masks whose gated-layer FLOPs are <= ``available`` (B,) per sample.

    ``flops`` prices the units: a FlopsModel, or anything with its ``n_gated_layers``,
    ``n_heads``, ``n_slices``, ``head_cost(seq)`` and ``slice_cost(seq)`` (a measured
    :class:`dynprune.cost_model.CostTable`: ``available`` is then in ms). ``overhead``: a cost
    every kept layer pays whatever units it keeps (part of its compulsory cost, step 1).

    ``threshold`` None (a cap per input): every unit is eligible and the budget
    is filled greedily. A number (mean budgets): only units and layers whose
    logit exceeds it are eligible; they are taken greedily while they fit (all
    of them when ``available`` is the whole model).

    1. Layers with logit > 0 (> threshold) are kept (all, if layers are not gated). If the
       kept layers' compulsory cost (units of kinds that are not gated) does
       not fit, the lowest-scored kept layers are dropped until it does.
    2. Eligible gated units of kept layers are taken in order of
       ``log sigmoid(logit) - log(cost)``, or of ``logit`` (``ranking="logit"``) (stable: ties go to the lower unit
       index, so nested logits give prefixes) while the running cost fits; past the first
       unit that does not fit, the other kind's units are still taken, in order, while they
       fit (every unit of a kind costs the same, so the prefixes stay prefixes).
    3. Budget left once the kept layers are full goes to the units of the
       dropped layers, in the same order (a layer comes back when one of its
       units is taken), so a budget above what the kept layers can hold is still
       spent — in cap mode (no threshold) and only when every kind of unit is
       gated (no compulsory cost).
    Raises ValueError if even the compulsory cost cannot fit (layers not gated).

    ``ranking``: ``"per_flop"`` ranks units by score per FLOP, ``log sigmoid(logit) - log(cost)``
    (scores that are values: the training-free router's, a cost table's tests); ``"logit"`` by
    the logit alone (a learned router's logits already carry each unit's cost: the Lagrangian
    priced it in training). A gated model passes its ``GateConfig.unit_ranking``.

    ``costs``: (head, slice) cost as 0-dim float64 tensors instead of ``flops``'s at ``seq_len``
    (the same numbers, as graph inputs when the selection is exported to ONNX, dynprune.exec).
    """
    ref = next(t for t in (scores.head, scores.ffn, scores.layer) if t is not None)
    batch, n_layers = ref.shape[0], flops.n_gated_layers
    n_heads, n_slices = flops.n_heads, flops.n_slices
    device = ref.device
    if costs is None:
        head_cost, slice_cost = flops.head_cost(seq_len), flops.slice_cost(seq_len)
        log_cost = math.log
    else:
        head_cost, slice_cost = costs
        log_cost = torch.log
    available = available.to(device=device, dtype=torch.float64)

    compulsory = float(overhead)
    if scores.head is None:
        compulsory += n_heads * head_cost
    if scores.ffn is None:
        compulsory += n_slices * slice_cost
    # (static, whatever the costs' type; a per-layer overhead is a plain float)
    has_compulsory = scores.head is None or scores.ffn is None or overhead > 0

    if scores.layer is not None:
        layer_logit = scores.layer.detach().double()
        keep_layer = layer_logit > (0.0 if threshold is None else threshold)
        if has_compulsory:
            # keep the best-scored kept layers whose compulsory cost fits
            order = torch.argsort(layer_logit, dim=1, descending=True, stable=True)  # (B, L)
            kept_sorted = torch.gather(keep_layer, 1, order)
            cum = torch.cumsum(kept_sorted.double() * compulsory, dim=1)
            fits_sorted = kept_sorted & (cum <= available[:, None] * (1 + 1e-12))
            keep_layer = torch.zeros_like(keep_layer).scatter(1, order, fits_sorted)
    else:
        keep_layer = torch.ones(batch, n_layers, dtype=torch.bool, device=device)
        need = n_layers * compulsory
        if has_compulsory and bool((available < need * (1 - 1e-12)).any()):
            raise ValueError(
                "budget too small: the layers' compulsory cost (un-gated units, per-layer overhead) alone "
                "is more than the budget allows; "
                "gate more kinds of units (heads/ffn/layers) or raise the budget"
            )
    remaining = available - keep_layer.double().sum(1) * compulsory  # (B,)
    refill = threshold is None and scores.layer is not None and not has_compulsory

    keys, unit_costs, slots = [], [], []
    for kind, t, cost, n in (
        ("head", scores.head, head_cost, n_heads),
        ("ffn", scores.ffn, slice_cost, n_slices),
    ):
        if t is None:
            continue
        logit = t.detach().double()
        key = log_sigmoid(logit) - log_cost(cost) if ranking == "per_flop" else logit  # (B, L, n)
        if threshold is not None:  # mean budgets: units above the threshold in kept layers only
            key = key.masked_fill(~keep_layer[..., None] | (logit <= threshold), float("-inf"))
        else:  # dropped layers: after every kept layer's unit (refill, step 3), or never
            key = torch.where(keep_layer[..., None], key, key - _REFILL_OFFSET if refill else float("-inf"))
        keys.append(key)
        unit_costs.append(torch.ones(n_layers, n, dtype=torch.float64, device=device) * cost)
        slots.append((kind, n))
    head_mask = torch.zeros(batch, n_layers, n_heads, dtype=torch.bool, device=device)
    ffn_mask = torch.zeros(batch, n_layers, n_slices, dtype=torch.bool, device=device)
    if scores.head is None:
        head_mask = keep_layer[..., None].expand_as(head_mask).clone()
    if scores.ffn is None:
        ffn_mask = keep_layer[..., None].expand_as(ffn_mask).clone()
    if keys:
        # (B, L, n_heads + n_slices) -> (B, U): layer-major, heads before slices
        key_all = torch.cat(keys, dim=-1).reshape(batch, -1)
        cost_all = torch.cat(unit_costs, dim=-1).reshape(-1)
        order = torch.argsort(key_all, dim=1, descending=True, stable=True)
        key_sorted = torch.gather(key_all, 1, order)
        eligible = key_sorted > float("-inf")
        cost_sorted = cost_all[order] * eligible  # (B, U)
        take_sorted = eligible & (torch.cumsum(cost_sorted, dim=1) <= remaining[:, None] * (1 + 1e-12))
        if len(slots) == 2:  # step 2's fill continues past the first unit that does not fit
            kind_all = (
                torch.arange(n_heads + n_slices, device=device).repeat(n_layers) >= n_heads
            )  # (U,): slice
            take_sorted = _fill_with_other_kind(
                take_sorted, eligible, cost_sorted, kind_all[order], remaining
            )
        take = torch.zeros_like(take_sorted).scatter(1, order, take_sorted).reshape(batch, n_layers, -1)
        offset = 0
        for kind, n in slots:
            part = take[..., offset : offset + n]
            if kind == "head":
                head_mask = part
            else:
                ffn_mask = part
            offset += n
        if refill:
            keep_layer = keep_layer | take.any(dim=-1)
    return UnitMasks(head_mask, ffn_mask, keep_layer).canonical()


def _fill_with_other_kind(
    take: Tensor, eligible: Tensor, cost: Tensor, kind: Tensor, remaining: Tensor
) -> Tensor:
    """Units in greedy order (B, U): ``take`` is the run taken before the first unit that does not
    fit. Every unit of one kind costs the same, so later units of that kind do not fit either; the
    other kind's later units are taken, in order, while they fit (the greedy fill that skips a
    unit too dear for what is left). Prefixes stay prefixes: within a kind, units are taken in
    order until the first that does not fit."""
    failed = eligible & ~take  # (B, U)
    position = torch.arange(take.shape[1], device=take.device)
    first = torch.where(failed, position, take.shape[1]).amin(dim=1)  # (B,) U when none failed
    failed_kind = torch.gather(kind, 1, first.clamp(max=take.shape[1] - 1)[:, None])  # (B, 1)
    other = eligible & (position > first[:, None]) & (kind != failed_kind)  # (B, U)
    left = remaining - (cost * take).sum(dim=1)  # (B,)
    more = other & (torch.cumsum(cost * other, dim=1) <= left[:, None] * (1 + 1e-12))
    return take | more


def straight_through(masks: UnitMasks, soft: Gates) -> Gates:
    """Hard values forward, the relaxed sample's gradient backward."""

    def st(hard: Tensor, s: Tensor) -> Tensor:
        return hard.to(s.dtype) + (s - s.detach())

    return Gates(st(masks.head, soft.head), st(masks.ffn, soft.ffn), st(masks.layer, soft.layer), hard=True)
