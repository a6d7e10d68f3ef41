"""`dynprune calibrate --checkpoint DIR --target 0.25 [0.5 ...] [--cap C] [--policy auto|threshold|cascade]`

Fits how a gated checkpoint spends a *mean* budget (``MeanBudget(target, cap)``:
the inputs spend ``target`` of dense FLOPs on average, at most ``cap`` each) on
the validation split of its training data, and saves the fitted policy in
DIR/gates/calibration.json (atomically; loaded by dynprune.load_gated_model).
Then ``dynprune eval --checkpoint DIR --budget mean:0.25`` and
``gated(**batch, budget=dynprune.MeanBudget(0.25))`` use it.

Policies (docs/budgets.md): ``threshold`` (checkpoints trained with
``--gate.budget_mode=mean``: units whose logit exceeds a calibrated threshold)
and ``cascade`` (any checkpoint: run at a low budget, re-run the least confident
inputs at a high one; FLOPs of both passes count). ``auto`` picks threshold for
mean-mode checkpoints, else cascade. Fit at the batch size you evaluate with
(FLOPs depend on the padded length).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynprune.eval.cli import EvalError, _label_names, _training_config, load_examples, resolve_checkpoint


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynprune calibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="gated model dir or a training run dir")
    p.add_argument("--target", type=float, nargs="+", required=True, help="mean FLOPs fractions in (0, 1)")
    p.add_argument("--cap", type=float, default=None, help="per-input ceiling (fraction of dense FLOPs)")
    p.add_argument("--policy", choices=("auto", "threshold", "cascade"), default="auto")
    p.add_argument(
        "--batch-size", type=int, default=64, help="batch size of the fit (use the one you evaluate with)"
    )
    p.add_argument("--max-examples", type=int, default=None, help="fit on the first N validation examples")
    p.add_argument("--overwrite", action="store_true", help="replace calibrations that already exist")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return run(args)
    except (EvalError, ValueError) as err:
        print(f"dynprune calibrate: error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers
    from dynprune.train.data import Collator, eval_batches

    import dynprune
    from dynprune.calibration import check_policy_fits
    from dynprune.calibration_fit import fit

    budgets = [dynprune.MeanBudget(t, args.cap) for t in args.target]  # validates target / cap
    if any(b.target >= 1.0 for b in budgets):
        raise EvalError("a mean target of 1.0 is the dense model: nothing to calibrate")
    if args.batch_size <= 0:
        raise EvalError("--batch-size must be > 0")
    ckpt = resolve_checkpoint(args.checkpoint)
    train_cfg = _training_config(ckpt)
    transformers.logging.set_verbosity_error()
    gated, tokenizer = dynprune.load_gated_model(ckpt)
    if tokenizer is None:
        raise EvalError(f"{ckpt / 'base'} has no tokenizer to encode the validation split with")
    policy = args.policy
    if policy == "auto":
        policy = "threshold" if gated.gate_config.budget_mode == "mean" else "cascade"
    check_policy_fits(gated, policy)
    existing = [b.spec for b in budgets if b.spec in gated.calibration.entries]
    if existing and not args.overwrite:
        raise EvalError(
            f"{ckpt / 'gates'} already has calibrations for {existing}; pass --overwrite to replace them"
        )
    gate = train_cfg.get("gate") or {}
    trained = None
    if gate.get("budget_min") is not None and gate.get("budget_max") is not None:
        trained = (float(gate["budget_min"]), float(gate["budget_max"]))
    data_args = argparse.Namespace(
        data=None,
        text_column="text",
        label_column="label",
        split="validation",
        max_examples=args.max_examples,
    )
    label_names = _label_names(transformers.AutoConfig.from_pretrained(ckpt / "base"))
    examples = load_examples(data_args, train_cfg, label_names, tokenizer)
    collate = Collator(tokenizer.pad_token_id, getattr(tokenizer, "padding_side", "right"))
    batches = [collate([examples[i] for i in idx]) for idx in eval_batches(examples, args.batch_size)]
    torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    passes: dict = {}  # cascade: each candidate budget runs once for every target
    for budget in tqdm(budgets, desc="calibrate", disable=len(budgets) == 1):
        entry = fit(gated, batches, budget, policy=policy, trained=trained, passes=passes)
        gated.calibration.add(entry)
        f = entry.fitted
        print(
            f"{budget.spec}: {policy} {entry.policy} -> validation mean FLOPs {f['flops_ratio_mean']:.4f} "
            f"[p5 {f['flops_ratio_p5']:.3f}, p95 {f['flops_ratio_p95']:.3f}], accuracy {100 * f['accuracy']:.2f}% "
            f"(n={f['n']}, batch {f['batch_size']})"
        )
    path = gated.calibration.save(ckpt / "gates")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
