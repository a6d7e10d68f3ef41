"""Side-by-side CPU/GPU timing: interleaved rounds, medians, spreads, paired ratios.

Rules this module encodes (see /work/shared/PLATFORM.md, "CPU timing"):

- variants are timed *interleaved* (A, B, C, A, B, C, ...), never one after
  the other, so slow phases of a shared machine hit every variant alike; the
  order inside a round is rotated so no variant always runs right after another;
- warm-up rounds first (allocator caches, lazy packing, first-touch page faults);
- the median and the inter-quartile range (IQR) of the per-call times are
  reported; ratios between two variants are the median of *paired* per-round
  ratios, which cancels most run-to-run noise;
- the garbage collector is paused while timing; everything runs under
  ``torch.inference_mode()`` unless the caller says otherwise.

Typical use::

    stats = time_interleaved({"dense": lambda: dense(**batch), "gated": lambda: gated(**batch)})
    stats["gated"].median_ms, stats["gated"].iqr_ms
    paired_ratio(stats["dense"], stats["gated"])  # median speedup of gated over dense

:func:`materialize` copies memory-mapped weights into ordinary RAM before timing.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "TimingStats",
    "materialize",
    "paired_ratio",
    "runtime_env",
    "time_blocks",
    "time_interleaved",
]


@dataclass
class TimingStats:
    """Per-call wall times of one variant, in milliseconds, in round order."""

    name: str
    times_ms: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.times_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    def quantile_ms(self, q: float) -> float:
        """Linear-interpolated quantile (q in [0, 1]) of the call times."""
        xs = sorted(self.times_ms)
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def q1_ms(self) -> float:
        return self.quantile_ms(0.25)

    @property
    def q3_ms(self) -> float:
        return self.quantile_ms(0.75)

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    def summary(self) -> str:
        return f"{self.name}: {self.median_ms:.3f} ms (IQR {self.iqr_ms:.3f}, n={self.n})"


def paired_ratio(numerator: TimingStats, denominator: TimingStats) -> float:
    """Median over rounds of numerator_i / denominator_i (e.g. dense / gated = speedup).

    Both must come from the same :func:`time_interleaved` call (same rounds).
    """
    if numerator.n != denominator.n or numerator.n == 0:
        raise ValueError(
            f"paired_ratio needs two timings of the same rounds; got {numerator.n} and {denominator.n} calls"
        )
    return statistics.median(a / b for a, b in zip(numerator.times_ms, denominator.times_ms))


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    warmup: int = 3,
    repeats: int = 20,
    *,
    min_seconds: float = 0.0,
    max_repeats: int | None = None,
    inference: bool = True,
    sync: Callable[[], None] | None = None,
    rotate: bool = True,
) -> dict[str, TimingStats]:
    """Time every function in ``fns`` over interleaved rounds; returns {name: TimingStats}.

    ``warmup`` untimed rounds run first, then at least ``repeats`` timed rounds
    (and, if ``min_seconds`` > 0, more rounds until that much time has been
    spent, up to ``max_repeats``). In each round every function runs once; the
    order is rotated between rounds when ``rotate``. ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called before and after each timed call; on
    CUDA it is picked automatically when CUDA is initialised.
    """
    if not fns:
        raise ValueError("time_interleaved needs at least one function")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if sync is None and torch.cuda.is_available() and torch.cuda.is_initialized():
        sync = torch.cuda.synchronize
    names = list(fns)
    stats = {name: TimingStats(name) for name in names}
    limit = max(repeats, max_repeats or repeats)
    with _warmed_up(fns, warmup, inference):
        start = time.perf_counter()
        rounds = 0
        while rounds < repeats or (time.perf_counter() - start < min_seconds and rounds < limit):
            shift = rounds % len(names) if rotate else 0
            for name in names[shift:] + names[:shift]:
                fn = fns[name]
                if sync is not None:
                    sync()
                t0 = time.perf_counter()
                fn()
                if sync is not None:
                    sync()
                stats[name].times_ms.append((time.perf_counter() - t0) * 1e3)
            rounds += 1
    return stats


@contextmanager
def _warmed_up(fns: dict, warmup: int, inference: bool):
    """Run every fn ``warmup`` times, then time with the GC off (and inference mode, if asked)."""
    gc_was_enabled = gc.isenabled()
    try:
        with torch.inference_mode() if inference else nullcontext():
            for _ in range(warmup):
                for fn in fns.values():
                    fn()
            gc.collect()
            gc.disable()
            yield
    finally:
        if gc_was_enabled:
            gc.enable()


def materialize(module: torch.nn.Module) -> torch.nn.Module:
    """Copy every parameter and buffer into ordinary (anonymous) memory, in place.

    Weights loaded from safetensors can stay memory-mapped from the file, and
    their pages can be evicted between runs; timing such a model measures the
    page cache. Returns ``module`` for chaining.
    """
    with torch.no_grad():
        for p in module.parameters():
            p.data = p.data.clone(memory_format=torch.contiguous_format)
        for mod in module.modules():
            for name, buf in list(mod._buffers.items()):
                if buf is not None:
                    mod._buffers[name] = buf.clone(memory_format=torch.contiguous_format)
    return module


def load_for_timing(checkpoint: str, threads: int, prog: str, budgets: list[float] = ()) -> tuple[Any, Any]:
    """A saved gated model ready to time: budgets checked to be in (0, 1) first (``prog``: the
    command, for the error), ``threads`` torch threads, weights in ordinary memory
    (:func:`materialize`), eval mode -> (gated, tokenizer or None)."""
    for b in budgets:
        if not 0.0 < b < 1.0:
            raise SystemExit(f"{prog}: --budgets must be in (0, 1), got {b}")
    import dynprune

    torch.set_num_threads(threads)
    gated, tokenizer = dynprune.load_gated_model(checkpoint)
    materialize(gated)
    return gated.eval(), tokenizer


_ENV_KEYS = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "MKL_NUM_THREADS",
    "KMP_BLOCKTIME",
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "LD_PRELOAD",
)


def busy_cpu_note(load: float | None = None, cores: int | None = None) -> str | None:
    """A warning when the CPU is already busy before long work starts (1-minute load average at
    least the number of cores), else None: torch's threads then compete with the other work and
    wait for each other — four 2-thread trainings on 2 cores ran 10-70x slower per step than one."""
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            return None
    cores = cores or os.cpu_count() or 1
    if load < cores:
        return None
    return (
        f"the CPU is already busy (load average {load:.1f} on {cores} cores): this run's "
        f"{torch.get_num_threads()} torch threads will compete with that work and can run many times "
        "slower; on a small machine, one job at a time finishes soonest"
    )


def runtime_env() -> dict[str, str]:
    """What a timing depends on: CPU model, cores, torch version/threads, relevant env vars."""
    import platform

    cpu = platform.processor() or platform.machine()
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "flags") and key not in info:
                    info[key] = value.strip()
    except OSError:
        pass
    if "model name" in info:
        cpu = info["model name"]
        if "cpu family" in info:
            cpu += f" (family {info['cpu family']}, model {info.get('model', '?')})"
        if "avx512f" in info.get("flags", "").split():
            cpu += ", AVX-512"
    env = {
        "cpu": cpu,
        "logical_cpus": str(os.cpu_count()),
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    for key in _ENV_KEYS:
        env[key] = os.environ.get(key, "(unset)")
    return env


def time_blocks(
    fns: dict[str, Callable[[], Any]],
    warmup: int = 2,
    repeats: int = 15,
    *,
    block: int = 3,
    pause_s: float = 0.05,
    inference: bool = True,
) -> dict[str, TimingStats]:
    """Interleaved rounds in which every variant runs a *block* of ``block`` calls after a pause.

    For engines whose threads spin after a run (ONNX Runtime by default): a
    variant's block runs as users run it, back to back, and the ``pause_s``
    pause before the next block lets the previous engine's threads stop
    spinning, so no variant pays for another's spin (/work/shared/PLATFORM.md).
    A round's time of a variant is the median of its block; rounds rotate the
    order like :func:`time_interleaved`, and ``paired_ratio`` applies as there.
    """
    if not fns:
        raise ValueError("time_blocks needs at least one function")
    if repeats < 1 or warmup < 0 or block < 1:
        raise ValueError(f"need repeats >= 1, block >= 1, warmup >= 0; got {repeats}, {block}, {warmup}")
    names = list(fns)
    stats = {name: TimingStats(name) for name in names}
    with _warmed_up(fns, warmup, inference):
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                fn = fns[name]
                time.sleep(pause_s)
                fn()  # first call after the pause: untimed (threads wake up)
                times = []
                for _ in range(block):
                    t0 = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t0) * 1e3)
                stats[name].times_ms.append(statistics.median(times))
    return stats
