"""`dynprune <command> ...`: one entry point, each command implemented in its own module.

Every command module exposes ``main(argv: list[str]) -> int`` and handles its
own ``--help``; this file only dispatches (imports are lazy so `--help` is fast
and optional dependencies are only needed by the commands that use them).
"""

from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv), one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "dynprune.demo",
        "wrap packaged MiniLM, route real reviews at several budgets, print gates/FLOPs/time",
    ),
    "train": (
        "dynprune.train.cli",
        "fine-tune a dense teacher, then a gated model to a FLOPs target (YAML config)",
    ),
    "eval": (
        "dynprune.eval.cli",
        "evaluate a checkpoint: accuracy, FLOPs, latency vs dense, gate statistics",
    ),
    "calibrate": (
        "dynprune.eval.calibrate",
        "fit a mean-budget policy (MeanBudget) on the validation split, saved with the gates",
    ),
    "sweep": (
        "dynprune.eval.sweep",
        "accuracy-FLOPs-latency sweep of dynamic gates vs static pruning baselines",
    ),
    "export": (
        "dynprune.exec.export",
        "export a gated checkpoint to ONNX + a numpy/onnxruntime runner (no torch needed to serve it)",
    ),
    "bench": (
        "dynprune.bench",
        "benchmarks: `bench cpu` (gated vs dense on CPU), `bench kernels` (Triton vs dense)",
    ),
    "serve": (
        "dynprune.serve.cli",
        "serve a gated model over HTTP (per-request budgets batched together; needs dynprune[serve])",
    ),
    "quickstart": (
        "dynprune.quickstart",
        "the README's main job: quick train + evaluation on packaged MiniLM/Rotten Tomatoes",
    ),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: dynprune <command> [options]   (dynprune <command> --help for details)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from dynprune import __version__

        print(f"dynprune {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"dynprune: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
