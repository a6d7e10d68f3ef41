"""Evaluate a dense HF model or a GatedModel: accuracy, loss, per-sample executed FLOPs.

FLOPs come from the one FLOPs module (``GatedModel.last.flops`` for gated
models, ``FlopsModel.dense`` for plain supported models) and are counted per
sample at the batch's padded length, which is what runs. Evaluation batches
are sorted by length, so that padding is small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from dynprune.train.data import DataError, model_inputs

from dynprune.budget import MeanBudget, TimeBudget
from dynprune.calibration import GovernedMean
from dynprune.model import GatedModel


@dataclass
class Records:
    """Per-sample results in split order (index 0..N-1)."""

    labels: np.ndarray  # (N,) int
    preds: np.ndarray  # (N,) int
    loss: np.ndarray  # (N,) float
    probs: np.ndarray  # (N, C) float
    flops: np.ndarray  # (N,) float64, executed (nan if unknown)
    dense_flops: np.ndarray  # (N,) float64, at the same padded length (nan if unknown)
    lengths: np.ndarray  # (N,) int, real tokens
    budget: float | str | None  # a cap, or a mean budget's spec ("mean:0.25")
    head: np.ndarray | None = None  # (N, L, n_heads) bool masks, gated hard runs only
    ffn: np.ndarray | None = None  # (N, L, n_slices)
    layer: np.ndarray | None = None  # (N, L)

    @property
    def flops_ratio(self) -> np.ndarray:
        return self.flops / self.dense_flops


def _dense_flops_fn(model: torch.nn.Module):
    """seq_len -> dense FLOPs per sample, for models the arch table knows (else None)."""
    try:
        from dynprune.arch import resolve
        from dynprune.flops import build_flops_model

        parts = resolve(model)
        fm = build_flops_model(model, parts, parts.ffn_dim)
    except Exception:
        return None
    return fm.dense


@torch.no_grad()
def collect(
    model: torch.nn.Module,
    dataloader,
    budget: float | MeanBudget | GovernedMean | TimeBudget | None = None,
    keep_masks: bool = False,
    progress: bool = False,
    execution: str | None = None,
) -> Records:
    """Run ``model`` over ``dataloader`` (batches from :func:`dynprune.train.data.make_dataloader`).

    ``execution``: for a GatedModel, the path of this call (``GatedModel.running``;
    "gathered": only kept units run, as served; "masked": the training path with
    the same hard masks; None: the model's own ``GateConfig.execution``).
    """
    gated = isinstance(model, GatedModel)
    if (
        budget is not None
        and not gated
        and (isinstance(budget, (MeanBudget, GovernedMean, TimeBudget)) or float(budget) != 1.0)
    ):
        raise ValueError(
            f"budget={budget} needs a GatedModel (dynprune.wrap); a plain model runs dense (1.0)"
        )
    dense_fn = None if gated else _dense_flops_fn(model)
    was_training = model.training
    model.eval()
    rows: dict[str, list] = {k: [] for k in ("index", "labels", "loss", "probs", "flops", "dense", "len")}
    masks: dict[str, list] = {"head": [], "ffn": [], "layer": []}
    iterator = dataloader
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(dataloader, desc=f"eval b={budget}", leave=False)
    try:
        for batch in iterator:
            inputs = model_inputs(batch)
            if gated:
                with model.running(execution=execution):
                    out = model(**inputs, budget=budget)
            else:
                out = model(**inputs)
            logits = out.logits.float()
            labels = batch["labels"]
            if labels.numel() and int(labels.max()) >= logits.shape[-1]:
                raise DataError(
                    f"label id {int(labels.max())} but the model has {logits.shape[-1]} classes: "
                    "the data has labels the model was never trained on"
                )
            seq = inputs["input_ids"].shape[1]
            n = labels.shape[0]
            if gated:
                info = model.last
                rows["flops"].append(info.flops.double().cpu())
                rows["dense"].append(torch.full((n,), float(info.dense_flops), dtype=torch.float64))
                if keep_masks and info.masks is not None:
                    for k in masks:
                        masks[k].append(getattr(info.masks, k).cpu())
            else:
                d = float("nan") if dense_fn is None else float(dense_fn(seq))
                rows["flops"].append(torch.full((n,), d, dtype=torch.float64))
                rows["dense"].append(torch.full((n,), d, dtype=torch.float64))
            rows["index"].append(batch["index"])
            rows["labels"].append(labels)
            rows["loss"].append(F.cross_entropy(logits, labels, reduction="none"))
            rows["probs"].append(logits.softmax(-1))
            rows["len"].append(
                inputs["attention_mask"].sum(1) if "attention_mask" in inputs else torch.full((n,), seq)
            )
    finally:
        model.train(was_training)
    if not rows["index"]:
        raise DataError("evaluation data is empty")
    order = torch.argsort(torch.cat(rows["index"]))
    cat = {k: torch.cat(v)[order].numpy() for k, v in rows.items() if k != "index"}
    rec = Records(
        labels=cat["labels"],
        preds=cat["probs"].argmax(-1),
        loss=cat["loss"],
        probs=cat["probs"],
        flops=cat["flops"],
        dense_flops=cat["dense"],
        lengths=cat["len"],
        budget=None
        if budget is None
        else (budget.spec if isinstance(budget, (MeanBudget, GovernedMean, TimeBudget)) else float(budget)),
    )
    if keep_masks and masks["layer"]:
        rec.head, rec.ffn, rec.layer = (torch.cat(masks[k])[order].numpy() for k in ("head", "ffn", "layer"))
    return rec


def summarize(rec: Records) -> dict[str, float | int | None]:
    """Accuracy, loss and FLOPs statistics of collected records."""
    ratio = rec.flops_ratio
    out: dict[str, float | int | None] = {
        "n": len(rec.labels),
        "accuracy": float((rec.preds == rec.labels).mean()),
        "loss": float(rec.loss.mean()),
        "budget": rec.budget,
        "flops_mean": float(rec.flops.mean()),
        "dense_flops_mean": float(rec.dense_flops.mean()),
    }
    if np.isfinite(ratio).all():
        out.update(
            flops_ratio_mean=float(ratio.mean()),
            # FLOPs-weighted: total executed / total dense (what a batch of this data costs)
            flops_ratio_total=float(rec.flops.sum() / rec.dense_flops.sum()),
            flops_ratio_min=float(ratio.min()),
            flops_ratio_p5=float(np.percentile(ratio, 5)),
            flops_ratio_p50=float(np.percentile(ratio, 50)),
            flops_ratio_p95=float(np.percentile(ratio, 95)),
            flops_ratio_max=float(ratio.max()),
        )
    return out


def evaluate(model_or_gated: torch.nn.Module, dataloader, budget: float | None = None) -> dict:
    """Accuracy, mean loss and per-sample FLOPs stats of a model over a dataloader.

    ``model_or_gated``: a plain HF sequence-classification model (runs dense;
    ``budget`` must be None) or a :class:`dynprune.GatedModel` (``budget``: a
    fraction of dense FLOPs in (0, 1]; None = its default budget). The model
    is put in eval mode for the call (a GatedModel then runs hard gates on its
    gathered path, exactly as served) and restored afterwards.
    Returns {"n", "accuracy", "loss", "budget", "flops_mean", "dense_flops_mean",
    "flops_ratio_mean", "flops_ratio_total", "flops_ratio_min", "flops_ratio_p5",
    "flops_ratio_p50", "flops_ratio_p95", "flops_ratio_max"} (ratios only when FLOPs are known).
    """
    return summarize(collect(model_or_gated, dataloader, budget))
