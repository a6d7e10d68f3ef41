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
    """The README's main job without the sweep (about 12 minutes on 2 cores)."""
    out = tmp_path / "qs"
    assert quickstart.main(["--output-dir", str(out), "--skip-sweep"]) == 0
    rows = json.loads((out / "eval" / "eval.json").read_text())
    assert (out / "train" / "report" / "summary.md").is_file()
    assert rows  # one entry per budget, each within its budget (checked by eval itself)
