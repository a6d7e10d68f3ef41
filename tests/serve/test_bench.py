"""`dynprune bench serve` end to end on the tiny checkpoint (slow: three server processes)."""

from __future__ import annotations

import json

import pytest

from dynprune.serve.bench import main


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
    assert "Goal" in (out / "bench_serve.md").read_text()
    with pytest.raises(SystemExit, match="exists"):
        main(argv)  # never overwrites results silently
