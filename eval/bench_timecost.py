"""`dynprune bench timecost`: what pricing units by measured time buys at batch 1.

One gated checkpoint with a cost table (``dynprune bench calibrate``), the same router, two
pricings of the one selection:

- **FLOPs-priced**: ``budget=b`` (a fraction of dense FLOPs; units priced by FLOPs);
- **time-priced**: ``budget=TimeBudget(ms)`` with ``ms`` = the cost table's predicted time of the
  FLOPs-priced choice *for the same input*: the same predicted time, units priced by measured time;
  the router reads the FLOPs budget derived from ``ms`` (docs/cpu_engine.md), which is not ``b``;
- **time-priced, same router input** (``time_r``): ``TimeBudget(ms, router=b)``: the router reads
  ``b`` as in the FLOPs-priced run, so only the pricing differs.

``--part speed`` (run it on a quiet machine): for every length in ``--seqs``, one review packed to
that many tokens, both pricings and the dense forward (budget 1.0, same engine) timed side by side
at batch 1 (eval/timing.py ``time_blocks``: interleaved rounds, a block of back-to-back calls per
variant, medians; ratios are medians of paired per-round ratios): measured ms, predicted ms, FLOPs.

``--part accuracy``: the first ``--examples`` test reviews at batch 1, natural lengths, both
pricings per example: accuracy, mean executed FLOPs, mean predicted ms, and how many examples the
two pricings answer differently (no timing: any machine).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

import torch
from dynprune.eval.timing import paired_ratio, runtime_env, time_blocks

from dynprune.budget import TimeBudget


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynprune bench timecost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="a gated model with gates/cost_table.json")
    p.add_argument("--part", choices=["speed", "accuracy"], required=True)
    p.add_argument("--out", type=Path, help="CSV to write (a markdown summary goes next to it)")
    p.add_argument(
        "--budgets", type=float, nargs="+", default=[0.25, 0.5], help="FLOPs budgets (default 0.25 0.5)"
    )
    p.add_argument("--seqs", type=int, nargs="+", default=[16, 32, 64, 128], help="speed: lengths")
    p.add_argument("--ms", type=float, nargs="*", default=[4.0, 6.0], help="speed: fixed ms budgets to land")
    p.add_argument("--repeats", type=int, default=15, help="speed: timed rounds (default 15)")
    p.add_argument("--examples", type=int, default=1275, help="accuracy: test reviews (default all 1275)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--path", choices=["default", "torch"], default="default",
                   help="accuracy: torch = the PyTorch gathered path (same units, no session builds)")  # fmt: skip
    return p


def _pair(gated: Any, inputs: dict, budget: float) -> dict[str, Any]:
    """Both pricings of one input: {pricing: (budget object, masks, FLOPs ratio, predicted ms, answer)};
    ``time_r``: time-priced with the router reading the FLOPs budget (the pricing alone differs)."""
    table, seq = gated.cost_table, inputs["input_ids"].shape[1]
    out = {}
    with torch.inference_mode():
        logits = gated(**inputs, budget=budget).logits
        info = gated.last
        ms = float(table.predict(info.masks, seq)[0])
        out["flops"] = (budget, info.masks, float(info.flops_ratio[0]), ms, int(logits.argmax(-1)[0]))
        for name, tb in (("time", TimeBudget(ms)), ("time_r", TimeBudget(ms, router=budget))):
            logits = gated(**inputs, budget=tb).logits
            info = gated.last
            pred = float(table.predict(info.masks, seq)[0])
            out[name] = (tb, info.masks, float(info.flops_ratio[0]), pred, int(logits.argmax(-1)[0]))
    return out


def _units(masks: Any) -> str:
    m = masks.canonical()
    keep = m.layer[0].tolist()
    heads = [int(h) if k else 0 for h, k in zip(m.head[0].sum(-1).tolist(), keep)]
    slices = [int(s) if k else 0 for s, k in zip(m.ffn[0].sum(-1).tolist(), keep)]
    return "h" + "/".join(map(str, heads)) + " f" + "/".join(map(str, slices))


def speed(gated: Any, tokenizer: Any, args: Any) -> list[dict[str, Any]]:
    from dynprune.eval.bench_calibrate import _reviews

    rows = []
    for seq in args.seqs:
        inputs = _reviews(tokenizer, seq)
        for b in args.budgets:
            pair = _pair(gated, inputs, b)
            fns = {"dense": lambda x=inputs: gated(**x, budget=1.0)}
            for name, (budget, *_rest) in pair.items():
                fns[name] = lambda x=inputs, budget=budget: gated(**x, budget=budget)
            stats = time_blocks(fns, warmup=2, repeats=args.repeats, block=3, pause_s=0.0)
            (_, mf, ff, pf, _), (_, mt, ft, pt, _) = pair["flops"], pair["time"]
            _, mr, fr, pr, _ = pair["time_r"]
            rows.append({
                "seq": seq, "budget": b,
                "dense_ms": stats["dense"].median_ms, "dense_pred_ms": gated.cost_table.dense(seq),
                "flops_ms": stats["flops"].median_ms, "flops_pred_ms": pf, "flops_ratio_f": ff,
                "time_ms": stats["time"].median_ms, "time_pred_ms": pt, "flops_ratio_t": ft,
                "time_vs_flops": paired_ratio(stats["time"], stats["flops"]),
                "time_r_ms": stats["time_r"].median_ms, "time_r_pred_ms": pr, "flops_ratio_r": fr,
                "time_r_vs_flops": paired_ratio(stats["time_r"], stats["flops"]),
                "speedup_flops": paired_ratio(stats["dense"], stats["flops"]),
                "speedup_time": paired_ratio(stats["dense"], stats["time"]),
                "same_units": bool(_units(mf) == _units(mt)), "units_f": _units(mf), "units_t": _units(mt),
                "units_r": _units(mr),
            })  # fmt: skip
            r = rows[-1]
            print(
                f"T={seq:3d} b={b:g}: FLOPs-priced {r['flops_ms']:.2f} ms (pred {pf:.2f}, FLOPs {ff:.3f}) | "
                f"time-priced {r['time_ms']:.2f} ms (pred {pt:.2f}, FLOPs {ft:.3f}) | time/FLOPs-priced "
                f"{r['time_vs_flops']:.3f} | same router: {r['time_r_ms']:.2f} ms (pred {pr:.2f}, FLOPs {fr:.3f}, "
                f"vs FLOPs-priced {r['time_r_vs_flops']:.3f}) | dense {r['dense_ms']:.2f} ms (pred {r['dense_pred_ms']:.2f})",
                flush=True,
            )
    return rows


def landing(gated: Any, tokenizer: Any, args: Any) -> list[dict[str, Any]]:
    """Fixed ms budgets at every length: measured forward time vs the budget (one block per length)."""
    from dynprune.eval.bench_calibrate import _reviews

    rows = []
    for seq in args.seqs:
        inputs = _reviews(tokenizer, seq)
        fns, info = {}, {}
        for ms in args.ms:
            tb = TimeBudget(ms)
            try:
                with torch.inference_mode():
                    gated(**inputs, budget=tb)
            except ValueError as err:  # below this length's fixed time
                print(f"T={seq:3d} ms:{ms:g}: {err}", flush=True)
                continue
            masks = gated.last.masks  # None: the budget holds the dense forward
            pred = (
                gated.cost_table.dense(seq)
                if masks is None
                else float(gated.cost_table.predict(masks, seq)[0])
            )
            info[ms] = (float(gated.last.flops_ratio[0]), pred)
            fns[ms] = lambda x=inputs, tb=tb: gated(**x, budget=tb)
        if not fns:
            continue
        stats = time_blocks(fns, warmup=2, repeats=args.repeats, block=3, pause_s=0.0)
        for ms, (fr, pred) in info.items():
            got = stats[ms].median_ms
            rows.append({"seq": seq, "ms_budget": ms, "measured_ms": got, "pred_ms": pred, "flops_ratio": fr,
                         "measured_vs_budget": got / ms})  # fmt: skip
            print(
                f"T={seq:3d} ms:{ms:g}: measured {got:.2f} ms (pred {pred:.2f}), FLOPs {fr:.3f}", flush=True
            )
    return rows


def accuracy(gated: Any, tokenizer: Any, args: Any) -> list[dict[str, Any]]:
    from dynprune.assets import rotten_tomatoes_split

    test = rotten_tomatoes_split()["test"][: args.examples]
    rows = []
    for b in args.budgets:
        acc = {"flops": 0, "time": 0, "time_r": 0}
        sums = {k: [0.0, 0.0] for k in acc}
        differ = same_units = differ_r = same_r = 0
        for text, label in test:
            enc = tokenizer(text, truncation=True, max_length=128, return_tensors="pt")
            pair = _pair(gated, dict(enc), b)
            for k, (_, _, fr, ms, pred) in pair.items():
                acc[k] += int(pred == label)
                sums[k][0] += fr
                sums[k][1] += ms
            differ += int(pair["flops"][4] != pair["time"][4])
            differ_r += int(pair["flops"][4] != pair["time_r"][4])
            same_units += int(_units(pair["flops"][1]) == _units(pair["time"][1]))
            same_r += int(_units(pair["flops"][1]) == _units(pair["time_r"][1]))
        n = len(test)
        row = {"budget": b, "n": n, "answers_differ": differ, "same_units": same_units,
               "answers_differ_r": differ_r, "same_units_r": same_r}  # fmt: skip
        for k in acc:
            row[f"acc_{k}"] = acc[k] / n
            row[f"flops_{k}"] = sums[k][0] / n
            row[f"pred_ms_{k}"] = sums[k][1] / n
        rows.append(row)
        print(
            f"b={b:g} (n={n}): FLOPs-priced acc {row['acc_flops']:.2%} FLOPs {row['flops_flops']:.3f} pred "
            f"{row['pred_ms_flops']:.2f} ms | time-priced acc {row['acc_time']:.2%} FLOPs {row['flops_time']:.3f} "
            f"pred {row['pred_ms_time']:.2f} ms | answers differ on {differ}, same units on {same_units} | "
            f"same router: acc {row['acc_time_r']:.2%} FLOPs {row['flops_time_r']:.3f} pred "
            f"{row['pred_ms_time_r']:.2f} ms, answers differ on {differ_r}, same units on {same_r}",
            flush=True,
        )
    return rows


def write(rows: list[dict[str, Any]], out: Path, note: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in r.items()})
    md = out.with_suffix(".md")
    heads = list(rows[0])
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += [
        "| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in heads) + " |"
        for r in rows
    ]
    md.write_text(f"# dynprune bench timecost\n\n{note}\n\n" + "\n".join(lines) + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads < 1 or args.repeats < 1 or args.examples < 1:
        raise SystemExit("dynprune bench timecost: --threads, --repeats and --examples must be >= 1")
    from dynprune.eval.timing import load_for_timing

    from dynprune.cost_model import require_table

    start = time.perf_counter()
    gated, tokenizer = load_for_timing(args.checkpoint, args.threads, "dynprune bench timecost", args.budgets)
    try:
        table = require_table(gated)
    except ValueError as err:
        raise SystemExit(f"dynprune bench timecost: {err}") from err
    if args.part == "speed":
        rows = speed(gated, tokenizer, args)
    else:
        from contextlib import nullcontext

        from dynprune.exec import reference_path

        with reference_path(gated) if args.path == "torch" else nullcontext():
            rows = accuracy(gated, tokenizer, args)
    land = landing(gated, tokenizer, args) if args.part == "speed" and args.ms else []
    env = runtime_env()
    note = (
        f"Checkpoint {args.checkpoint}; cost table measured {table.machine.get('measured_at', '?')} on "
        f"{table.machine.get('cpu', '?')} ({table.machine.get('threads', '?')} threads). This run: {env['cpu']}, "
        f"torch {env['torch']}, {args.threads} threads, batch 1, {time.perf_counter() - start:.0f} s."
    )
    if args.out is not None:
        print(f"wrote {args.out} and {write(rows, args.out, note)}")
        if land:
            out = args.out.with_name(args.out.stem + "_landing.csv")
            print(f"wrote {out} and {write(land, out, note)}")
    return 0
