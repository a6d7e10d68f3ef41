"""Batch-1 traffic: a gated checkpoint on real reviews, one at a time, each at its own length,
against ONNX Runtime dense on the same reviews — mean time per input, side by side, interleaved.

`dynprune bench cpu` times one input of a few fixed lengths over and over; real traffic is short
reviews of many lengths and, for a dynamic router, many count vectors. Here every round times a
pass over all the reviews after a warm-up pass: `engine` is the default batch-1 path (the whole
forward in one ONNX Runtime call, routing inside the graph; a static router's count vector met
again runs on its own sliced session), `iftree` the same with no sliced session (a dynamic router
never uses one: the two are the same path for it).

    python scripts/bench_traffic.py --checkpoint RUN/gated --budgets 0.5 0.25 --out results/cpu_bench/traffic

A budget ``mean:B`` runs the checkpoint's calibrated mean-budget policy (``dynprune calibrate``
first): for a static control's cascade every review runs at the low budget and the least
confident run again at the high one, both on the engine; its mean FLOPs ratio is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="gated checkpoint (base/ + gates/)")
    p.add_argument("--budgets", nargs="+", default=["0.5", "0.25"], help="caps (0.25) or mean:B")
    p.add_argument("--n", type=int, default=256, help="test reviews in the traffic")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True, help="output prefix: OUT.json and OUT.md")
    a = p.parse_args(argv)
    if a.n <= 0 or a.rounds <= 0 or a.threads <= 0:
        raise SystemExit("bench_traffic: --n, --rounds, --threads must be > 0")
    import torch
    from dynprune.eval.onnx_export import export_onnx, ort_runner, ort_session
    from dynprune.eval.report import machine_description
    from tqdm import tqdm
    from transformers import AutoModelForSequenceClassification

    import dynprune
    from dynprune.assets import rotten_tomatoes_split
    from dynprune.budget import MeanBudget
    from dynprune.exec import current_engine

    try:
        budgets = {spec: dynprune.parse_budget(spec) for spec in a.budgets}
    except ValueError as err:
        raise SystemExit(f"bench_traffic: {err}") from None

    torch.set_num_threads(a.threads)
    gated, tokenizer = dynprune.load_gated_model(a.checkpoint)
    gated.eval()
    dense = AutoModelForSequenceClassification.from_pretrained(Path(a.checkpoint) / "base").eval()
    texts = [t for t, _ in rotten_tomatoes_split()["test"]][: a.n]
    inputs = [dict(tokenizer(t, return_tensors="pt", truncation=True, max_length=128)) for t in texts]
    ort = ort_session(export_onnx(dense), a.threads)
    dense_fns = [ort_runner(ort, x) for x in inputs]

    for spec, budget in budgets.items():
        if isinstance(budget, MeanBudget):
            gated.calibration.lookup(budget)  # an uncalibrated mean budget fails before any timing
        elif not isinstance(budget, float):
            raise SystemExit(f"bench_traffic: budget {spec!r} must be a cap in (0, 1] or mean:B")
    flops: dict[str, float] = {}

    def gated_pass(spec: str) -> None:
        budget = budgets[spec]
        b = budget if isinstance(budget, MeanBudget) else torch.tensor([budget], dtype=torch.float64)
        spent = 0.0
        for x in inputs:
            gated(**x, budget=b)
            spent += float((gated.last.flops / gated.last.dense_flops).sum())
        flops[spec] = spent / len(inputs)

    with torch.inference_mode():
        for spec in budgets:  # warm-up: a static router's sliced sessions get built
            gated_pass(spec)
            gated_pass(spec)
        whole = current_engine(gated).whole()
        sliced_max = whole.max_sliced
        variants = {"ort_dense": lambda: [f() for f in dense_fns]}
        for spec in budgets:
            variants[f"engine@{spec}"] = lambda spec=spec: gated_pass(spec)
            variants[f"iftree@{spec}"] = lambda spec=spec: gated_pass(spec)
        times: dict[str, list[float]] = {k: [] for k in variants}
        hits: dict[str, list[float]] = {k: [] for k in variants}
        names = list(variants)
        for r in tqdm(range(a.rounds), desc="rounds", file=sys.stderr):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
                whole.max_sliced = 0 if name.startswith("iftree") else sliced_max
                calls, sliced = whole.calls, whole.sliced_calls
                time.sleep(0.05)  # ORT's spinning threads stop between variants
                start = time.perf_counter()
                variants[name]()
                times[name].append((time.perf_counter() - start) / len(inputs) * 1e3)
                if whole.calls > calls:
                    hits[name].append((whole.sliced_calls - sliced) / (whole.calls - calls))
        whole.max_sliced = sliced_max
    rows = []
    for name in names:
        ratios = [d / g for d, g in zip(times["ort_dense"], times[name])]
        rows.append(
            {
                "variant": name,
                "ms_per_input": statistics.median(times[name]),
                "speedup_vs_ort_dense": statistics.median(ratios),
                "speedup_min": min(ratios),
                "speedup_max": max(ratios),
                "sliced_share": statistics.mean(hits[name]) if hits[name] else None,
                "flops_ratio": flops.get(name.split("@", 1)[1]) if "@" in name else 1.0,
            }
        )
    report = {
        "machine": machine_description(),
        "args": vars(a),
        "sliced_sessions": len(whole._sliced),
        "max_sliced": sliced_max,
        "router": gated.gate_config.router,
        "rows": rows,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Batch-1 traffic: real reviews one at a time (scripts/bench_traffic.py)",
        "",
        f"Machine: {report['machine']}; {a.threads} threads. Checkpoint `{a.checkpoint}` "
        f"({report['router']} router); {a.n} Rotten Tomatoes test reviews, each at its own length; "
        f"{a.rounds} interleaved rounds, medians; sliced sessions kept: {report['sliced_sessions']} "
        f"(at most {sliced_max}).",
        "",
        "| variant | mean FLOPs ratio | ms per input | vs ORT dense, median [min, max] of rounds | calls on a sliced session |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        share = "" if r["sliced_share"] is None else f"{100 * r['sliced_share']:.0f} %"
        lines.append(
            f"| {r['variant']} | {r['flops_ratio']:.3f} | {r['ms_per_input']:.3f} | {r['speedup_vs_ort_dense']:.2f} "
            f"[{r['speedup_min']:.2f}, {r['speedup_max']:.2f}] | {share} |"
        )
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
