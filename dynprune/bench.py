"""`dynprune bench <name>`: dispatch to the benchmark modules."""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "cpu": (
        "dynprune.eval.bench_cpu",
        "gated vs dense vs physically sliced MiniLM on CPU (ratio to ideal speedup)",
    ),
    "generate": (
        "dynprune.eval.bench_generate",
        "gated vs dense generate() with a KV cache, SmolLM2-135M on CPU (tokens/s, KV bytes)",
    ),
    "candidates": (
        "dynprune.eval.bench_candidates",
        "ways to run gated layers on CPU (ONNX Runtime engine settings, PyTorch path) vs ORT dense",
    ),
    "calibrate": (
        "dynprune.eval.bench_calibrate",
        "measure this machine's cost table (ms per head / FFN slice / layer) for millisecond budgets",
    ),
    "timecost": (
        "dynprune.eval.bench_timecost",
        "FLOPs-priced vs time-priced selection at the same predicted ms, batch 1 (needs a cost table)",
    ),
    "kernels": ("dynprune.kernels.bench", "Triton gated FFN/attention vs dense cuBLAS/SDPA (GPU)"),
    "serve": (
        "dynprune.serve.bench",
        "load on local `dynprune serve` processes: correctness, latency, throughput, overload",
    ),
    "serve-generate": (
        "dynprune.serve.bench_generate",
        "generation load on local `dynprune serve` processes (SmolLM2): correctness, tokens/s, overload",
    ),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: dynprune bench {{{','.join(BENCHES)}}} [options]   (dynprune bench <name> --help)\n")
        for name, (_, desc) in BENCHES.items():
            print(f"  {name:8s} {desc}")
        return 0
    if argv[0] not in BENCHES:
        print(
            f"dynprune bench: unknown benchmark {argv[0]!r}; choose from {sorted(BENCHES)}", file=sys.stderr
        )
        return 2
    return int(importlib.import_module(BENCHES[argv[0]][0]).main(argv[1:]) or 0)
