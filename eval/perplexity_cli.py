"""`dynprune eval perplexity [--model smollm2|DIR] [--budget B ...] [--method M ...] [--out DIR]`

Perplexity of a causal LM on held-out King James books (split by book, see
docs/training_free.md) at several FLOPs budgets: the dense model, dynprune's
training-free router (GateConfig.griffin: gates from the prompt's own
activations), the TEAL-style per-token activation-sparsity baseline and
ShortGPT-style layer removal. Each chunk is a prompt and its continuation;
the continuation's tokens are scored. Intervals: bootstrap over chunks (the
methods are deterministic: seeds would not vary). Resumable: rows land in
OUT/rows.jsonl as they finish; the tables are written at the end
(OUT/perplexity.csv, perplexity.md, meta.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynprune.eval.perplexity_sweep import METHODS, PerplexityConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynprune eval perplexity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = PerplexityConfig()
    p.add_argument("--model", default=d.model, help="'smollm2' (packaged) or a local HF causal-LM directory")
    p.add_argument(
        "--budget", type=float, nargs="+", default=list(d.budgets), help="fractions of dense FLOPs"
    )
    p.add_argument("--method", nargs="+", default=list(d.methods), choices=METHODS)
    p.add_argument(
        "--gates",
        default=None,
        help="learned gates (OUTPUT_DIR/gated/gates of dynprune train) for --method learned",
    )
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--prompt-len", type=int, default=d.prompt_len)
    p.add_argument("--chunks", type=int, default=d.chunks, help="evaluation windows (test books)")
    p.add_argument(
        "--calibration-chunks", type=int, default=d.calibration_chunks, help="windows of train books"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--ffn-slice-size", type=int, default=d.ffn_slice_size)
    p.add_argument("--resamples", type=int, default=d.resamples, help="bootstrap resamples")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument(
        "--collect", action="store_true", help="only write the tables from the rows OUT already holds"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="output directory (resumes a run with the same settings)"
    )
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = PerplexityConfig(
            model=args.model,
            budgets=tuple(args.budget),
            methods=tuple(args.method),
            gates=args.gates,
            seq_len=args.seq_len,
            prompt_len=args.prompt_len,
            chunks=args.chunks,
            calibration_chunks=args.calibration_chunks,
            batch_size=args.batch_size,
            ffn_slice_size=args.ffn_slice_size,
            resamples=args.resamples,
            threads=args.threads,
        )
        from dynprune.eval.perplexity_sweep import collect, run

        rows = collect(cfg, args.out) if args.collect else run(cfg, args.out)
    except ValueError as err:
        print(f"dynprune eval perplexity: error: {err}", file=sys.stderr)
        return 2
    print((args.out / "perplexity.md").read_text())
    print(f"wrote {args.out / 'perplexity.csv'} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
