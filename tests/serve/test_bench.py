"""`dynprune bench serve` end to end on the tiny checkpoint (slow: three server processes)."""

from __future__ import annotations

import json

import pytest

from dynprune.serve.bench import main
from dynprune.serve.bench_report import goal_verdict


@pytest.mark.parametrize(
    ("ratios", "p99", "verdict", "bound"),
    [
        (
            [1.92, 1.94, 1.96],
            0.49,
            "met",
            "at least 1.89 >= 1.6",
        ),  # a lower bound, every round above the goal
        ([1.39, 1.40, 1.41], 0.67, "not established", "reaches below 1.6"),  # a lower bound below it
        ([1.21, 1.20, 1.19], 1.30, "NOT met", "at most 1.2"),  # an upper bound below the goal
        ([1.90, 1.88, 1.92], 1.30, "not established", "reaches 1.6 or above"),  # upper bound above it
        (
            [1.21, 1.57, 1.82, 1.60, 1.65],
            0.69,
            "not established",
            "reaches below 1.6",
        ),  # median 1.60: rounds disagree
        ([1.7, 1.8], 0.5, "not established", "2 paired round(s) < 3"),  # too few rounds for an interval
    ],
)
def test_goal_verdict_follows_from_the_interval_the_rounds_give(ratios, p99, verdict, bound):
    got, why = goal_verdict(ratios, p99)
    assert got == verdict and bound in why, (got, why)


@pytest.mark.slow
def test_bench_serve_finds_no_lost_or_wrong_answers_and_overload_gets_429(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench"
    argv = ["--checkpoint", str(tiny_checkpoint), "--burst", "40", "--requests", "24", "--rounds", "1"]
    argv += ["--overload", "80", "--concurrency", "8", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "bench_serve.json").read_text())
    assert report["lost"] == 0 and report["wrong"] == {"label": 0, "flops": 0, "scores": 0}
    assert report["burst"]["statuses"] == {"200": 40} and report["burst"]["max_batch_seen"] > 1
    statuses = report["overload"]["statuses"]
    assert set(statuses) <= {"200", "429"} and statuses.get("429", 0) > 0
    assert report["overload"]["all_429_have_retry_after"]
    assert report["exit_codes"] == {"batching on": 0, "batching off": 0, "overload": 0}
    on = report["summary"]
    verdict, why = goal_verdict(
        on["gated0.5_over_dense_throughput (batching on)"]["rounds"],
        on["gated0.5_over_dense_p99 (batching on)"]["median"],
    )
    assert f"**{verdict}** ({why})" in (out / "bench_serve.md").read_text()
    with pytest.raises(SystemExit, match="exists"):
        main(argv)  # never overwrites results silently
