"""How input-adaptive are the gates? Statistics of per-sample hard masks at one budget.

- mean pairwise Hamming distance between the samples' unit masks (heads,
  FFN slices and layers of the gated layers, flattened): sum over units of
  k (N - k) / (N (N - 1) / 2), with k the number of samples keeping the unit;
  0 for a static mask;
- per-unit keep rates (fraction of samples that keep each unit): a static
  router gives only 0 and 1, an adaptive one values in between;
- FLOPs and allocation on groups of inputs: short vs long (split at the
  median token count; below it when every length ties at or under it, as when
  most texts are truncated to the same length), easy vs hard (by the dense model's probability of the
  true label: top vs bottom quartile).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from dynprune.train.evaluation import Records


def flat_masks(rec: Records) -> np.ndarray:
    """(N, U) bool: heads, then slices, then layers of every gated layer."""
    if rec.head is None or rec.ffn is None or rec.layer is None:
        raise ValueError("these records have no masks (collect(..., keep_masks=True) on a gated model)")
    n = rec.head.shape[0]
    return np.concatenate([rec.head.reshape(n, -1), rec.ffn.reshape(n, -1), rec.layer.reshape(n, -1)], axis=1)


def mean_pairwise_hamming(masks: np.ndarray) -> float:
    n = masks.shape[0]
    if n < 2:
        return 0.0
    k = masks.sum(0).astype(np.float64)
    return float((k * (n - k)).sum() / (n * (n - 1) / 2))


def keep_rates(rec: Records) -> dict[str, np.ndarray]:
    assert rec.head is not None and rec.ffn is not None and rec.layer is not None
    return {"head": rec.head.mean(0), "ffn": rec.ffn.mean(0), "layer": rec.layer.mean(0)}


def mask_stats(rec: Records) -> dict[str, float]:
    m = flat_masks(rec)
    rates = m.mean(0)
    distinct = len({row.tobytes() for row in np.packbits(m, axis=1)})
    return {
        "units": m.shape[1],
        "hamming_mean": mean_pairwise_hamming(m),
        "hamming_frac": mean_pairwise_hamming(m) / m.shape[1],
        "adaptive_units_frac": float(((rates > 0) & (rates < 1)).mean()),
        "distinct_masks": distinct,
        "kept_layers_mean": float(rec.layer.sum(1).mean()),  # type: ignore[union-attr]
        "kept_heads_mean": float(rec.head.sum((1, 2)).mean()),  # type: ignore[union-attr]
        "kept_slices_mean": float(rec.ffn.sum((1, 2)).mean()),  # type: ignore[union-attr]
    }


def group_stats(rec: Records, groups: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per named boolean group: size, accuracy, FLOPs ratio and absolute FLOPs, allocation."""
    rows = []
    for name, sel in groups.items():
        if not sel.any():
            continue
        row: dict[str, Any] = {
            "group": name,
            "n": int(sel.sum()),
            "tokens_mean": float(rec.lengths[sel].mean()),
            "accuracy": float((rec.preds[sel] == rec.labels[sel]).mean()),
            "flops_ratio_mean": float(rec.flops_ratio[sel].mean()),
            "mflops_mean": float(rec.flops[sel].mean() / 1e6),
        }
        if rec.layer is not None and rec.head is not None and rec.ffn is not None:
            row.update(
                kept_layers=float(rec.layer[sel].sum(1).mean()),
                kept_heads=float(rec.head[sel].sum((1, 2)).mean()),
                kept_slices=float(rec.ffn[sel].sum((1, 2)).mean()),
                hamming_frac=mean_pairwise_hamming(flat_masks(rec)[sel]) / flat_masks(rec).shape[1],
            )
        rows.append(row)
    return rows


def input_groups(rec: Records, dense: Records | None) -> dict[str, np.ndarray]:
    med = np.median(rec.lengths)
    short = rec.lengths <= med
    if short.all():  # ties at the median (most texts truncated to the same length): split below it
        short = rec.lengths < med
    groups = {"all": np.ones(len(rec.labels), bool), "short": short, "long": ~short}
    if dense is not None:
        p_true = dense.probs[np.arange(len(dense.labels)), dense.labels]
        lo, hi = np.percentile(p_true, [25, 75])
        groups["easy (dense p(y) top 25%)"] = p_true >= hi
        groups["hard (dense p(y) bottom 25%)"] = p_true <= lo
    return groups


def plot_keep_rates(curves: dict[str, dict[float, Records]], path: Path) -> None:
    """Histogram of per-unit keep rates (one panel per model, one line per budget) + a layer heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 7.5), squeeze=False)
    bins = np.linspace(0, 1, 21)
    for col, name in enumerate(names):
        ax = axes[0][col]
        for budget, rec in sorted(curves[name].items()):
            rates = flat_masks(rec).mean(0)
            ax.hist(rates, bins=bins, histtype="step", linewidth=1.8, label=f"budget {budget:g}")
        ax.set_title(f"{name}: per-unit keep rate over inputs")
        ax.set_xlabel("fraction of inputs that keep the unit")
        ax.set_ylabel("units (heads + FFN slices + layers)")
        ax.set_yscale("log")
        ax.legend()
        budget, rec = sorted(curves[name].items())[len(curves[name]) // 2]
        r = keep_rates(rec)
        grid = np.concatenate([r["head"], np.full((r["head"].shape[0], 1), np.nan), r["ffn"]], axis=1)
        ax2 = axes[1][col]
        im = ax2.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        n_heads = r["head"].shape[1]
        ax2.set_title(f"{name}, budget {budget:g}: keep rate per unit (heads | FFN slices)")
        ax2.set_xlabel(f"unit (0-{n_heads - 1}: heads in importance order, then FFN slices)")
        ax2.set_ylabel("gated layer")
        fig.colorbar(im, ax=ax2, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training_curves(
    metrics_jsonl: Path, path: Path, stages: tuple[str, ...] = ("gated", "static")
) -> bool:
    """Expected vs target FLOPs ratio, loss parts, multipliers/temperature and validation accuracy
    over the steps of the gated stages (from logs/metrics.jsonl). Returns False if nothing to plot."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_jsonl.is_file():
        return False
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    by_stage = {s: [r for r in rows if r.get("stage") == s] for s in stages}
    by_stage = {s: r for s, r in by_stage.items() if any("expected_ratio" in x for x in r)}
    if not by_stage:
        return False
    fig, axes = plt.subplots(len(by_stage), 4, figsize=(20, 4.2 * len(by_stage)), squeeze=False)
    for row, (stage, rs) in enumerate(by_stage.items()):
        train = sorted({r["step"]: r for r in rs if "expected_ratio" in r}.values(), key=lambda r: r["step"])
        val = sorted(
            {r["step"]: r for r in rs if any(k.startswith("val_accuracy@") for k in r)}.values(),
            key=lambda r: r["step"],
        )
        step = [r["step"] for r in train]
        ax = axes[row][0]
        for key, label in (
            ("expected_ratio", "expected (router probabilities)"),
            ("target_ratio", "target"),
            ("flops_ratio", "executed in training"),
        ):
            ax.plot(step, [r[key] for r in train], label=label)
        ax.set_title(f"{stage}: FLOPs ratio (batch mean)")
        ax.set_xlabel("step")
        ax.legend()
        ax = axes[row][1]
        for key in ("loss_task", "loss_kd", "loss_reg", "abs_gap"):
            if key in train[0]:
                ax.plot(step, [r[key] for r in train], label=key)
        ax.set_title(f"{stage}: loss parts, |expected - target|")
        ax.set_xlabel("step")
        ax.legend()
        ax = axes[row][2]
        ax.plot(step, [r["lambda1"] for r in train], label="lambda1")
        ax.plot(step, [r["lambda2"] for r in train], label="lambda2")
        ax.set_xlabel("step")
        ax2 = ax.twinx()
        ax2.plot(step, [r["temperature"] for r in train], "k--", label="temperature")
        ax2.set_ylabel("temperature")
        ax.set_title(f"{stage}: multipliers (left), temperature (right, dashed)")
        ax.legend(loc="upper left")
        ax = axes[row][3]
        keys = sorted({k for r in val for k in r if k.startswith("val_accuracy@")})
        for key in keys:
            ax.plot(
                [r["step"] for r in val],
                [100 * r[key] for r in val],
                marker="o",
                label=key.removeprefix("val_"),
            )
        ax.set_title(f"{stage}: validation accuracy (%)")
        ax.set_xlabel("step")
        if keys:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
