"""`dynprune demo`: route real Rotten Tomatoes reviews through gated MiniLM at several budgets.

For each review and budget it prints the kept heads / FFN slices per layer, the
layers run, executed FLOPs (from the FLOPs module) and measured batch-1 time
next to the dense model. Without ``--checkpoint`` the routers are untrained
(gates open at init): they still choose greedily under each budget, but the
per-input differences that a trained router makes need `dynprune train`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dynprune.budget import MeanBudget, parse_budget

DEFAULT_BUDGETS = (1.0, 0.75, 0.5, 0.25)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynprune demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="a trained gated model dir (dynprune train output); default: packaged MiniLM, untrained routers",
    )
    p.add_argument(
        "--budgets",
        nargs="+",
        default=[str(b) for b in DEFAULT_BUDGETS],
        help="caps per input in (0, 1] (0.5), or mean budgets of a calibrated checkpoint (mean:0.25)",
    )
    p.add_argument(
        "--reviews", type=int, default=4, help="how many test-split reviews to show (shortest and longest)"
    )
    p.add_argument(
        "--repeats", type=int, default=15, help="timed repeats per review and budget (median reported)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p


def _load(checkpoint: Path | None):
    import transformers

    import dynprune
    from dynprune.assets import minilm_path

    transformers.utils.logging.set_verbosity_error()  # the new classifier head's load report is expected
    transformers.utils.logging.disable_progress_bar()
    if checkpoint is not None:
        gated, tokenizer = dynprune.load_gated_model(checkpoint)
        return gated, tokenizer, True
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    for p in model.parameters():  # copy weights out of the memory-mapped file before timing
        p.data = p.data.clone()
    return dynprune.wrap(model), AutoTokenizer.from_pretrained(path), False


def _pick_reviews(n: int) -> list[tuple[str, int]]:
    from dynprune.assets import rotten_tomatoes_split

    test = sorted(rotten_tomatoes_split()["test"], key=lambda r: (len(r[0]), r[0]))
    short, long = test[: (n + 1) // 2], test[-(n // 2) :] if n > 1 else []
    return [*short, *long]


def _median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time per function, alternating them so drift hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _label(budget: float | MeanBudget) -> str:
    return budget.spec if isinstance(budget, MeanBudget) else f"{budget:.2f}"


def _row(counts: torch.Tensor) -> str:
    return " ".join(f"{int(c):2d}" for c in counts)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        budgets = [parse_budget(b) for b in args.budgets]
    except ValueError as err:
        raise SystemExit(f"dynprune demo: --budgets: {err}") from None
    if args.reviews < 1:
        raise SystemExit("dynprune demo: --reviews must be >= 1")
    torch.set_num_threads(args.threads)
    gated, tokenizer, trained = _load(args.checkpoint)
    for b in budgets:  # a mean budget needs the checkpoint's calibration: say so before any work
        if isinstance(b, MeanBudget) and b.target < 1.0:
            try:
                gated.calibration.lookup(b)
            except ValueError as err:
                raise SystemExit(f"dynprune demo: {err}") from None
    gated.eval()
    fm = gated.flops
    labels = ("rotten", "fresh")
    print(
        f"model: {gated.parts.spec.family}, {gated.parts.n_layers} layers × {gated.parts.n_heads} heads, "
        f"FFN {gated.parts.ffn_dim} in {gated.n_slices} slices of {gated.gate_config.ffn_slice_size}"
    )
    print(
        "routers: "
        + (
            "trained (" + str(args.checkpoint) + ")"
            if trained
            else "UNTRAINED (gates open at init; per-input choices need `dynprune train`)"
        )
    )
    summary: dict[float | MeanBudget, list[tuple[float, float]]] = {b: [] for b in budgets}
    with torch.inference_mode():
        for text, label in _pick_reviews(args.reviews):
            batch = dict(tokenizer([text], return_tensors="pt", truncation=True, max_length=128))
            seq = batch["input_ids"].shape[1]
            print(
                f"\n» {text[:100]!r}{'…' if len(text) > 100 else ''}  [{seq} tokens, label {labels[label]}]"
            )
            print(
                f"  {'budget':>6} {'FLOPs':>8} {'of dense':>8} {'gated ms':>8} {'dense ms':>8} {'speedup':>7}  "
                f"{'heads/layer':<{3 * gated.n_gated}} {'FFN slices/layer':<{3 * gated.n_gated}} layers"
                + ("  prediction" if trained else "")
            )
            for b in budgets:
                out = gated(**batch, budget=b)
                info = gated.last
                assert info is not None
                ms = _median_ms(
                    {
                        "dense": lambda x=batch: gated(**x, budget=1.0),
                        "gated": lambda x=batch, b=b: gated(**x, budget=b),
                    },
                    args.repeats,
                )
                if info.masks is None:  # budget 1.0: dense
                    heads = torch.full((gated.n_gated,), gated.parts.n_heads)
                    ffn = torch.full((gated.n_gated,), gated.n_slices)
                    layers = "".join("█" for _ in range(gated.n_gated))
                else:
                    heads, ffn = info.masks.head[0].sum(-1), info.masks.ffn[0].sum(-1)
                    layers = "".join("█" if k else "·" for k in info.masks.layer[0].tolist())
                flops = float(info.flops[0])
                pred = ""
                if trained:
                    prob = torch.softmax(out.logits[0].float(), -1)
                    pred = f"  {labels[int(prob.argmax())] if prob.numel() == 2 else int(prob.argmax())} ({float(prob.max()):.2f})"
                print(
                    f"  {_label(b):>6} {flops / 1e6:7.1f}M {flops / fm.dense(seq):8.1%} {ms['gated']:8.2f} {ms['dense']:8.2f} "
                    f"{ms['dense'] / ms['gated']:6.2f}×  {_row(heads):<{3 * gated.n_gated}} "
                    f"{_row(ffn):<{3 * gated.n_gated}} {layers}{pred}"
                )
                summary[b].append((flops / fm.dense(seq), ms["dense"] / ms["gated"]))
    print("\nsummary (batch 1, median of interleaved runs):")
    for b, rows in summary.items():
        ratio = statistics.mean(r for r, _ in rows)
        speed = statistics.mean(s for _, s in rows)
        print(
            f"  budget {_label(b):>4}: executed FLOPs {ratio:6.1%} of dense, ideal speedup {1 / ratio:5.2f}×, measured {speed:5.2f}×"
        )
    return 0
