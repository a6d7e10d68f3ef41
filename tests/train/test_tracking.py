"""Logging: JSON lines always; wandb offline by default, never prompting without an API key."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
from dynprune.train.config import LoggingConfig
from dynprune.train.tracking import Tracker


def test_jsonl_and_disabled_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    t = Tracker(LoggingConfig(), tmp_path, {"seed": 0})
    t.log("gated", 5, {"loss": 0.5, "lambda1": 1.0})
    t.finish()
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["stage"] == "gated" and rows[0]["step"] == 5 and rows[0]["loss"] == 0.5
    assert not (tmp_path / "wandb").exists()
    none = Tracker(LoggingConfig(report_to="none"), tmp_path / "b", {})
    assert none.run is None


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_wandb_offline_without_api_key(tmp_path, monkeypatch, mode):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    with pytest.warns(UserWarning, match="offline") if mode == "online" else nullcontext():
        t = Tracker(LoggingConfig(wandb_mode=mode), tmp_path, {"seed": 0})
    assert t.run is not None
    t.log("dense", 1, {"loss": 1.0})
    t.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
