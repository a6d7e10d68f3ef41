"""`dynprune quickstart`: finds its configs, fails clearly without them; the full run is a slow test."""

import json
from pathlib import Path

import pytest

from dynprune import quickstart

REPO = Path(__file__).resolve().parents[2]


def test_finds_the_checkout_configs_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./configs here: falls back to the source checkout's
    assert quickstart.find_configs(None).resolve() == (REPO / "configs").resolve()


def test_missing_configs_is_a_clear_error(tmp_path, capsys):
    assert quickstart.main(["--configs", str(tmp_path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().out
    assert "minilm_rt_quick.yaml" in err and "--configs" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_quickstart_trains_and_evaluates_end_to_end(tmp_path):
    """The README's main job without the sweep (about 7 minutes on 2 quiet cores)."""
    out = tmp_path / "qs"
    assert quickstart.main(["--output-dir", str(out), "--skip-sweep"]) == 0
    assert (out / "train" / "report" / "summary.md").is_file()
    rows = {
        r["budget"]: r for r in json.loads((out / "eval" / "eval-0.75_0.5_0.25.json").read_text())["rows"]
    }
    assert set(rows) == {1.0, 0.25, 0.5, 0.75}
    for budget in (0.25, 0.5, 0.75):
        assert rows[budget]["flops_ratio_p95"] <= budget + 1e-9  # p95 (every sample: tests/core)
        assert rows[budget]["speedup_bs16"] > 1.0  # skipped units cost less time than dense
    # a real learning signal: the dense model beats chance on balanced reviews by a wide margin,
    # and half the FLOPs keep most of it
    assert rows[1.0]["accuracy"] > 0.7 and rows[0.5]["accuracy"] > rows[1.0]["accuracy"] - 0.05
