"""`dynprune bench cpu`: dense vs gated vs physically sliced model on CPU, side by side.

For every batch size, sequence length, mask mode and budget, in ONE process:

- ``dense``: the unwrapped HF model;
- ``gated``: the wrapped model at that budget on the gathered CPU path
  (router, gate selection, planning and the gathered layers: the whole forward);
- ``limit``: a *physically sliced* dense model (eval/physical.py) keeping the
  units of one sample of the batch (the sample whose FLOPs are closest to the
  batch mean): same FLOPs, no gathers, no router — the practical speed limit;
- ``router`` / ``plan``: the router + gate selection alone, and the planning alone.

They are timed in interleaved rounds (eval/timing.py) after warm-up; times are
medians with their IQR, ``speedup`` is the median of the per-round paired
ratios dense/gated. ``ideal_speedup`` = dense FLOPs / executed FLOPs (from
``GatedModel.last.flops``, the one FLOPs module) and ``ratio_to_ideal`` =
speedup / ideal_speedup. ``counted_flops_ratio`` is what
``torch.utils.flop_counter`` counts on one gathered forward (it includes the
work of merged blocks, ``computed_flops_ratio`` the same from the plans).

Mask modes: ``shared`` — every row of the batch is the same input, so the
router gives one mask for the batch; ``per_sample`` — different inputs, and the
router chooses a different mask per sample (``distinct_masks`` counts them).
Without ``--checkpoint`` the router is untrained; its output layer is then
re-initialised with larger seeded random weights (``--router-scale``) so
masks really differ per sample (an untrained router gives nearly identical
masks). With ``--checkpoint`` the trained gates are used as they are.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from dynprune.eval.bench_cpu_models import BenchModels, load_models, make_inputs, prepare_limit
from dynprune.eval.bench_engines import (
    DENSE_ENGINES,
    ENGINE_TABLE,
    DenseEngines,
    check_engines,
    engine_columns,
    engine_env,
    gated_torch_fn,
    limit_ort_fn,
    ort_goal_lines,
)
from dynprune.eval.timing import paired_ratio, runtime_env, time_blocks

from dynprune.exec import current_engine

COLUMNS = [
    "model", "batch", "seq", "mask_mode", "budget", "flops_ratio", "dense_ms", "gated_ms", "speedup",
    "ideal_speedup", "ratio_to_ideal", "limit_ms", "router_share", "distinct_masks",
    "dense_iqr_ms", "gated_iqr_ms", "limit_iqr_ms", "limit_flops_ratio", "limit_speedup",
    "limit_ratio_to_ideal", "router_ms", "plan_ms", "plan_share", "computed_flops_ratio",
    "counted_flops_ratio", "blocks_per_layer", "repeats", "router_note",
    "fastest_dense", "fastest_dense_ms", "speedup_vs_fastest", "compile_ms", "compile_vs_eager", "ort_ms",
    "ort_vs_eager", "speedup_vs_ort", "gated_torch_ms", "torch_path_speedup", "limit_ort_ms",
    "limit_ort_vs_ort", "gated_vs_limit_ort", "gated_engine", "router_engine",
]  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynprune bench cpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="seq 64 only, fewer repeats (< 1 minute on 2 cores)")
    p.add_argument("--model", type=Path, help="a supported local HF model dir (default: packaged MiniLM)")
    p.add_argument("--checkpoint", type=Path, help="a gated model saved by dynprune.save_gated_model")
    p.add_argument("--out", type=Path, help="CSV file to write (a markdown summary goes next to it)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--seqs", type=int, nargs="+", default=None, help="default 64 128 (64 with --quick)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--modes", nargs="+", default=["shared", "per_sample"], choices=["shared", "per_sample"])
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 25; 7 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 3; 2 with --quick)")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime CPU threads (default 2)")
    p.add_argument(
        "--engines",
        nargs="+",
        default=list(DENSE_ENGINES),
        help="dense engines: eager (always), compile (torch.compile), ort (ONNX Runtime, dynprune[onnx])",
    )
    p.add_argument(
        "--dense-onnx", type=Path, help="time this ONNX file as the dense ORT model (default: export)"
    )
    p.add_argument("--block", type=int, default=3, help="timed calls per variant and round (default 3)")
    p.add_argument(
        "--pause-ms", type=float, default=50.0, help="pause before each variant's block (default 50)"
    )
    p.add_argument("--router-scale", type=float, default=1.0, help="std of the re-initialised router weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inputs", choices=["auto", "text", "random"], default="auto",
                   help="token ids: packed Rotten Tomatoes text (auto, when a tokenizer exists) or random")  # fmt: skip
    p.add_argument("--no-limit", action="store_true", help="skip the physically sliced model")
    p.add_argument("--env", choices=["bench", "keep"], default="bench",
                   help="bench (default): re-run itself with the timing environment BENCH_ENV set where unset "
                        "(OpenMP threads spin instead of sleeping, no malloc page faults); keep: the caller's")  # fmt: skip
    return p


#: Set (where unset) for the run, by re-executing the command; see results/cpu_bench/NOTES.md.
#: OMP_WAIT_POLICY=ACTIVE: worker threads spin between parallel ops (with the default policy a
#: sleeping worker made every parallel op wait for a scheduler slice, ~8 ms, whenever another
#: process was running). MALLOC_*: large temporaries come from the heap and stay mapped, so
#: no variant pays first-touch page faults (dense MiniLM had 5-10k per batch-16 forward).
BENCH_ENV = {
    "OMP_WAIT_POLICY": "ACTIVE",
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30),
    "MALLOC_TOP_PAD_": str(256 * 2**20),
}
_REEXEC_MARK = "_DYNPRUNE_BENCH_CPU_ENV"


def _reexec_with_bench_env(argv: list[str]) -> None:
    """Replace this process by the same command with BENCH_ENV (OpenMP/malloc read it at start)."""
    missing = {k: v for k, v in BENCH_ENV.items() if k not in os.environ}
    if not missing or os.environ.get(_REEXEC_MARK):
        return
    if sys.argv[1:3] != ["bench", "cpu"]:  # called as a function, not as the CLI: never replace the caller
        print(f"dynprune bench cpu: note: running without {sorted(missing)} (set them for stable timings)")
        return
    env = {**os.environ, **missing, _REEXEC_MARK: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "dynprune.cli", "bench", "cpu", *argv], env)


def _distinct_masks(masks: Any) -> int:
    m = masks.canonical()
    flat = torch.cat([m.head.flatten(1), m.ffn.flatten(1), m.layer.flatten(1)], dim=1)
    return len({bytes(row.numpy().tobytes()) for row in flat.to(torch.uint8)})


def _counted_flops(fn: Any) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as c:
        fn()
    return float(c.get_total_flops())


def _computed_flops(gated: Any, masks: Any, seq: int) -> tuple[float, float]:
    """(FLOPs the plans compute per batch incl. merged-block waste, mean blocks per layer and kind)."""
    from dynprune.plan import plan_forward

    fm = gated.flops
    m = masks.canonical()
    plans = plan_forward(m.head, m.ffn, m.layer)
    units = sum(
        p.attention.computed_units * fm.head_cost(seq) + p.ffn.computed_units * fm.slice_cost(seq)
        for p in plans
    )
    blocks = statistics.mean(p.attention.n_blocks + p.ffn.n_blocks for p in plans) / 2
    batch = m.layer.shape[0]
    return float(units) + batch * fm.fixed(seq), blocks


def bench_one(bm: BenchModels, batch: int, seq: int, mode: str, budget: float, args: Any) -> dict[str, Any]:
    """Time one configuration; returns a CSV row."""
    gated = bm.gated
    inputs = make_inputs(bm, batch, seq, shared=(mode == "shared"), seed=args.seed)
    with torch.inference_mode():
        gated(**inputs, budget=budget)
    info = gated.last
    assert info is not None and info.masks is not None
    masks = info.masks
    fm = gated.flops
    dense_flops = fm.dense(seq)
    flops_ratio = float(info.flops.sum()) / (batch * dense_flops)
    computed, blocks = _computed_flops(gated, masks, seq)
    counted = _counted_flops(gated_torch_fn(gated, inputs, budget))  # the PyTorch path: countable ops
    route_fn, plan_fn = bm.route_and_plan_fns(inputs, budget)
    router_engine = "torch"
    whole = getattr(current_engine(gated), "_whole", None)
    extra: dict[str, Any] = {}
    if whole is not None and whole.calls and batch == 1:  # batch 1 routed inside the whole ORT graph
        from dynprune.exec.whole_session import routing_timers

        timers = routing_timers(whole, inputs, budget)
        extra = {"whole_routed": timers["routed"], "whole_fed": timers["fed"]}
        router_engine = "onnxruntime (in the whole graph)"
    fns = {
        **args.dense_engines.fns(inputs),
        "gated": lambda: gated(**inputs, budget=budget),
        "gated_torch": gated_torch_fn(gated, inputs, budget),
        "router": route_fn,
        "plan": plan_fn,
        **extra,
    }
    limit = None
    if not args.no_limit:
        limit, limit_flops = prepare_limit(bm, masks, info.flops, seq)
        fns["limit"] = lambda: limit(**inputs)
        if "ort" in args.engines:
            fns["limit_ort"] = limit_ort_fn(limit, inputs, args.threads)
    engine = current_engine(gated)
    handed_over = engine.fallbacks if engine is not None else 0
    sliced_before = whole.sliced_calls if whole is not None else 0
    stats = time_blocks(
        fns, warmup=args.warmup, repeats=args.repeats, block=args.block, pause_s=args.pause_ms / 1e3
    )
    engine = current_engine(gated)
    if engine is None:
        gated_engine = "torch"
    else:  # the engine hands large / many-mask batches to the PyTorch path (OrtLayers.max_tokens, max_groups)
        gated_engine = "torch (handed over)" if engine.fallbacks > handed_over else "onnxruntime"
        if whole is not None and whole.sliced_calls > sliced_before:
            gated_engine = "onnxruntime (batch 1: sliced session)"
        elif extra:
            gated_engine = "onnxruntime (batch 1: whole forward)"
    speedup = paired_ratio(stats["dense"], stats["gated"])
    router_ms = stats["router"].median_ms  # the PyTorch path's routing
    if extra:  # routing inside the whole graph: the If-tree forward minus the same forward given its counts
        router_ms = (
            max(0.0, 1.0 - paired_ratio(stats["whole_fed"], stats["whole_routed"]))
            * stats["whole_routed"].median_ms
        )
    ideal = 1.0 / flops_ratio
    row: dict[str, Any] = {
        "model": bm.name,
        "batch": batch,
        "seq": seq,
        "mask_mode": mode,
        "budget": budget,
        "flops_ratio": flops_ratio,
        "dense_ms": stats["dense"].median_ms,
        "gated_ms": stats["gated"].median_ms,
        "speedup": speedup,
        "ideal_speedup": ideal,
        "ratio_to_ideal": speedup / ideal,
        "router_share": router_ms / stats["gated"].median_ms,  # of the gated forward
        "router_engine": router_engine,
        "distinct_masks": _distinct_masks(masks),
        "dense_iqr_ms": stats["dense"].iqr_ms,
        "gated_iqr_ms": stats["gated"].iqr_ms,
        "router_ms": router_ms,
        "plan_ms": stats["plan"].median_ms,
        "plan_share": stats["plan"].median_ms / stats["dense"].median_ms,
        "computed_flops_ratio": computed / (batch * dense_flops),
        "counted_flops_ratio": counted / (batch * dense_flops),
        "blocks_per_layer": blocks,
        "repeats": stats["gated"].n,
        "router_note": bm.router_note,
        "gated_engine": gated_engine,
        **engine_columns(stats),
    }
    if limit is not None:
        limit_ratio = limit_flops / dense_flops
        limit_speedup = paired_ratio(stats["dense"], stats["limit"])
        row.update(
            limit_ms=stats["limit"].median_ms,
            limit_iqr_ms=stats["limit"].iqr_ms,
            limit_flops_ratio=limit_ratio,
            limit_speedup=limit_speedup,
            limit_ratio_to_ideal=limit_speedup * limit_ratio,
        )
    return row


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


TABLE_COLUMNS = [
    ("batch", "B"), ("seq", "T"), ("mask_mode", "masks"), ("budget", "budget"), ("flops_ratio", "flops"),
    ("distinct_masks", "distinct"), ("dense_ms", "dense ms"), ("gated_ms", "gated ms"), ("limit_ms", "limit ms"),
    ("speedup", "speedup"), ("ideal_speedup", "ideal"), ("ratio_to_ideal", "ratio"),
    ("limit_ratio_to_ideal", "limit ratio"), ("router_share", "router"), ("plan_share", "plan"),
    ("blocks_per_layer", "blocks"),
]  # fmt: skip


def format_table(rows: list[dict[str, Any]], markdown: bool = False, columns: list | None = None) -> str:
    columns = TABLE_COLUMNS if columns is None else columns
    heads = [h for _, h in columns]
    cells = [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


#: issue 8's goals: (batch, mask modes, budget) -> minimum ratio_to_ideal; router_share <= 0.02
GOALS = [(1, ("shared", "per_sample"), 0.5, 0.85), (16, ("per_sample",), 0.5, 0.85),
         (1, ("shared", "per_sample"), 0.25, 0.75), (16, ("per_sample",), 0.25, 0.75)]  # fmt: skip
ROUTER_SHARE_GOAL = 0.02


def goal_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per goal: the worst measured value over the matching rows, and whether it is met."""
    lines = []
    for batch, modes, budget, want in GOALS:
        hits = [r for r in rows if r["batch"] == batch and r["mask_mode"] in modes and r["budget"] == budget]
        if hits:
            worst = min(r["ratio_to_ideal"] for r in hits)
            seqs = "/".join(str(t) for t in sorted({r["seq"] for r in hits}))
            lines.append(
                f"batch {batch} {'+'.join(modes)} budget {budget} (seq {seqs}): min ratio_to_ideal "
                f"{worst:.3f} (goal >= {want}) {'met' if worst >= want else 'MISSED'}"
            )
    if rows:
        worst_share = max(r["router_share"] for r in rows)
        lines.append(
            f"router_share max {worst_share:.4f} (goal <= {ROUTER_SHARE_GOAL}) "
            f"{'met' if worst_share <= ROUTER_SHARE_GOAL else 'MISSED'}"
        )
    return lines


def write_outputs(
    rows: list[dict[str, Any]], out: Path, env: dict[str, str], note: str, seconds: float
) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
    md = out.with_suffix(".md")
    env_lines = "\n".join(f"- {k}: {v}" for k, v in env.items())
    md.write_text(
        f"# dynprune bench cpu\n\n{note}\n\nWall time of the run: {seconds:.0f} s.\n\n## Machine\n\n{env_lines}\n\n"
        "## Goals (issue 12: vs ONNX Runtime dense at its defaults)\n\n"
        + "".join(f"- {g}\n" for g in ort_goal_lines(rows))
        + "\n## Engines\n\n"
        + format_table(rows, markdown=True, columns=ENGINE_TABLE)
        + "\n\nvs X = median of paired per-round ratios X time / gated time (gated = the default CPU path, "
        "`gated_engine` in the CSV); sliced ORT = the physically sliced model of one sample's kept units "
        "exported to ONNX Runtime.\n\n"
        "## Goals (issue 8)\n\n" + "".join(f"- {g}\n" for g in goal_lines(rows)) + "\n"
        f"## Results\n\n{format_table(rows, markdown=True)}\n\n"
        "ratio = speedup / ideal speedup (ideal = dense FLOPs / executed FLOPs); limit ratio = the same for a "
        "physically sliced dense model of one sample's kept units; router / plan = router+selection / "
        "planning time as a share of the dense forward; blocks = mean matmul blocks per layer and kind.\n"
    )
    return md


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.seqs is None:
        args.seqs = [64] if args.quick else [64, 128]
    if args.repeats is None:
        args.repeats = 5 if args.quick else 25
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    for b in args.budgets:
        if not 0.0 < b < 1.0:
            print(f"dynprune bench cpu: budgets must be in (0, 1), got {b}", file=sys.stderr)
            return 2
    if args.model is not None and args.checkpoint is not None:
        print("dynprune bench cpu: give --model or --checkpoint, not both", file=sys.stderr)
        return 2
    check_engines(args.engines, args.threads)
    if args.env == "bench":
        _reexec_with_bench_env(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    bm = load_models(args)
    args.dense_engines = DenseEngines(bm.dense, args.engines, args.threads, args.dense_onnx)
    env = runtime_env()
    env.update(engine_env(args))
    print(f"dynprune bench cpu: {bm.name} — {bm.router_note}", flush=True)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in env.items() if v != "(unset)"), flush=True)
    rows = []
    configs = [
        (b, t, m, bud) for b in args.batches for t in args.seqs for m in args.modes for bud in args.budgets
    ]
    try:
        from tqdm import tqdm

        progress = tqdm(configs, desc="bench cpu", file=sys.stderr, leave=False)
    except ImportError:  # pragma: no cover
        progress = configs
    for b, t, m, bud in progress:
        rows.append(bench_one(bm, b, t, m, bud, args))
    if hasattr(progress, "close"):
        progress.close()
    seconds = time.perf_counter() - start
    env["loadavg_1min_start_end"] = f"{load_start:.2f} / {os.getloadavg()[0]:.2f}"
    print(format_table(rows))
    print(format_table(rows, columns=ENGINE_TABLE))
    for line in [*ort_goal_lines(rows), *goal_lines(rows)]:
        print(line)
    note = (
        f"Model: {bm.name}. {bm.router_note}. Timings: median of {args.repeats} interleaved rounds; in each "
        f"round every variant runs a block of {args.block} timed calls after a {args.pause_ms:g} ms pause and one "
        f"untimed call (eval/timing.py time_blocks), after {args.warmup} warm-up rounds; threads = {args.threads}. "
        f"Environment: {'BENCH_ENV set by re-exec' if args.env == 'bench' else 'the caller’s (no variables set)'}."
    )
    if args.out is not None:
        md = write_outputs(rows, args.out, env, note, seconds)
        print(f"wrote {args.out} and {md}")
    print(f"({seconds:.0f} s)")
    return 0
