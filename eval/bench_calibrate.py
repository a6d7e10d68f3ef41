"""`dynprune bench calibrate --checkpoint DIR`: measure this machine's cost table for ms budgets.

What it times, at batch 1, for every ``--seqs`` length T, on the engine that runs the gated
layers (the ONNX Runtime session of ``dynprune.exec``, whose per-layer head / slice counts and
layer keeps are inputs, so any count vector is one call):

1. **the layers** — the session alone on random hidden states: every layer skipped, and every
   layer kept with the same head / slice counts over a grid (``--grid``); one least-squares fit
   ``ms = base + layer * kept_layers + head * heads + slice * slices`` per T
   (:func:`dynprune.cost_model.fit_layers`); ``--validate`` random count vectors (random keeps
   and counts per layer) are timed too and only *predicted*: their error is the fit's held-out
   error, saved in the table;
2. **the rest of a forward** — whole gated forwards on real reviews packed to T tokens under ms
   budgets (the path every ms budget runs: at batch 1 the engine's whole-forward session), one per
   FLOPs budget in ``--budgets`` (the predicted layer time of its choice, the router reading that
   budget); ``fixed`` = median of (measured forward - predicted layers): embeddings, router,
   selection, task head, the engine call.

Every variant is timed in interleaved rounds, each a block of 3 back-to-back calls after one
untimed call (eval/timing.py ``time_blocks``: a steady stream of inputs with the same units, as a
batch-1 server sees at one budget; medians); threads = ``--threads``
for torch and the engine. The table (``CostTable``: coefficients per T, the machine, versions,
threads, held-out errors) is written to ``DIR/gates/cost_table.json`` (or ``--out``), where
``load_gated_model`` finds it. Calibrate on a quiet machine: a busy one gives a table that
prices its own noise.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dynprune.eval.timing import runtime_env, time_blocks

from dynprune.budget import TimeBudget
from dynprune.cost_model import CostTable, LayerTiming, SeqCosts, fit_fixed, fit_layers, model_signature

#: relative error of held-out timings above which the table is flagged as measured on a busy machine
NOISY = 0.10


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynprune bench calibrate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="a gated model saved by save_gated_model")
    p.add_argument("--out", type=Path, help="directory for cost_table.json (default: DIR/gates)")
    p.add_argument("--seqs", type=int, nargs="+", default=[16, 32, 64, 128], help="sequence lengths")
    p.add_argument("--grid", type=int, default=4, help="head / slice counts per axis of the grid (default 4)")
    p.add_argument("--validate", type=int, default=8, help="random count vectors per T, held out (default 8)")
    p.add_argument(
        "--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="FLOPs budgets for fixed"
    )
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (default 9)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _grid(n: int, points: int) -> list[int]:
    return sorted({round(i * n / (points - 1)) for i in range(points)})


def _reviews(tokenizer: Any, seq: int) -> dict[str, torch.Tensor]:
    """One batch-1 input of exactly ``seq`` tokens from Rotten Tomatoes test reviews (no padding)."""
    from dynprune.assets import rotten_tomatoes_split

    ids: list[int] = []
    for text, _ in rotten_tomatoes_split()["test"]:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= seq:
            break
    row = [tokenizer.cls_token_id, *ids[: seq - 2], tokenizer.sep_token_id]
    return {"input_ids": torch.tensor([row]), "attention_mask": torch.ones(1, seq, dtype=torch.long)}


def measure_layers(layers: Any, seq: int, args: Any, rng: np.random.Generator) -> tuple[list, list]:
    """(fit timings, held-out timings) of the engine's session at batch 1 x ``seq``."""
    sess = layers.warm()
    n_layers, n_heads, n_slices = len(layers.layers), layers.n_heads, layers.n_slices
    hidden = layers.gated.parts.hidden
    x = rng.standard_normal((1, seq, hidden)).astype(np.float32)
    mask = np.ones((1, seq), dtype=np.int32)
    configs: dict[str, np.ndarray] = {"skip": np.zeros((n_layers, 3), dtype=np.int64)}
    for h in _grid(n_heads, args.grid):
        for s in _grid(n_slices, args.grid):
            configs[f"grid_{h}_{s}"] = np.tile(np.array([1, h, s], dtype=np.int64), (n_layers, 1))
    for i in range(args.validate):
        keep = rng.random(n_layers) < 0.8
        c = np.stack(
            [keep, rng.integers(0, n_heads + 1, n_layers), rng.integers(0, n_slices + 1, n_layers)], 1
        )
        c[~keep] = 0
        configs[f"val_{i}"] = c.astype(np.int64)
    if not layers.layer_gates:  # layer keeps are not inputs: every layer runs
        configs = {k: v for k, v in configs.items() if bool(v[:, 0].all())}
    feeds = {k: layers._feed(x, mask, c) for k, c in configs.items()}
    fns = {k: (lambda f=f: sess.run(None, f)) for k, f in feeds.items()}
    stats = time_blocks(fns, warmup=args.warmup, repeats=args.repeats, block=3, pause_s=0.0)
    fit, held = [], []
    for k, c in configs.items():
        kept = c[:, 0].astype(bool)
        t = LayerTiming(int(kept.sum()), int(c[kept, 1].sum()), int(c[kept, 2].sum()), stats[k].median_ms)
        (held if k.startswith("val_") else fit).append(t)
    return fit, held


def measure_forward(gated: Any, inputs: dict, args: Any, layers_of: Any) -> list[tuple[float, Any]]:
    """(median ms, masks) of whole gated forwards under ms budgets, the path every ms budget runs:
    for each FLOPs budget b, ``TimeBudget(layers_of(its masks), router=b)`` (``gated.cost_table``
    is the provisional table, ``fixed`` = 0)."""
    budgets = []
    with torch.inference_mode():
        for b in args.budgets:
            gated(**inputs, budget=b)
            budgets.append(TimeBudget(max(layers_of(gated.last.masks), 1e-6), router=b))
        masks = []
        for tb in budgets:
            gated(**inputs, budget=tb)
            masks.append(gated.last.masks)
    fns = {i: (lambda tb=tb: gated(**inputs, budget=tb)) for i, tb in enumerate(budgets)}
    stats = time_blocks(fns, warmup=args.warmup, repeats=args.repeats, block=3, pause_s=0.0)
    return [(stats[i].median_ms, masks[i]) for i in range(len(budgets))]


def _layers_ms(m: Any, layer: float, head: float, slc: float) -> float:
    """Predicted gated-layer time (ms) of batch-1 masks ``m`` under one length's coefficients."""
    per_layer = layer + m.head.double().sum(-1) * head + m.ffn.double().sum(-1) * slc
    return float((m.layer.double() * per_layer).sum())


def calibrate(gated: Any, tokenizer: Any, args: Any) -> CostTable:
    from dynprune.exec import engine_for

    engine = engine_for(gated, torch.device("cpu"))
    if engine is None:
        raise SystemExit(
            "dynprune bench calibrate: the ONNX Runtime engine cannot run this model (or is not installed: "
            "pip install 'dynprune[onnx]'); ms budgets price that engine's time"
        )
    rng = np.random.default_rng(args.seed)
    machine = machine_info(args.threads)
    fits, held_errors = {}, {}
    for seq in args.seqs:  # 1. the layers, on the engine's session alone
        fit, held = measure_layers(engine.layers, seq, args, rng)
        base, layer, head, slc, rmse = fit_layers(fit)
        fits[seq] = (layer, head, slc, rmse)
        pred = [base + layer * t.kept_layers + head * t.heads + slc * t.slices for t in held]
        errors = [abs(p / t.ms - 1) for p, t in zip(pred, held)]
        held_errors[str(seq)] = {
            "layers_rel_error_median": float(np.median(errors)) if errors else None,
            "layers_rel_error_max": float(np.max(errors)) if errors else None,
            "engine_call_skip_all_ms": round(base, 4),
        }
    signature = model_signature(gated)
    gated.cost_table = CostTable(  # provisional: nothing outside the layers yet
        signature, tuple(SeqCosts(t, 0.0, *fits[t]) for t in args.seqs), machine
    )
    points = []
    for seq in args.seqs:  # 2. whole forwards under ms budgets: the rest of the forward
        layer, head, slc, rmse = fits[seq]
        layers_of = partial(_layers_ms, layer=layer, head=head, slc=slc)
        forwards = measure_forward(gated, _reviews(tokenizer, seq), args, layers_of)
        fixed = fit_fixed([ms for ms, _ in forwards], [layers_of(m) for _, m in forwards])
        points.append(SeqCosts(seq, fixed, layer, head, slc, rmse))
        fwd_err = [(fixed + layers_of(m)) / ms - 1 for ms, m in forwards]
        held_errors[str(seq)]["forward_rel_error"] = [round(e, 4) for e in fwd_err]
        print(
            f"T={seq:4d}: fixed {fixed:.3f} ms, layer {layer:.4f}, head {head:.4f}, slice {slc:.4f} ms "
            f"(fit rmse {rmse:.3f} ms; held-out layers error median "
            f"{held_errors[str(seq)]['layers_rel_error_median']:.1%}; forward error "
            + ", ".join(f"{e:+.1%}" for e in fwd_err)
            + ")",
            flush=True,
        )
    noisy = [
        seq
        for seq, e in held_errors.items()
        if (e["layers_rel_error_median"] or 0) > NOISY or max(map(abs, e["forward_rel_error"])) > NOISY
    ]
    if noisy:
        print(
            f"WARNING: at T = {', '.join(noisy)} the held-out layer timings or the forwards are off the fit by "
            f"more than {NOISY:.0%}: the machine was probably busy; calibrate again on a quiet machine",
            flush=True,
        )
    settings = {
        "noisy_seqs": noisy,
        "grid": args.grid,
        "repeats": args.repeats,
        "budgets": args.budgets,
        "held_out": held_errors,
    }
    return CostTable(signature, tuple(points), machine, "onnxruntime", 1, settings)


def machine_info(threads: int) -> dict[str, str]:
    """What the table's times depend on: CPU, threads, versions, when."""
    import onnxruntime

    import dynprune

    env = runtime_env()
    return {
        "cpu": env["cpu"],
        "logical_cpus": env["logical_cpus"],
        "threads": str(threads),
        "torch": env["torch"],
        "onnxruntime": onnxruntime.__version__,
        "dynprune": dynprune.__version__,
        "python": env["python"],
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads < 1:
        raise SystemExit(f"dynprune bench calibrate: --threads must be >= 1, got {args.threads}")
    if args.grid < 2 or args.repeats < 1 or args.validate < 0 or any(t < 2 for t in args.seqs):
        raise SystemExit(
            "dynprune bench calibrate: need --grid >= 2, --repeats >= 1, --validate >= 0, seqs >= 2"
        )
    from dynprune.eval.timing import load_for_timing

    start = time.perf_counter()
    gated, tokenizer = load_for_timing(
        args.checkpoint, args.threads, "dynprune bench calibrate", args.budgets
    )
    if tokenizer is None:
        raise SystemExit(f"dynprune bench calibrate: {args.checkpoint}/base has no tokenizer")
    table = calibrate(gated, tokenizer, argparse.Namespace(**{**vars(args), "seqs": sorted(set(args.seqs))}))
    out = table.save(args.out if args.out is not None else Path(args.checkpoint) / "gates")
    print(f"wrote {out} ({time.perf_counter() - start:.0f} s; machine: {table.machine['cpu']}, "
          f"{args.threads} threads)")  # fmt: skip
    return 0
