"""`dynprune bench candidates`: ways to execute gated layers on CPU, timed side by side.

One process, MiniLM (packaged weights), real review text packed to the
sequence length, the untrained router re-initialised so masks differ per
sample (as `dynprune bench cpu` without a checkpoint). Variants, each in its
own block of calls after a pause (eval/timing.py ``time_blocks``):

- ``dense_ort`` / ``dense_ort_nospin``: the dense model on ONNX Runtime, spinning on (its default) / off;
- ``dense_eager``: PyTorch eager;
- ``ort_default``: the gated model on dynprune.exec at its defaults (one session for any
  counts; its threads spin within a run and stop at its end);
- ``ort_spin_on`` / ``ort_spin_off``: the same with ORT's default spinning (threads keep
  spinning after a run) / with spinning off (threads sleep between ops);
- ``torch_path``: the PyTorch gathered path (the reference);
- ``sliced_ort``: the physically sliced model of one sample's units exported to ORT.

Prints and writes (``--out``) each variant's median ms and its paired speedup over ``dense_ort``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from dynprune.eval.bench_cpu_models import load_models, make_inputs, prepare_limit
from dynprune.eval.timing import paired_ratio, runtime_env, time_blocks

GATED_VARIANTS = {
    "ort_default": {},
    "ort_spin_on": dict(spinning="on"),
    "ort_spin_off": dict(spinning="off"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dynprune bench candidates", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--shapes", nargs="+", default=["1x28", "16x32"], help="BATCHxSEQ")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.threads < 1:
        print(f"dynprune bench candidates: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    from dynprune.eval.onnx_export import export_onnx, ort_runner, ort_session, require_ort

    from dynprune.exec import FastEncoder, engine_override

    require_ort()
    torch.set_num_threads(args.threads)
    bm = load_models(SimpleNamespace(checkpoint=None, model=None, seed=0, router_scale=1.0, inputs="auto"))
    gated = bm.gated
    onnx_dense = export_onnx(bm.dense)
    dense_ort = ort_session(onnx_dense, args.threads)
    dense_nospin = ort_session(onnx_dense, args.threads, spinning=False)
    engines = {name: FastEncoder(gated, args.threads, **opts) for name, opts in GATED_VARIANTS.items()}
    rows = []
    for shape in args.shapes:
        batch, seq = (int(v) for v in shape.split("x"))
        inputs = make_inputs(bm, batch, seq, shared=False, seed=0)
        for budget in args.budgets:
            with torch.inference_mode():
                gated(**inputs, budget=budget)
            info = gated.last
            limit, _ = prepare_limit(bm, info.masks, info.flops, seq)

            def gated_on(engine, inputs=inputs, budget=budget):
                def run():
                    with engine_override(gated, engine):
                        return gated(**inputs, budget=budget)

                return run

            fns = {
                "dense_ort": ort_runner(dense_ort, inputs),
                "dense_ort_nospin": ort_runner(dense_nospin, inputs),
                "dense_eager": lambda inputs=inputs: bm.dense(**inputs),
                **{name: gated_on(e) for name, e in engines.items()},
                "torch_path": gated_on(None),
                "sliced_ort": ort_runner(ort_session(export_onnx(limit), args.threads), inputs),
            }
            stats = time_blocks(fns, warmup=2, repeats=args.repeats)
            flops = float(info.flops.sum()) / (batch * info.dense_flops)
            for name, st in stats.items():
                rows.append(dict(batch=batch, seq=seq, budget=budget, flops_ratio=round(flops, 4), variant=name,
                                 median_ms=round(st.median_ms, 3), iqr_ms=round(st.iqr_ms, 3),
                                 speedup_vs_dense_ort=round(paired_ratio(stats["dense_ort"], st), 3)))  # fmt: skip
                print(f"{batch:3d}x{seq:<4d} b={budget:<5} {name:18s} {st.median_ms:9.3f} ms  "
                      f"vs dense_ort {rows[-1]['speedup_vs_dense_ort']:.3f}", flush=True)  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        env = runtime_env()
        args.out.with_suffix(".env.txt").write_text("".join(f"{k}: {v}\n" for k, v in env.items()))
        print(f"wrote {args.out}")
    return 0
