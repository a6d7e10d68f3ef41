"""`dynprune demo` on the packaged MiniLM and real reviews: runs, and every budget's FLOPs hold."""

import re

import pytest

from dynprune import demo

pytestmark = pytest.mark.real


def test_demo_routes_real_reviews_within_budget(capsys):
    assert demo.main(["--reviews", "2", "--budgets", "0.5", "0.25", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    # per-review rows: budget, FLOPs, share of dense, gated ms, dense ms, speedup
    rows = re.findall(r"^\s+(0\.\d\d)\s+[\d.]+M\s+([\d.]+)%\s+[\d.]+\s+[\d.]+\s+[\d.]+×", out, flags=re.M)
    assert len(rows) == 4  # 2 reviews x 2 budgets
    for budget, share in rows:
        assert float(share) / 100 <= float(budget) + 1e-3
    assert "summary (batch 1" in out
