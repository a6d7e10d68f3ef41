"""A/B timing of the gated MiniLM forward between two checkouts of dynprune, interleaved.

Usage: python scripts/ab_gathered_bench.py PYTHON_A PYTHON_B [--rounds N] [--out FILE]

Each PYTHON is an interpreter whose ``import dynprune`` is one version (e.g. the
main checkout's venv and this branch's). One persistent worker per version
loads the packaged MiniLM, wraps it (ffn_slice_size 128, a seeded random router
output layer so masks differ per sample), and on request times ``reps`` gated
forwards of one case (batch, budget; random token ids, seq 64) in eval mode
under ``torch.inference_mode`` and returns the median. The parent alternates
A, B, A, B… per case and reports the medians and the median of the paired
ratios B/A (1.0 = same speed; < 1 = B faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

WORKER = r"""
import json, statistics, sys, time
import torch
torch.set_num_threads(2)
import dynprune
from dynprune.assets import minilm_path
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
gated = dynprune.wrap(model, dynprune.GateConfig(ffn_slice_size=128)).eval()
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    gated.router.out.weight.copy_(torch.randn(gated.router.out.weight.shape, generator=g) * 0.5)
inputs = {}
for batch in (1, 16):
    ids = torch.randint(1000, 20000, (batch, 64), generator=g)
    inputs[batch] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
print("ready", flush=True)
for line in sys.stdin:
    batch, budget, reps = json.loads(line)
    x = inputs[batch]
    times = []
    with torch.inference_mode():
        for _ in range(3):
            gated(**x, budget=budget)
        for _ in range(reps):
            t0 = time.perf_counter()
            gated(**x, budget=budget)
            times.append(time.perf_counter() - t0)
    flops = float(gated.last.flops_ratio.mean())
    print(json.dumps([statistics.median(times) * 1e3, flops]), flush=True)
"""

CASES = [(1, 1.0), (1, 0.5), (1, 0.25), (16, 0.5), (16, 0.25)]


def _start(python: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [python, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/tmp"
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"worker {python} failed to start")
    return proc


def _ask(proc: subprocess.Popen, batch: int, budget: float, reps: int) -> tuple[float, float]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps([batch, budget, reps]) + "\n")
    proc.stdin.flush()
    ms, flops = json.loads(proc.stdout.readline())
    return ms, flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("python_a")
    p.add_argument("python_b")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out")
    args = p.parse_args()
    a, b = _start(args.python_a), _start(args.python_b)
    rows = []
    for batch, budget in CASES:
        reps = 30 if batch == 1 else 6
        ta, tb, ratios, fa, fb = [], [], [], 0.0, 0.0
        for _ in range(args.rounds):
            ms_a, fa = _ask(a, batch, budget, reps)
            ms_b, fb = _ask(b, batch, budget, reps)
            ta.append(ms_a)
            tb.append(ms_b)
            ratios.append(ms_b / ms_a)
        ratios.sort()
        row = {
            "batch": batch,
            "budget": budget,
            "flops_ratio_a": round(fa, 4),
            "flops_ratio_b": round(fb, 4),
            "ms_a": round(statistics.median(ta), 3),
            "ms_b": round(statistics.median(tb), 3),
            "ratio_b_over_a": round(statistics.median(ratios), 4),
            "ratio_min": round(ratios[0], 4),
            "ratio_max": round(ratios[-1], 4),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    for proc in (a, b):
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait()
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(
                {"rounds": args.rounds, "a": args.python_a, "b": args.python_b, "rows": rows}, fh, indent=2
            )


if __name__ == "__main__":
    sys.exit(main())
