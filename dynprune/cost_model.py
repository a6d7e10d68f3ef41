"""Measured time cost of gated units on one machine: the latency table behind millisecond budgets.

Selection (:func:`dynprune.gates.select_under_budget`) prices units by FLOPs by default. On a
real CPU engine a unit's time is not proportional to its FLOPs: a head costs more time per FLOP
than an FFN slice, and a kept layer pays a fixed overhead (its LayerNorms, residual adds and the
engine's per-op dispatch) whatever units it keeps. A :class:`CostTable` is a per-machine model
of the time of a **batch-1** forward on the engine that runs the layers (ONNX Runtime,
``dynprune.exec``), fitted by ``dynprune bench calibrate`` and saved beside the gates
(``gates/cost_table.json``):

    time(T) = fixed(T) + sum over kept gated layers of (layer(T) + head(T) * heads + slice(T) * slices)

``fixed`` is everything outside the gated layers (embeddings, router, selection, task head, the
engine call), ``layer`` the overhead of a kept layer, ``head`` / ``slice`` the time of one head /
FFN slice, each in ms at sequence length T. The coefficients are fitted at a few measured lengths
and interpolated linearly in T between them (held constant below the shortest, extrapolated along
the last segment above the longest). A table prices units with the same interface as
:class:`dynprune.flops.FlopsModel` (``head_cost(seq)``, ``slice_cost(seq)``, plus
``layer_overhead(seq)``: the selection's compulsory cost of a kept layer), so the one selection
runs unchanged on either (docs/cpu_engine.md, "Millisecond budgets").
"""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

COST_TABLE_JSON = "cost_table.json"
FORMAT_VERSION = 1
Tensor = torch.Tensor

#: what a table must agree on with the model it prices (shapes only: weights do not change times)
SIGNATURE_KEYS = (
    "model_type",
    "n_layers",
    "n_heads",
    "head_dim",
    "hidden",
    "ffn_dim",
    "ffn_slice_size",
    "router_layer",
)


class MissingCostTableError(ValueError):
    """A millisecond budget was asked of a gated model without a cost table."""


class IncompatibleCostTableError(ValueError):
    """A cost table was measured for another model (other shapes)."""


def how_to_calibrate() -> str:
    return (
        "make one with `dynprune bench calibrate --checkpoint DIR` (times the ONNX Runtime engine's "
        "layers on this machine and saves DIR/gates/cost_table.json), or attach one with "
        "`gated.cost_table = dynprune.cost_model.CostTable.load(path)`"
    )


def _finite(value: Any, what: str, low: float = -math.inf) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a number, got {value!r}") from err
    if not math.isfinite(v) or v < low:
        raise ValueError(f"{what} must be a finite number >= {low:g}, got {value!r}")
    return v


@dataclass(frozen=True)
class SeqCosts:
    """Fitted costs at one sequence length, in ms (see the module docstring)."""

    seq: int
    fixed_ms: float
    layer_ms: float
    head_ms: float
    slice_ms: float
    rmse_ms: float = 0.0  # residual of the layer fit (diagnostic)

    def __post_init__(self) -> None:
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or self.seq < 1:
            raise ValueError(f"SeqCosts.seq must be an int >= 1, got {self.seq!r}")
        for name in ("fixed_ms", "layer_ms", "rmse_ms"):
            object.__setattr__(self, name, _finite(getattr(self, name), f"SeqCosts.{name}", 0.0))
        for name in ("head_ms", "slice_ms"):
            v = _finite(getattr(self, name), f"SeqCosts.{name}", 0.0)
            if v <= 0:
                raise ValueError(f"SeqCosts.{name} must be > 0 (a unit that costs nothing cannot be priced)")
            object.__setattr__(self, name, v)


@dataclass(frozen=True)
class CostTable:
    """A per-machine latency model of a gated model's batch-1 forward (module docstring)."""

    model: dict[str, Any]  # SIGNATURE_KEYS of the model it was measured on
    points: tuple[SeqCosts, ...]
    machine: dict[str, str] = field(default_factory=dict)  # cpu, threads, versions, when
    engine: str = "onnxruntime"
    batch: int = 1
    fit: dict[str, Any] = field(default_factory=dict)  # diagnostics: held-out errors, settings

    def __post_init__(self) -> None:
        missing = [k for k in SIGNATURE_KEYS if k not in self.model]
        if missing:
            raise ValueError(f"CostTable.model lacks {missing} (the shapes it was measured for)")
        pts = tuple(self.points)
        if not pts or not all(isinstance(p, SeqCosts) for p in pts):
            raise ValueError("CostTable.points must be a non-empty sequence of SeqCosts")
        seqs = [p.seq for p in pts]
        if any(b <= a for a, b in itertools.pairwise(seqs)):
            raise ValueError(f"CostTable.points must have strictly increasing sequence lengths, got {seqs}")
        object.__setattr__(self, "points", pts)
        if self.batch != 1:
            raise ValueError(
                f"CostTable.batch must be 1 (tables are measured at batch 1), got {self.batch!r}"
            )

    # -- the FlopsModel-like pricing interface of select_under_budget ---------------------------
    @property
    def n_gated_layers(self) -> int:
        return int(self.model["n_layers"]) - int(self.model["router_layer"])

    @property
    def n_heads(self) -> int:
        return int(self.model["n_heads"])

    @property
    def n_slices(self) -> int:
        return int(self.model["ffn_dim"]) // int(self.model["ffn_slice_size"])

    def _at(self, seq: int, name: str) -> float:
        """Linear in T between measured lengths; held below the first (one length: held everywhere);
        extrapolated along the last segment above the last."""
        pts = self.points
        if seq <= pts[0].seq or len(pts) == 1:
            return getattr(pts[0], name)
        i = next((k for k in range(1, len(pts)) if seq <= pts[k].seq), len(pts) - 1)
        a, b = pts[i - 1], pts[i]
        w = (seq - a.seq) / (b.seq - a.seq)
        return getattr(a, name) + w * (getattr(b, name) - getattr(a, name))

    def head_cost(self, seq_len: int) -> float:
        return max(self._at(seq_len, "head_ms"), 1e-9)

    def slice_cost(self, seq_len: int) -> float:
        return max(self._at(seq_len, "slice_ms"), 1e-9)

    def layer_overhead(self, seq_len: int) -> float:
        """Time a kept gated layer costs whatever units it keeps (the selection's compulsory cost)."""
        return max(self._at(seq_len, "layer_ms"), 0.0)

    def fixed(self, seq_len: int) -> float:
        """Time of everything outside the gated layers (embeddings, router, selection, head, engine call)."""
        return max(self._at(seq_len, "fixed_ms"), 0.0)

    def layer_time(self, seq_len: int) -> float:
        """A kept layer with every unit."""
        t = seq_len
        return self.layer_overhead(t) + self.n_heads * self.head_cost(t) + self.n_slices * self.slice_cost(t)

    def dense(self, seq_len: int) -> float:
        """Predicted time of a forward with every gated unit kept."""
        return self.fixed(seq_len) + self.n_gated_layers * self.layer_time(seq_len)

    def predict(self, masks: Any, seq_len: int) -> Tensor:
        """Predicted batch-1 time (ms) of each sample's units: canonical UnitMasks -> (B,) float64."""
        t = seq_len
        layer = masks.layer.double()
        per_layer = (
            self.layer_overhead(t)
            + masks.head.double().sum(-1) * self.head_cost(t)
            + masks.ffn.double().sum(-1) * self.slice_cost(t)
        )
        return self.fixed(t) + (layer * per_layer).sum(-1)

    # -- checks ---------------------------------------------------------------------------------
    def check_model(self, gated: Any) -> None:
        """Raise IncompatibleCostTableError unless this table was measured for ``gated``'s shapes."""
        have = model_signature(gated)
        diff = {k: (self.model.get(k), have[k]) for k in SIGNATURE_KEYS if self.model.get(k) != have[k]}
        if diff:
            detail = ", ".join(f"{k}: table {a!r} vs model {b!r}" for k, (a, b) in diff.items())
            raise IncompatibleCostTableError(
                f"this cost table was measured for another model ({detail}); " + how_to_calibrate()
            )

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "kind": "dynprune-cost-table",
            "engine": self.engine,
            "batch": self.batch,
            "model": dict(self.model),
            "machine": dict(self.machine),
            "points": [asdict(p) for p in self.points],
            "fit": dict(self.fit),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostTable:
        if data.get("kind") != "dynprune-cost-table" or data.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"not a dynprune cost table of format {FORMAT_VERSION} "
                f"(kind {data.get('kind')!r}, format {data.get('format')!r})"
            )
        points = tuple(SeqCosts(**p) for p in data["points"])
        machine, engine = data.get("machine", {}), data.get("engine", "onnxruntime")
        return cls(data["model"], points, machine, engine, data["batch"], data.get("fit", {}))

    def save(self, directory: str | os.PathLike) -> Path:
        from dynprune.io import atomic_write_bytes

        path = Path(directory) / COST_TABLE_JSON
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2).encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CostTable:
        """From a gates directory (its cost_table.json) or the JSON file itself."""
        p = Path(path)
        if p.is_dir():
            p = p / COST_TABLE_JSON
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{p} is not a readable dynprune cost table: {err}") from err


def load_if_present(directory: str | os.PathLike) -> CostTable | None:
    """The gates directory's cost table, or None when it has none."""
    path = Path(directory) / COST_TABLE_JSON
    return CostTable.load(path) if path.is_file() else None


def model_signature(gated: Any) -> dict[str, Any]:
    parts, cfg = gated.parts, gated.gate_config
    return {
        "model_type": parts.spec.family,
        "n_layers": parts.n_layers,
        "n_heads": parts.n_heads,
        "head_dim": parts.head_dim,
        "hidden": parts.hidden,
        "ffn_dim": parts.ffn_dim,
        "ffn_slice_size": cfg.ffn_slice_size,
        "router_layer": cfg.router_layer,
    }


def require_table(gated: Any) -> CostTable:
    """The cost table a millisecond budget needs: attached, and measured for this model."""
    table = getattr(gated, "cost_table", None)
    if table is None:
        raise MissingCostTableError(
            "a millisecond budget needs this machine's cost table, and this gated model has none; "
            + how_to_calibrate()
        )
    table.check_model(gated)
    other = machine_mismatch(table)
    if other:
        warnings.warn(f"dynprune: this cost table was measured {other}; ms budgets may be off", stacklevel=3)
    return table


_HERE: dict[str, str] = {}


def machine_mismatch(table: CostTable) -> str | None:
    """Why the table's machine differs from this process's (CPU model, threads), or None."""
    if not _HERE:
        from dynprune.eval.timing import runtime_env

        _HERE["cpu"] = runtime_env()["cpu"]
    cpu, threads = table.machine.get("cpu"), table.machine.get("threads")
    if cpu is not None and cpu != _HERE["cpu"]:
        return f"on another CPU ({cpu!r}, here {_HERE['cpu']!r})"
    if threads is not None and str(threads) != str(torch.get_num_threads()):
        return f"with {threads} threads (here {torch.get_num_threads()})"
    return None


@dataclass(frozen=True)
class WholeFeed:
    """What the batch-1 whole-forward session (dynprune.exec) is fed for a ms budget."""

    router: float  # the router's budget input
    available: float  # ms for the units (every gated layer's overhead already paid)
    costs: tuple[float, float]  # (head, slice) ms
    full: tuple[int, int]  # (heads, slices) of a full layer

    def accepts(self, counts: Any) -> bool:
        """Whether the session's counts (1, L, 3) are exactly what ``routing.route`` would choose.

        The exported selection has no per-layer overhead, so it was fed ``available`` with every
        layer's overhead paid. That is the same selection when every layer was kept and at least
        one is not full (then no dropped layer was refilled: a refill only starts once every kept
        layer is full); otherwise the caller runs the usual path."""
        c = np.asarray(counts).reshape(-1, 3)
        if self.router >= 1.0:
            return True
        full = (c[:, 1] == self.full[0]) & (c[:, 2] == self.full[1])
        return bool(c[:, 0].all()) and not bool(full.all())


@dataclass(frozen=True)
class TimePricing:
    """A TimeBudget as one forward needs it: ms per input, and the router input if pinned."""

    ms: float
    router: float | None = None

    def whole_feed(self, gated: Any, seq: int) -> WholeFeed | None:
        """The whole-forward session's inputs at length ``seq``; None when the usual path must run
        (the overheads of every gated layer do not fit: its selection drops layers)."""
        from dynprune.routing import time_route

        table, router, available = time_route(gated, self.ms, seq, 1, torch.device("cpu"))
        r = float(router[0]) if self.router is None else self.router
        left = float(available[0]) - table.n_gated_layers * table.layer_overhead(seq)
        if left < 0 and r < 1.0:
            return None
        costs = (table.head_cost(seq), table.slice_cost(seq))
        return WholeFeed(r, max(left, 0.0), costs, (table.n_heads, table.n_slices))


# -- fitting (dynprune bench calibrate) -------------------------------------------------------------
@dataclass(frozen=True)
class LayerTiming:
    """One measured engine call: how many gated layers ran, their total heads and slices, its time."""

    kept_layers: int
    heads: int
    slices: int
    ms: float

    def __post_init__(self) -> None:
        for name in ("kept_layers", "heads", "slices"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"LayerTiming.{name} must be an int >= 0, got {v!r}")
        object.__setattr__(self, "ms", _finite(self.ms, "LayerTiming.ms", 0.0))


def fit_layers(timings: list[LayerTiming]) -> tuple[float, float, float, float, float]:
    """Least squares ``ms = base + layer * kept_layers + head * heads + slice * slices``.

    Returns (base, layer, head, slice, rmse). ``base`` is the engine call with every layer
    skipped. Raises ValueError when the timings cannot determine the four coefficients, or when
    a unit's fitted time is not positive (timings that do not grow with units: a noisy machine)."""
    if len(timings) < 4:
        raise ValueError(f"fit_layers needs at least 4 timings, got {len(timings)}")
    x = np.array([[1.0, t.kept_layers, t.heads, t.slices] for t in timings])
    y = np.array([t.ms for t in timings])
    if np.linalg.matrix_rank(x) < 4:
        raise ValueError(
            "the timings do not separate the layer, head and slice costs: vary the kept layers, "
            "heads and slices independently (and include a call with every layer skipped)"
        )
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    base, layer, head, slc = (float(c) for c in coef)
    if head <= 0 or slc <= 0:
        raise ValueError(
            f"fitted a head at {head:.4g} ms and a slice at {slc:.4g} ms: times did not grow with units "
            "(was the machine busy? calibrate on a quiet machine)"
        )
    rmse = float(np.sqrt(np.mean((x @ coef - y) ** 2)))
    return base, max(layer, 0.0), head, slc, rmse


def fit_fixed(forward_ms: list[float], layers_ms: list[float]) -> float:
    """Time outside the gated layers: median of (measured whole forward - predicted layers)."""
    if not forward_ms or len(forward_ms) != len(layers_ms):
        raise ValueError("fit_fixed needs matching, non-empty lists of forward and layer times")
    return max(float(np.median(np.asarray(forward_ms) - np.asarray(layers_ms))), 0.0)
