"""Planning a gathered forward on the host: which samples run which units, in few big ops.

All masks of a forward are read on the host once (one sync; on CPU a zero-copy
view) and planned there with numpy; plans hold only ints, slices and small
index / mask tensors. Per gated layer and kind of unit (heads, FFN slices):

- **Samples** whose layer is skipped are left out (they pass through). The
  others are put in *plan order*: by how many units they keep, most first
  (stable), so samples with equal masks are neighbours.
- **Blocks**: a block is a contiguous run of plan-order rows that is computed
  as one matmul on a *view* of those rows and a *view* of the weights of a
  run of units. With nested gates (every kept set is a prefix of the
  importance order) a block is "rows r0:r1 × units 0:c" — the samples that
  keep exactly c units. Arbitrary (non-nested) masks: one block per distinct
  mask, with unit indices (weight copies; correct but slower). Blocks are
  exact: the gathered path executes exactly the FLOPs that
  ``GatedModel.last.flops`` reports. (Merging count levels to save ops, at
  the price of computing and discarding units, did not pay off on CPU:
  results/cpu_bench/NOTES.md.)

With one sample (or a shared mask) a layer is one block per kind: every op is
a view, nothing is sorted or copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

Tensor = torch.Tensor


@dataclass
class Block:
    """Rows ``start:stop`` (plan order) compute units ``units`` (a slice or an index tensor)."""

    start: int
    stop: int
    units: slice | Tensor
    n_units: int

    @property
    def n_rows(self) -> int:
        return self.stop - self.start


@dataclass
class KindPlan:
    """Plan of one kind of unit in one layer.

    ``rows``: original sample index of each plan-order row (kept samples only);
    ``order`` is the same as a tensor, or None when plan order is the identity
    over the whole batch.
    """

    rows: np.ndarray
    order: Tensor | None
    blocks: list[Block]
    computed_units: int = 0  # sum over blocks of n_rows × n_units (= kept units)
    # nested only: the same work cut by units instead of rows, for the *expanding* projections
    # (Q/K/V, FFN up / gate) and, at one token per row (decode), the contracting ones (O, FFN
    # down): (n_rows, u0, u1) = the first n_rows rows compute units u0:u1
    unit_runs: list[tuple[int, int, int]] | None = None

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)


@dataclass
class LayerPlan:
    attention: KindPlan
    ffn: KindPlan
    n_kept: int
    batch: int
    # index tensors between orders (None = identity), built by plan_forward
    ffn_from_attention: Tensor | None = None  # attention-order row of each ffn-order row
    kept_rows: Tensor | None = None  # original index of each ffn-order row (None: identity, all kept)
    extras: dict = field(default_factory=dict)


def _run_or_index(values: np.ndarray, device: torch.device) -> slice | Tensor:
    """A slice if ``values`` (sorted, unique) is a consecutive run, else an index tensor."""
    if values.size and int(values[-1]) - int(values[0]) + 1 == values.size:
        return slice(int(values[0]), int(values[-1]) + 1)
    return torch.as_tensor(values, dtype=torch.long, device=device)


_ONE_ROW = np.zeros(1, dtype=np.int64)
_NO_ROW = np.zeros(0, dtype=np.int64)


def _nested_kind(counts: np.ndarray, kept: np.ndarray, device: torch.device) -> KindPlan:
    """Plan from per-sample prefix lengths ``counts`` (B,) of the kept samples ``kept`` (B,) bool."""
    batch = counts.shape[0]
    if batch == 1:  # the common serving case: no sorting, at most one block
        if not kept[0]:
            return KindPlan(_NO_ROW, None, [], 0)
        c = int(counts[0])
        return KindPlan(_ONE_ROW, None, [Block(0, 1, slice(0, c), c)] if c else [], c)
    key = np.where(kept, counts, -1)  # skipped samples sort last and are cut off
    order = np.argsort(-key, kind="stable")
    n_kept = int(kept.sum())
    rows = order[:n_kept]
    sorted_counts = key[rows]
    cuts = (np.flatnonzero(sorted_counts[1:] != sorted_counts[:-1]) + 1).tolist()
    starts, stops = [0, *cuts], [*cuts, n_kept]
    levels = [int(sorted_counts[a]) for a in starts if n_kept]
    positive = [i for i, c in enumerate(levels) if c > 0]
    blocks = []
    computed = 0
    for i in positive:
        c = levels[i]
        blocks.append(Block(starts[i], stops[i], slice(0, c), c))
        computed += (stops[i] - starts[i]) * c
    runs = None
    if len(blocks) > 1:
        lower = [b.n_units for b in blocks[1:]] + [0]
        runs = [(b.stop, low, b.n_units) for b, low in zip(blocks, lower)]
    identity = n_kept == batch and bool((rows == np.arange(batch)).all())
    order_t = None if identity else torch.as_tensor(rows, dtype=torch.long, device=device)
    return KindPlan(rows, order_t, blocks, computed, runs)


def _general_kind(mask: np.ndarray, kept: np.ndarray, device: torch.device) -> KindPlan:
    """Plan arbitrary masks (B, U): one block per distinct mask, samples grouped by mask."""
    batch = mask.shape[0]
    keep_idx = np.flatnonzero(kept)
    sub = mask[keep_idx]
    counts = sub.sum(axis=1)
    packed = np.packbits(sub, axis=1)
    # group identical masks; groups with more units first (stable within equal counts)
    _, inverse = np.unique(packed, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.lexsort((inverse, -counts))
    rows = keep_idx[order]
    sorted_inv = inverse[order]
    blocks = []
    computed = 0
    bounds = np.flatnonzero(np.diff(sorted_inv)) + 1
    for r0, r1 in zip([0, *bounds.tolist()], [*bounds.tolist(), sorted_inv.size]):
        units = np.flatnonzero(sub[order[r0]])
        if units.size:
            blocks.append(Block(int(r0), int(r1), _run_or_index(units, device), int(units.size)))
            computed += (r1 - r0) * int(units.size)
    identity = rows.size == batch and bool((rows == np.arange(batch)).all())
    order_t = None if identity else torch.as_tensor(rows, dtype=torch.long, device=device)
    return KindPlan(rows, order_t, blocks, computed)


def prefix_counts(mask: np.ndarray) -> np.ndarray | None:
    """Counts (B, L) if every row of ``mask`` (B, L, U) is a prefix, else None."""
    counts = mask.sum(axis=-1)
    prefix = np.arange(mask.shape[-1]) < counts[..., None]
    return counts if bool((prefix == mask).all()) else None


def plan_forward(head: Tensor, ffn: Tensor, layer: Tensor) -> list[LayerPlan]:
    """Plans for every gated layer from canonical masks head (B, L, nh), ffn (B, L, ns), layer (B, L)."""
    device = layer.device
    head_np = head.detach().cpu().numpy()
    ffn_np = ffn.detach().cpu().numpy()
    layer_np = layer.detach().cpu().numpy()
    batch, n_layers = layer_np.shape
    head_counts = prefix_counts(head_np)
    ffn_counts = prefix_counts(ffn_np)
    plans = []
    for i in range(n_layers):
        kept = layer_np[:, i]
        if head_counts is not None:
            attention = _nested_kind(head_counts[:, i], kept, device)
        else:
            attention = _general_kind(head_np[:, i], kept, device)
        if ffn_counts is not None:
            ffn_plan = _nested_kind(ffn_counts[:, i], kept, device)
        else:
            ffn_plan = _general_kind(ffn_np[:, i], kept, device)
        n_kept = int(attention.rows.size)
        lp = LayerPlan(attention, ffn_plan, n_kept, batch)
        if batch > 1 and n_kept:
            if not np.array_equal(attention.rows, ffn_plan.rows):
                position = np.empty(batch, dtype=np.int64)
                position[attention.rows] = np.arange(n_kept)
                lp.ffn_from_attention = torch.as_tensor(position[ffn_plan.rows], device=device)
            if ffn_plan.order is not None:
                lp.kept_rows = ffn_plan.order
        plans.append(lp)
    return plans


def take_rows(t: Tensor, rows: slice | Tensor) -> Tensor:
    """Leading-dim selection: a view for a slice, a gather for an index tensor."""
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)
