"""Planning a gathered forward: which samples run which units, as few big ops as possible.

Given a hard keep mask (B, U) for one kind of unit in one layer, samples are
ordered by how many units they keep (most first, stable). Units kept by
exactly the same set of samples form a group. With nested gates every group
is "the first n samples of that order" × "a contiguous run of units", so each
group is one matmul on a view of the activations and a view of the weights.
Arbitrary masks work too (index tensors instead of slices, i.e. copies).

All masks of a forward are moved to the host once (one sync) and planned
there; plans hold only slices, small index tensors and ints.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

Index = slice | torch.Tensor


@dataclass
class UnitGroup:
    rows: Index  # positions in the plan's sample order
    n_rows: int
    units: Index  # unit indices within the layer
    n_units: int


@dataclass
class KindPlan:
    order: torch.Tensor | None  # (B,) sample order; None = identity
    order_list: list[int]
    groups: list[UnitGroup]

    @property
    def distinct_masks(self) -> int:
        return len({g.n_rows for g in self.groups})


def _as_index(values: np.ndarray, device: torch.device) -> Index:
    """A slice if ``values`` is a consecutive run, else an index tensor."""
    if values.size and values[-1] - values[0] + 1 == values.size:
        return slice(int(values[0]), int(values[-1]) + 1)
    return torch.as_tensor(values, dtype=torch.long, device=device)


def plan_kind(mask: np.ndarray, device: torch.device) -> KindPlan:
    """Plan one kind of unit in one layer from a host bool mask (B, U)."""
    batch = mask.shape[0]
    counts = mask.sum(axis=1)
    order = np.argsort(-counts, kind="stable")
    identity = bool((order == np.arange(batch)).all())
    sorted_mask = mask[order]  # (B, U) rows in plan order
    groups: dict[bytes, list[int]] = {}
    for unit in range(mask.shape[1]):
        column = sorted_mask[:, unit]
        if column.any():
            groups.setdefault(np.flatnonzero(column).astype(np.int64).tobytes(), []).append(unit)
    planned = []
    for rows_key, units in groups.items():
        rows = np.frombuffer(rows_key, dtype=np.int64)
        unit_arr = np.asarray(units, dtype=np.int64)
        planned.append(
            UnitGroup(_as_index(rows, device), rows.size, _as_index(unit_arr, device), unit_arr.size)
        )
    return KindPlan(
        order=None if identity else torch.as_tensor(order, dtype=torch.long, device=device),
        order_list=order.tolist(),
        groups=planned,
    )


@dataclass
class LayerPlan:
    attention: KindPlan
    ffn: KindPlan
    keep: torch.Tensor  # (B,) bool on the model's device
    n_kept: int


def plan_forward(head: torch.Tensor, ffn: torch.Tensor, layer: torch.Tensor) -> list[LayerPlan]:
    """Plans for every gated layer from canonical masks head (B, L, nh), ffn (B, L, ns), layer (B, L)."""
    device = layer.device
    head_np = head.cpu().numpy()
    ffn_np = ffn.cpu().numpy()
    layer_np = layer.cpu().numpy()
    plans = []
    for i in range(layer_np.shape[1]):
        plans.append(
            LayerPlan(
                attention=plan_kind(head_np[:, i], device),
                ffn=plan_kind(ffn_np[:, i], device),
                keep=layer[:, i],
                n_kept=int(layer_np[:, i].sum()),
            )
        )
    return plans


def take_rows(t: torch.Tensor, rows: Index) -> torch.Tensor:
    """Leading-dim selection: a view for a slice, a gather for an index tensor."""
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)
