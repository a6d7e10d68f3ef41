"""Metrics logging: a JSON-lines file per run (always) and wandb (offline by default).

wandb never blocks or prompts: ``report_to: none`` disables it, the default
mode is offline (files under OUTPUT_DIR/wandb/, sync later with `wandb sync`),
``wandb_mode: online`` without an API key falls back to offline with a
warning, and a WANDB_MODE set in the environment (e.g. ``disabled``) wins.
Only the main process logs.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from dynprune.train.config import LoggingConfig


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class Tracker:
    def __init__(
        self, cfg: LoggingConfig, output_dir: Path, config: dict[str, Any], enabled: bool = True
    ) -> None:
        self.cfg, self.enabled = cfg, enabled
        self.path = output_dir / "logs" / "metrics.jsonl"
        self.run = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.report_to == "wandb":
            self.run = self._start_wandb(output_dir, config)

    def _start_wandb(self, output_dir: Path, config: dict[str, Any]):
        mode = os.environ.get("WANDB_MODE") or self.cfg.wandb_mode
        if mode == "disabled":
            return None
        if mode == "online" and not _has_wandb_key():
            warnings.warn(
                "wandb_mode=online but no wandb API key is configured: logging offline", stacklevel=2
            )
            mode = "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        run_file = output_dir / "logs" / "wandb_run_id"
        run_id = run_file.read_text().strip() if run_file.is_file() else uuid.uuid4().hex[:8]
        run_file.write_text(run_id)
        try:
            return wandb.init(
                project=self.cfg.project,
                name=self.cfg.run_name or output_dir.name,
                dir=str(output_dir),
                mode=mode,
                id=run_id,
                resume="allow",
                config=config,
            )
        except Exception as err:  # a logging backend must never stop training
            warnings.warn(f"wandb could not start ({err}); metrics go to {self.path} only", stacklevel=2)
            return None

    def log(self, stage: str, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {
            "stage": stage,
            "step": step,
            "time": time.time(),
            **{k: _plain(v) for k, v in metrics.items()},
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.run is not None:
            self.run.log({f"{stage}/{k}": v for k, v in row.items() if k not in ("stage", "time")})

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = _plain(v)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
