"""`dynprune eval --checkpoint DIR [--budget B ...] [--data FILE] [options]`

Evaluates a gated checkpoint (``dynprune train`` output: DIR/gated, or any
directory written by ``dynprune.save_gated_model``) at one or more budgets:
accuracy and loss, executed FLOPs per sample (mean, p5, p95), latency at
batch 1 and 16 next to the dense model in the same process (speedup and ideal
speedup), and gate statistics (keep rates, distinct masks, Hamming distance).
Budgets: a cap per input (``0.5``) or a mean over inputs (``mean:0.25``,
``mean:0.25,cap:0.6``; needs a calibration: ``dynprune calibrate``). Per budget
the output has the per-input FLOPs distribution (p5/p50/p95) and where the
compute goes: mean FLOPs per quartile of input length and of the dense model's
confidence.

Prints a table and writes eval-<budgets>.json + .csv (default dir: DIR/eval/),
one pair per set of budgets; an existing pair is kept unless --overwrite.

Data: the checkpoint's training split (packaged Rotten Tomatoes or its
data.path) by default, ``--split test``; ``--data FILE`` evaluates every row
of a local CSV/TSV/JSON-lines/parquet file instead.

Causal LMs: ``dynprune eval perplexity --help`` (held-out King James books,
dense / training-free router / TEAL / ShortGPT; eval/perplexity_cli.py).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from dynprune.budget import MeanBudget, TimeBudget, budget_spec, parse_budget


class EvalError(ValueError):
    """Bad input to `dynprune eval`: the message says what is wrong and what to do."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynprune eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="gated model dir (base/ + gates/) or a training run dir",
    )
    p.add_argument(
        "--budget",
        nargs="+",
        default=None,
        help="caps per input (0.5) or mean budgets (mean:0.25, mean:0.25,cap:0.6); "
        "default: the run's evaluation budgets",
    )
    p.add_argument(
        "--data", type=Path, default=None, help="local CSV/TSV/JSONL/parquet file to evaluate (all rows)"
    )
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="split of the training data (without --data)",
    )
    p.add_argument("--max-examples", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--out", type=Path, default=None, help="output dir for eval-*.json / .csv (default CHECKPOINT/eval)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing result for the same budgets")
    p.add_argument(
        "--no-latency", action="store_true", help="skip the timing (accuracy, FLOPs and gates only)"
    )
    p.add_argument("--repeats", type=int, default=10, help="interleaved timing rounds")
    p.add_argument("--bs1-inputs", type=int, default=8, help="single inputs per timed batch-1 round")
    p.add_argument("--bs16-batches", type=int, default=2, help="batches of 16 per timed round")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--allow-untrained-budgets", action="store_true", help="allow budgets outside the trained range"
    )
    p.add_argument(
        "--govern",
        action="store_true",
        help="mean budgets: correct each policy's knob online while evaluating (dynprune.govern; batches "
        "in a seeded random order), so the mean lands on the target when these inputs differ from the "
        "calibration's",
    )
    p.add_argument(
        "--export-frozen",
        type=Path,
        default=None,
        help="also export, per budget, the model frozen to its most common mask",
    )
    return p  # fmt: skip


# -- checks before any long work ------------------------------------------------------------------
def resolve_checkpoint(path: Path) -> Path:
    if not path.exists():
        raise EvalError(f"checkpoint {str(path)!r} does not exist")
    if (path / "base" / "config.json").is_file() and (path / "gates" / "gates.json").is_file():
        return path
    if (path / "gated" / "gates" / "gates.json").is_file():
        return path / "gated"  # a `dynprune train` output directory: its dynamic model
    if (path / "config.json").is_file():
        raise EvalError(
            f"{str(path)!r} is a plain Hugging Face model, not a gated checkpoint (base/ + gates/); "
            "train one with `dynprune train`, or wrap and save it with dynprune.save_gated_model"
        )
    raise EvalError(
        f"{str(path)!r} is not a gated checkpoint: expected base/config.json and gates/gates.json "
        "(written by dynprune.save_gated_model / `dynprune train`)"
    )


def _training_config(ckpt: Path) -> dict[str, Any]:
    import yaml

    for f in (ckpt / "config.yaml", ckpt.parent / "config.yaml"):
        if f.is_file():
            return yaml.safe_load(f.read_text()) or {}
    return {}


def check_budgets(
    budgets: list[str] | list[float] | None, train_cfg: dict[str, Any], allow: bool
) -> list[float | MeanBudget]:
    if budgets is None:
        budgets = list((train_cfg.get("evaluation") or {}).get("budgets") or [0.25, 0.5, 0.75])
    if not budgets:
        raise EvalError("--budget needs at least one value (fractions of dense FLOPs in (0, 1])")
    parsed: list[float | MeanBudget] = []
    for b in budgets:
        try:
            parsed.append(parse_budget(b))
        except ValueError as err:
            raise EvalError(str(err)) from None
    gate = train_cfg.get("gate") or {}
    low, high = gate.get("budget_min"), gate.get("budget_max")
    if low is not None and high is not None and not allow:
        caps = [b for b in parsed if not isinstance(b, (MeanBudget, TimeBudget))]
        bad = [b for b in caps if b < 1.0 and not (low - 1e-9 <= b <= high + 1e-9)]
        if bad:
            raise EvalError(
                f"budget(s) {bad} outside the range this checkpoint was trained for [{low}, {high}]; "
                "choose budgets inside it (or pass --allow-untrained-budgets)"
            )
    unique = {budget_spec(b): b for b in parsed}
    return sorted(unique.values(), key=_budget_order, reverse=True)


def _budget_order(b: float | MeanBudget | TimeBudget) -> tuple[float, int, float]:
    if isinstance(b, TimeBudget):  # after every FLOPs budget, longest first
        return (0.0, 2, b.ms)
    if isinstance(b, MeanBudget):
        return (b.target, 0, b.cap or 1.0)
    return (float(b), 1, 0.0)


def result_paths(
    out: Path, budgets: list[float | MeanBudget] | list[str], governed: bool = False
) -> tuple[Path, Path]:
    """eval-<budgets>[-governed].json / .csv in ``out`` (budgets in evaluation order: highest first)."""
    ordered = sorted(
        {budget_spec(parse_budget(b)): parse_budget(b) for b in budgets}.values(), key=_budget_order
    )
    name = "eval-" + "_".join(budget_spec(b).replace(":", "").replace(",", "-") for b in reversed(ordered))
    name += "-governed" if governed else ""
    return out / f"{name}.json", out / f"{name}.csv"


def output_paths(
    out: Path, budgets: list[float | MeanBudget], overwrite: bool, governed: bool = False
) -> tuple[Path, Path]:
    """:func:`result_paths`; an existing result is an error unless ``overwrite``."""
    paths = result_paths(out, budgets, governed)
    if not overwrite and any(p.exists() for p in paths):
        raise EvalError(
            f"{paths[0]} already holds a result for these budgets; pass --overwrite to replace it "
            "or --out DIR to write elsewhere"
        )
    return paths


def load_examples(
    args: argparse.Namespace, train_cfg: dict[str, Any], label_names: list[str], tokenizer: Any
):
    """Encoded examples to evaluate (checks files, columns and labels first)."""
    from dynprune.train.data import DataError, encode_labels, read_table

    max_length = int((train_cfg.get("data") or {}).get("max_length", 128))
    try:
        if args.data is not None:
            texts, raw = read_table(args.data, args.text_column, args.label_column)
            labels = encode_labels(raw, label_names, args.data)
        else:
            from dynprune.train.config import DataConfig
            from dynprune.train.data import load_task_data

            data = load_task_data(DataConfig(**(train_cfg.get("data") or {})), label_names=label_names)
            split = data.splits[args.split]
            texts, labels = list(split["text"]), list(split["label"])
    except DataError as err:
        raise EvalError(str(err)) from None
    if args.max_examples is not None:
        texts, labels = texts[: args.max_examples], labels[: args.max_examples]
    if not texts:
        raise EvalError("no examples to evaluate")
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "labels": int(y), "index": i} for i, y in enumerate(labels)]


def _label_names(config: Any) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return (
        [str(id2label[i]) for i in sorted(id2label)]
        if id2label
        else [str(i) for i in range(config.num_labels)]
    )


# -- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["perplexity"]:  # causal LMs: `dynprune eval perplexity --help`
        from dynprune.eval.perplexity_cli import main as perplexity_main

        return perplexity_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except EvalError as err:
        print(f"dynprune eval: error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import dynprune
    from dynprune.io import IncompatibleGatesError, atomic_write_bytes

    ckpt = resolve_checkpoint(args.checkpoint)
    train_cfg = _training_config(ckpt)
    budgets = check_budgets(args.budget, train_cfg, args.allow_untrained_budgets)
    if args.batch_size <= 0 or args.repeats <= 0:
        raise EvalError("--batch-size and --repeats must be > 0")
    transformers.logging.set_verbosity_error()
    base_config = transformers.AutoConfig.from_pretrained(ckpt / "base")
    label_names = _label_names(base_config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt / "base")
    try:
        gated, _ = dynprune.load_gated_model(ckpt)
    except (IncompatibleGatesError, dynprune.UnsupportedModelError) as err:
        raise EvalError(f"checkpoint {str(ckpt)!r} does not fit: {err}") from None
    except (OSError, RuntimeError) as err:
        raise EvalError(f"could not load the checkpoint {str(ckpt)!r}: {err}") from None
    from dynprune.calibration import check_policy_fits

    for b in budgets:  # every mean budget needs its calibration: say so before any long work
        if isinstance(b, MeanBudget) and b.target < 1.0:
            try:
                check_policy_fits(gated, gated.calibration.lookup(b).policy)
                if args.govern:
                    dynprune.govern(gated, b)  # its calibration has the curve a governor needs
            except ValueError as err:
                raise EvalError(str(err).replace("DIR", str(ckpt))) from None
    if any(isinstance(b, TimeBudget) for b in budgets):  # ms budgets need this machine's cost table
        from dynprune.cost_model import require_table

        try:
            require_table(gated)
        except ValueError as err:
            raise EvalError(str(err).replace("DIR", str(ckpt))) from None
    out = args.out or ckpt / "eval"
    json_path, csv_path = output_paths(out, budgets, args.overwrite, args.govern)
    examples = load_examples(args, train_cfg, label_names, tokenizer)
    torch.set_num_threads(args.threads)
    from dynprune.eval.evaluate import evaluate_checkpoint, print_table

    results = evaluate_checkpoint(gated, ckpt, tokenizer, examples, budgets, args)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(json_path, json.dumps(results, indent=1).encode())
    buf = io.StringIO()
    rows = results["rows"]
    keys: list[str] = []
    for r in rows:
        keys += [k for k, v in r.items() if k not in keys and not isinstance(v, (dict, list))]
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(csv_path, buf.getvalue().encode())
    print(print_table(results))
    print(f"\nwrote {json_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
