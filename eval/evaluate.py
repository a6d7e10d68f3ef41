"""The measurements behind `dynprune eval`: one gated checkpoint at several budgets.

Accuracy/loss and per-sample executed FLOPs come from
:func:`dynprune.train.evaluation.collect` (the training code's evaluation, so
both report the same numbers); gate statistics from
:mod:`dynprune.train.adaptivity`; latency from :mod:`dynprune.eval.latency`
(the checkpoint's own backbone run dense is the reference, in this process).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dynprune.eval.latency import TimingInputs, measure
from dynprune.eval.runners import DenseRunner, GatedRunner
from dynprune.eval.timing import materialize

import dynprune
from dynprune.budget import MeanBudget, TimeBudget, budget_spec
from dynprune.model import GatedModel


def _load_dense(ckpt: Path) -> torch.nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(ckpt / "base")
    arch = (getattr(config, "architectures", None) or ["AutoModelForSequenceClassification"])[0]
    cls = getattr(transformers, arch, transformers.AutoModelForSequenceClassification)
    return materialize(cls.from_pretrained(ckpt / "base").eval())


def evaluate_checkpoint(
    gated: GatedModel, ckpt: Path, tokenizer: Any, examples: list[dict[str, Any]], budgets: list,
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    from dynprune.train.adaptivity import mask_stats
    from dynprune.train.data import Collator, eval_batches
    from dynprune.train.evaluation import collect, summarize

    collate = Collator(tokenizer.pad_token_id, getattr(tokenizer, "padding_side", "right"))
    batches = [collate([examples[i] for i in idx]) for idx in eval_batches(examples, args.batch_size)]
    materialize(gated)
    dense_model = _load_dense(ckpt)
    dense_runner = DenseRunner(dense_model, gated.flops, "dense")
    timing = None
    if not args.no_latency:
        timing = TimingInputs.draw(examples, collate, args.bs1_inputs, args.bs16_batches, seed=0)
    rows: list[dict[str, Any]] = []
    dense_rec = collect(dense_model, batches)
    rows.append({"budget": 1.0, "budget_spec": "1", **_stats(summarize(dense_rec))})
    dense_conf = dense_rec.probs.max(-1)
    for b in budgets:
        fraction = None if isinstance(b, TimeBudget) else b.target if isinstance(b, MeanBudget) else b
        if fraction is not None and fraction >= 1.0:
            continue
        run_as: Any = b
        if getattr(args, "govern", False) and isinstance(b, MeanBudget):
            run_as = dynprune.govern(gated, b)  # batches in a seeded random order: not sorted by length
            order = np.random.default_rng(0).permutation(len(batches))
            rec = collect(gated, [batches[i] for i in order], budget=run_as, keep_masks=True)
            run_as.governor.freeze()  # the timing below runs at the knob it ended on
        else:
            rec = collect(gated, batches, budget=b, keep_masks=True)
        row: dict[str, Any] = {
            "budget": fraction,  # None for a time budget (budget_spec: ms:4)
            "budget_spec": budget_spec(b),
            **_stats(summarize(rec)),
            "compute": where_compute_goes(rec.flops_ratio, rec.lengths, dense_conf),
        }
        if run_as is not b:
            gov = run_as.governor
            row["governor"] = {
                "calibrated_knob": gov.calibrated_knob,
                "final_knob": gov.knob,
                "bias": gov.bias,
            }
        if gated.cost_table is not None and rec.head is not None:
            row.update(predicted_ms(gated.cost_table, rec))
        if rec.head is not None:
            row["gates"] = mask_stats(rec)
            row["keep_rate_per_layer"] = {
                "head": rec.head.mean(axis=(0, 2)).round(4).tolist(),
                "ffn": rec.ffn.mean(axis=(0, 2)).round(4).tolist(),  # type: ignore[union-attr]
                "layer": rec.layer.mean(axis=0).round(4).tolist(),  # type: ignore[union-attr]
            }
        if timing is not None:
            lat = measure(dense_runner, GatedRunner(gated, run_as), timing, warmup=2, repeats=args.repeats)
            for key, value in lat.items():
                row.update(
                    {
                        f"dense_ms_{key}": value.dense_ms,
                        f"latency_ms_{key}": value.method_ms,
                        f"speedup_{key}": value.speedup,
                        f"ideal_speedup_{key}": value.ideal_speedup,
                        f"ratio_to_ideal_{key}": value.ratio_to_ideal,
                    }
                )
        if args.export_frozen is not None:
            row["frozen_export"] = _export_frozen(gated, ckpt, tokenizer, rec, b, batches, args.export_frozen)
        rows.append(row)
    return {"checkpoint": str(ckpt), "n_examples": len(examples), "rows": rows}


def predicted_ms(table: Any, rec: Any) -> dict[str, float]:
    """The cost table's predicted batch-1 time of each input's units at its own length: mean, p5, p95."""
    from dynprune.gates import UnitMasks

    t = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
    pred = np.array(
        [
            float(
                table.predict(
                    UnitMasks(t(rec.head[i : i + 1]), t(rec.ffn[i : i + 1]), t(rec.layer[i : i + 1])), int(n)
                )[0]
            )
            for i, n in enumerate(rec.lengths)
        ]
    )
    q5, q95 = np.quantile(pred, [0.05, 0.95])
    return {
        "predicted_ms_mean": float(pred.mean()),
        "predicted_ms_p5": float(q5),
        "predicted_ms_p95": float(q95),
    }


def _stats(s: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "loss", "flops_ratio_mean", "flops_ratio_p5", "flops_ratio_p50", "flops_ratio_p95")
    return {k: s.get(k) for k in (*keys, "flops_mean")}


def where_compute_goes(ratio: np.ndarray, lengths: np.ndarray, dense_conf: np.ndarray) -> dict[str, Any]:
    """Mean executed FLOPs ratio per quartile of input length and of the dense model's confidence
    (lowest quartile first), and the rank correlations with both."""

    def by_quartile(key: np.ndarray) -> list[float]:
        edges = np.quantile(key, [0.25, 0.5, 0.75])
        q = np.searchsorted(edges, key, side="right")  # (N,) in 0..3
        return [round(float(ratio[q == i].mean()), 4) if (q == i).any() else float("nan") for i in range(4)]

    def spearman(key: np.ndarray) -> float:
        a, b = np.argsort(np.argsort(key)), np.argsort(np.argsort(ratio))
        if a.std() == 0 or b.std() == 0:
            return 0.0
        return round(float(np.corrcoef(a, b)[0, 1]), 4)

    return {
        "flops_by_length_quartile": by_quartile(lengths),
        "flops_by_dense_confidence_quartile": by_quartile(dense_conf),
        "spearman_flops_length": spearman(lengths),
        "spearman_flops_dense_confidence": spearman(dense_conf),
    }


def _onnx_session(model: torch.nn.Module, directory: Path) -> Any:
    """The frozen model also as a plain ONNX file (``directory/model.onnx``, inputs ``input_ids`` and
    ``attention_mask``, output ``logits``) and an ONNX Runtime session of it; None without the extra."""
    from dynprune.eval.onnx_export import export_onnx, ort_session

    from dynprune.exec import ort_available

    if not ort_available():
        return None
    export_onnx(model, path=directory / "model.onnx")
    return ort_session(directory / "model.onnx", threads=torch.get_num_threads())


def _export_frozen(
    gated: GatedModel, ckpt: Path, tokenizer: Any, rec: Any, budget: float, batches: list, root: Path
) -> dict[str, Any]:
    """Freeze to the most common mask at ``budget``, export it, reload it and measure its accuracy."""
    from dynprune.eval.export import export_static, frozen_structure, load_pruned

    p = gated.parts
    structure, share = frozen_structure(
        rec.head, rec.ffn, rec.layer, gated.head_perm.cpu(), gated.ffn_perm.cpu(),
        gated.gate_config.ffn_slice_size, p.n_layers, p.n_heads, p.ffn_dim,
    )  # fmt: skip
    plain = _load_dense(ckpt)  # original unit order: the structure is in original indices
    info = export_static(plain, structure, root / f"budget_{budget_spec(budget)}", tokenizer)
    model = load_pruned(info.directory)
    onnx = _onnx_session(model, info.directory)
    correct = n = agree = 0
    max_diff = 0.0
    with torch.inference_mode():
        for batch in batches:
            inputs = {
                k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")
            }
            logits = model(**inputs).logits
            pred = logits.argmax(-1)
            correct += int((pred == batch["labels"]).sum())
            n += pred.shape[0]
            if onnx is not None:  # the plain ONNX model must give the same predictions
                feed = {i.name: inputs[i.name].numpy() for i in onnx.get_inputs()}
                ort_logits = torch.from_numpy(onnx.run(None, feed)[0])
                agree += int((ort_logits.argmax(-1) == pred).sum())
                max_diff = max(max_diff, float((ort_logits - logits).abs().max()))
    seq = int(np.median([b["input_ids"].shape[1] for b in batches]))
    onnx_row = (
        {
            "onnx": str(info.directory / "model.onnx"),
            "onnx_agreement": agree / n,
            "onnx_max_abs_logit_diff": max_diff,
        }
        if onnx is not None
        else {"onnx": None}
    )
    return {
        **onnx_row,
        "directory": str(info.directory),
        "mask_share": share,
        "accuracy": correct / n,
        "flops_ratio_at_median_length": structure.flops_ratio(gated.flops, seq),
        "structure": structure.summary(),
        "stock_hf_loadable": info.stock_loadable,
        "why_not_stock": info.reason,
        "weights_bytes": info.weights_bytes,
    }


def print_table(results: dict[str, Any]) -> str:
    head = (
        f"{'budget':>17} {'acc%':>6} {'loss':>6} {'flops mean [p5,p50,p95]':>28} "
        f"{'bs1 ms (dense)':>15} {'x (ideal)':>12} {'bs16 ms (dense)':>16} {'x (ideal)':>12}  gates"
    )
    lines = [f"{results['checkpoint']}: {results['n_examples']} examples", head, "-" * len(head)]
    for r in results["rows"]:
        f = (
            f"{r['flops_ratio_mean']:.3f} [{r['flops_ratio_p5']:.3f},"
            f"{r.get('flops_ratio_p50') or r['flops_ratio_mean']:.3f},{r['flops_ratio_p95']:.3f}]"
        )
        lat = []
        for key in ("bs1", "bs16"):
            if f"latency_ms_{key}" in r:
                lat.append(f"{r[f'latency_ms_{key}']:.1f} ({r[f'dense_ms_{key}']:.1f})")
                lat.append(f"{r[f'speedup_{key}']:.2f} ({r[f'ideal_speedup_{key}']:.2f})")
            else:
                lat += ["-", "-"]
        g = r.get("gates")
        gates = (
            f"{g['distinct_masks']} masks, hamming {g['hamming_frac']:.3f}, "
            f"layers {g['kept_layers_mean']:.1f} heads {g['kept_heads_mean']:.0f} slices {g['kept_slices_mean']:.0f}"
            if g
            else "dense"
        )
        lines.append(
            f"{r.get('budget_spec', r['budget']):>17} {100 * r['accuracy']:>6.2f} {r['loss']:>6.3f} {f:>28} "
            f"{lat[0]:>15} {lat[1]:>12} {lat[2]:>16} {lat[3]:>12}  {gates}"
        )
        if "predicted_ms_mean" in r:
            lines.append(
                f"{'':>17} predicted batch-1 ms (cost table) mean {r['predicted_ms_mean']:.2f} "
                f"[p5 {r['predicted_ms_p5']:.2f}, p95 {r['predicted_ms_p95']:.2f}]"
            )
        c = r.get("compute")
        if c:
            lines.append(
                f"{'':>17} FLOPs by length quartile {c['flops_by_length_quartile']}, by dense confidence "
                f"quartile {c['flops_by_dense_confidence_quartile']}"
            )
        if "frozen_export" in r:
            e = r["frozen_export"]
            lines.append(
                f"{'':>6} frozen to its most common mask ({e['mask_share']:.0%} of inputs): acc "
                f"{100 * e['accuracy']:.2f}%, exported to {e['directory']}"
                + ("" if e["stock_hf_loadable"] else " (load with dynprune.eval.export.load_pruned)")
            )
    return "\n".join(lines)
