"""Summary and files of `dynprune bench serve`: medians, paired ratios, bench_serve.{md,csv,json}."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MIXED = (0.25, 0.5, 0.75, 1.0)
GOAL = 1.6  # throughput at budget 0.5 / dense, at the same p99 (batching on)


MIN_ROUNDS = 3  # fewer paired rounds: no interval, no verdict


def goal_verdict(ratios: Sequence[float], p99_ratio: float, goal: float = GOAL) -> tuple[str, str]:
    """Verdict on the throughput goal from per-round paired ratios at equal concurrency, and why.

    ``ratios``: gated / dense throughput of each paired round; ``p99_ratio``: gated p99 / dense p99
    (median over the same rounds). The ratio is judged by its 95 % t-interval over rounds (of the
    log ratios: a geometric mean), so a verdict needs the rounds to agree, not only their median.
    In a closed loop throughput rises with latency: when gated p99 <= dense p99, gated could take
    more load up to dense's p99, so the measured ratio is a lower bound of the same-p99 ratio
    ("met" needs the interval's low end >= goal); when gated p99 >= dense p99 it is an upper
    bound ("NOT met" needs the high end < goal). Anything else decides nothing.
    """
    from dynprune.eval.sweep_stats import t_interval

    if len(ratios) < MIN_ROUNDS:
        return "not established", f"{len(ratios)} paired round(s) < {MIN_ROUNDS}: no interval"
    mean, low, high = (math.exp(x) for x in t_interval([math.log(r) for r in ratios]))
    measured = (
        f"throughput ratio {mean:.2f}, 95 % t-interval over {len(ratios)} rounds [{low:.2f}, {high:.2f}], "
        f"at equal concurrency; gated p99 / dense p99 = {p99_ratio:.2f}"
    )
    if p99_ratio <= 1.0 and low >= goal:
        return "met", f"{measured} <= 1: at the same p99 the ratio is at least {low:.2f} >= {goal}"
    if p99_ratio >= 1.0 and high < goal:
        return "NOT met", f"{measured} >= 1: at the same p99 the ratio is at most {high:.2f} < {goal}"
    if p99_ratio <= 1.0:
        return "not established", (
            f"{measured} <= 1: a lower bound of the same-p99 ratio, whose interval reaches below {goal}"
        )
    return "not established", (
        f"{measured} > 1: an upper bound of the same-p99 ratio, whose interval reaches {goal} or above"
    )


TABLE_KEYS = ("throughput_rps", "p50_ms", "p99_ms", "mean_flops_ratio", "mean_batch")


def summarize(
    rows: list[dict],
    gated: str = "gated 0.5",
    rate: str = "throughput_rps",
    keys: tuple[str, ...] = TABLE_KEYS,
) -> dict[str, Any]:
    """Medians over rounds per (server, variant) of ``keys``, and paired per-round ratios of ``rate``
    (and p99) between the ``gated`` variant and dense, and between batching on and off."""

    def cell(server: str, variant: str, key: str) -> list[float]:
        return [
            r[key]
            for r in sorted(rows, key=lambda r: r["round"])
            if r["server"] == server and r["variant"] == variant
        ]

    table = {}
    for r in rows:
        k = f"{r['server']} / {r['variant']}"
        if k not in table:
            table[k] = {key: statistics.median(cell(r["server"], r["variant"], key)) for key in keys}
            table[k]["rounds"] = len(cell(r["server"], r["variant"], rate))

    def paired(a: tuple[str, str], b: tuple[str, str], key: str) -> dict[str, float]:
        ratios = [x / y for x, y in zip(cell(*a, key), cell(*b, key))]
        return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": ratios}

    g = gated.replace("gated ", "gated")
    name = "throughput" if rate == "throughput_rps" else rate
    on, off, dense = "batching on", "batching off", "dense"
    return {
        "table": table,
        f"{g}_over_dense_{name} (batching on)": paired((on, gated), (on, dense), rate),
        f"{g}_over_dense_p99 (batching on)": paired((on, gated), (on, dense), "p99_ms"),
        f"batching_on_over_off_{name} (dense)": paired((on, dense), (off, dense), rate),
        f"batching_on_over_off_{name} ({gated})": paired((on, gated), (off, gated), rate),
        f"{g}_over_dense_{name} (batching off)": paired((off, gated), (off, dense), rate),
    }


def ratio_lines(summary: dict[str, Any]) -> list[str]:
    """The summary's paired per-round ratios as Markdown bullets."""
    lines = ["", "Paired per-round ratios (median [min, max] over rounds):", ""]
    for k, v in summary.items():
        if k != "table":
            lines.append(f"- {k}: {v['median']:.2f} [{v['min']:.2f}, {v['max']:.2f}]")
    return lines


def overload_lines(report: dict[str, Any], what: str, queued: str) -> list[str]:
    """The overload phase and the servers' exit codes as Markdown (``what``: requests / prompts)."""
    o = report["overload"]
    return [
        f"## Overload: {o['requests']} concurrent {what}, queue of {o['queue']} {queued}",
        "",
        f"statuses {o['statuses']} in {o['wall_s']:.2f} s; every 429 has Retry-After: "
        f"{o['all_429_have_retry_after']}. Server exit codes after SIGTERM: {report['exit_codes']}.",
        "",
    ]


def write_data(out: Path, stem: str, report: dict[str, Any]) -> None:
    """``out/<stem>.json`` (the whole report) and ``out/<stem>.csv`` (one row per closed-loop round)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    rows = report["closed_loop"]
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write(out: Path, report: dict[str, Any]) -> None:
    write_data(out, "bench_serve", report)
    s = report["summary"]
    a = report["args"]
    lines = [
        "# dynprune bench serve",
        "",
        f"Machine: {report['machine']}. Server and load generator on the same machine (loopback).",
        f"Model: `{report['checkpoint']}`; each server runs `--threads {a['threads']}`.",
        "",
        f"## Burst: {report['burst']['requests']} concurrent requests, mixed budgets {list(MIXED)}",
        "",
        f"statuses {report['burst']['statuses']}, {report['burst']['wall_s']:.2f} s, largest batch "
        f"{report['burst']['max_batch_seen']}.",
        "",
        f"## Correctness: {report['checked']} answers checked, lost {report['lost']}, wrong {report['wrong']}",
        "",
        "Reference: the same text alone, padded to the `padded_len` its batch ran at, same budget",
        "(masks depend on the padded length): label, executed FLOPs (1e-9) and probabilities (1e-4).",
        "",
        f"## Closed loop: {a['concurrency']} clients, {a['requests']} single-text requests per variant, "
        f"{a['rounds']} interleaved rounds (medians)",
        "",
        "| server / budget | throughput (req/s) | p50 (ms) | p99 (ms) | mean FLOPs ratio | mean batch |",
        "|---|---|---|---|---|---|",
    ]
    for k, v in s["table"].items():
        lines.append(
            f"| {k} | {v['throughput_rps']:.1f} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | "
            f"{v['mean_flops_ratio']:.3f} | {v['mean_batch']:.1f} |"
        )
    lines += ratio_lines(s)
    g = s["gated0.5_over_dense_throughput (batching on)"]["rounds"]
    p = s["gated0.5_over_dense_p99 (batching on)"]["median"]
    verdict, why = goal_verdict(g, p)
    lines += [
        "",
        f"Goal (batching on, throughput at budget 0.5 >= {GOAL}x dense at the same p99): **{verdict}** ({why}).",
        "",
        *overload_lines(report, "requests", "texts"),
    ]
    (out / "bench_serve.md").write_text("\n".join(lines))
