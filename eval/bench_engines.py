"""Engines for `dynprune bench cpu`: dense on eager / torch.compile / ONNX Runtime, static models on ORT.

Every dense engine runs the same unwrapped HF model: ``eager`` (PyTorch),
``compile`` (``torch.compile``, default mode, dynamic shapes after the first
recompile) and ``ort`` (the model exported by :func:`dynprune.eval.onnx_export.export_onnx`,
ONNX Runtime at its defaults: its own intra-op pool of ``--threads`` threads, spinning on).
The physically sliced *limit* model is exported the same way (``limit_ort``).
The gated model runs its default CPU path (``gated``: whatever
``GateConfig.backend`` selects; the PyTorch gathered path under ``auto``) and the
PyTorch gathered path explicitly (``gated_torch``, the reference). The ORT
engine's settings are compared in ``dynprune bench candidates``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from dynprune.eval.timing import TimingStats, paired_ratio

DENSE_ENGINES = ("eager", "compile", "ort")


def check_engines(engines: list[str], threads: int) -> None:
    """Clear errors before any timing: unknown engine, missing extra, bad thread count."""
    if threads < 1:
        raise SystemExit(f"dynprune bench cpu: --threads must be >= 1, got {threads}")
    bad = [e for e in engines if e not in DENSE_ENGINES]
    if bad:
        raise SystemExit(f"dynprune bench cpu: unknown engine(s) {bad}; choose from {list(DENSE_ENGINES)}")
    if "eager" not in engines:
        raise SystemExit("dynprune bench cpu: --engines must include eager (the reference)")
    if "ort" in engines:
        from dynprune.eval.onnx_export import require_ort

        try:
            require_ort()
        except RuntimeError as err:
            raise SystemExit(f"dynprune bench cpu: engine 'ort': {err}") from err


class DenseEngines:
    """The dense model on each requested engine, built once per run."""

    def __init__(self, dense: torch.nn.Module, engines: list[str], threads: int, onnx_file: Any = None):
        self.dense, self.engines, self.threads = dense, engines, threads
        self.compiled = torch.compile(dense) if "compile" in engines else None
        self.ort = None
        if "ort" in engines:
            from dynprune.eval.onnx_export import export_onnx, ort_session

            self.ort = ort_session(onnx_file if onnx_file is not None else export_onnx(dense), threads)

    def fns(self, inputs: dict[str, torch.Tensor]) -> dict[str, Callable[[], Any]]:
        out: dict[str, Callable[[], Any]] = {"dense": lambda: self.dense(**inputs)}
        if self.compiled is not None:
            out["dense_compile"] = lambda: self.compiled(**inputs)
        if self.ort is not None:
            from dynprune.eval.onnx_export import ort_runner

            out["dense_ort"] = ort_runner(self.ort, inputs)
        return out


def limit_ort_fn(limit: torch.nn.Module, inputs: dict[str, torch.Tensor], threads: int) -> Callable[[], Any]:
    from dynprune.eval.onnx_export import export_onnx, ort_runner, ort_session

    return ort_runner(ort_session(export_onnx(limit), threads), inputs)


def gated_torch_fn(gated: Any, inputs: dict[str, torch.Tensor], budget: float) -> Callable[[], Any]:
    from dynprune.exec import reference_path

    def run() -> Any:
        with reference_path(gated):
            return gated(**inputs, budget=budget)

    return run


DENSE_NAMES = {"dense": "eager", "dense_compile": "compile", "dense_ort": "ort"}


def engine_columns(stats: dict[str, TimingStats]) -> dict[str, Any]:
    """Speedups against the fastest dense engine (by median), the eager figure beside it."""
    dense = {k: v for k, v in stats.items() if k in DENSE_NAMES}
    fastest = min(dense, key=lambda k: dense[k].median_ms)
    row: dict[str, Any] = {
        "fastest_dense": DENSE_NAMES[fastest],
        "fastest_dense_ms": dense[fastest].median_ms,
        "speedup_vs_fastest": paired_ratio(stats[fastest], stats["gated"]),
    }
    if "dense_compile" in stats:
        row["compile_ms"] = stats["dense_compile"].median_ms
        row["compile_vs_eager"] = paired_ratio(stats["dense"], stats["dense_compile"])
    if "dense_ort" in stats:
        row["ort_ms"] = stats["dense_ort"].median_ms
        row["ort_vs_eager"] = paired_ratio(stats["dense"], stats["dense_ort"])
        row["speedup_vs_ort"] = paired_ratio(stats["dense_ort"], stats["gated"])
    if "gated_torch" in stats:
        row["gated_torch_ms"] = stats["gated_torch"].median_ms
        row["torch_path_speedup"] = paired_ratio(stats["dense"], stats["gated_torch"])
    if "limit_ort" in stats:
        row["limit_ort_ms"] = stats["limit_ort"].median_ms
        row["gated_vs_limit_ort"] = paired_ratio(stats["limit_ort"], stats["gated"])
        if "dense_ort" in stats:
            row["limit_ort_vs_ort"] = paired_ratio(stats["dense_ort"], stats["limit_ort"])
    return row


def engine_env(args: Any) -> dict[str, str]:
    """Thread and spin settings of the run, for the report."""
    env = {
        "engines": " ".join(args.engines),
        "threads": f"{args.threads} (torch.set_num_threads; ORT intra_op_num_threads for every session)",
        "ort_dense_spinning": "on (ORT default); each variant runs in its own block of "
        f"{args.block} timed calls after a {args.pause_ms:g} ms pause and one untimed call",
        "gated_path": "GatedModel's default CPU path: the ONNX Runtime engine (dynprune.exec). Batch 1: "
        "the whole forward (embeddings, router, selection, If-tree layers, head) in one ORT call; a static "
        "router's count vector met again runs on its own sliced session. Batches: the engine's layer "
        "session (threads spin within a run and stop at its end, PyTorch single-threaded around it); "
        "batches of more than 128 tokens or many distinct count vectors go to the PyTorch gathered path "
        "(column gated_engine)",
    }
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        env["onnxruntime"] = "(not installed)"
    return env


#: issue 12's goals vs ORT dense at its defaults: (batch, modes, budget, minimum speedup)
ORT_GOALS = [(1, ("shared", "per_sample"), 0.5, 1.5), (16, ("per_sample",), 0.5, 1.7),
             (1, ("shared", "per_sample"), 0.25, 2.2), (16, ("per_sample",), 0.25, 2.8)]  # fmt: skip
LIMIT_GOAL = 0.9


def ort_goal_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for batch, modes, budget, want in ORT_GOALS:
        hits = [r for r in rows if r["batch"] == batch and r["mask_mode"] in modes and r["budget"] == budget]
        hits = [r for r in hits if r.get("speedup_vs_ort") is not None]
        if hits:
            worst = min(r["speedup_vs_ort"] for r in hits)
            lines.append(
                f"batch {batch} budget {budget}: min speedup vs ORT dense {worst:.2f} (goal >= {want}) "
                f"{'met' if worst >= want else 'MISSED'}"
            )
    lim = [r["gated_vs_limit_ort"] for r in rows if r.get("gated_vs_limit_ort") is not None]
    if lim:
        lines.append(
            f"gated vs physically sliced model on ORT: min {min(lim):.2f}, median {statistics.median(lim):.2f} "
            f"(goal >= {LIMIT_GOAL}) {'met' if min(lim) >= LIMIT_GOAL else 'MISSED'}"
        )
    return lines


ENGINE_TABLE = [
    ("batch", "B"), ("seq", "T"), ("mask_mode", "masks"), ("budget", "budget"), ("flops_ratio", "flops"),
    ("dense_ms", "eager ms"), ("compile_ms", "compile ms"), ("ort_ms", "ORT ms"), ("gated_ms", "gated ms"),
    ("gated_torch_ms", "gated torch ms"), ("limit_ort_ms", "sliced ORT ms"), ("fastest_dense", "fastest"),
    ("speedup_vs_fastest", "vs fastest"), ("speedup", "vs eager"), ("speedup_vs_ort", "vs ORT"),
    ("limit_ort_vs_ort", "sliced ORT vs ORT"), ("gated_vs_limit_ort", "gated / sliced ORT"),
]  # fmt: skip
