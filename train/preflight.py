"""Checks that run before any long work: bad input fails in seconds, and nothing on disk is touched.

- the output directory is writable, and holds no other run (unless ``--resume``);
- on ``--resume``: the saved config agrees with this one on everything that
  shapes training (model, data, gates, optimisation, regulariser, distillation,
  seed, stages), and the checkpoints are for this stage layout;
- the model directory and tokenizer load, the architecture is supported, the
  gate settings fit the model (slice size, router layer), and the smallest
  training budget is above the fixed cost (router + task head + dense layers),
  and data.max_length fits the model's position embeddings (MiniLM: 512);
- the data loads (files, columns, classes, labels) — see :mod:`dynprune.train.data`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import yaml
from dynprune.eval.timing import busy_cpu_note
from dynprune.train.config import TrainConfig
from dynprune.train.config_compat import config_diff
from dynprune.train.data import TaskData, load_task_data


class PreflightError(ValueError):
    """The run cannot start; the message says why and what to change."""


def _writable(out: Path) -> None:
    probe_dir = out
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise PreflightError(f"output_dir {str(out)!r}: {str(probe_dir)!r} exists and is not a directory")
    try:
        fd, name = tempfile.mkstemp(dir=probe_dir, prefix=".dynprune-write-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise PreflightError(
            f"output_dir {str(out)!r} is not writable ({err.strerror} in {str(probe_dir)!r})"
        ) from err


def _previous_run(out: Path) -> bool:
    if not out.is_dir():
        return False
    markers = ("config.yaml", "checkpoints", "dense", "gated", "static", "report")
    return any((out / m).exists() for m in markers)


def check_output_dir(cfg: TrainConfig, out: Path) -> None:
    _writable(out)
    if not _previous_run(out):
        return
    if not cfg.resume:
        raise PreflightError(
            f"output_dir {str(out)!r} already holds a run; pass --resume to continue it, "
            "or choose another --output_dir (nothing was changed)"
        )
    saved_file = out / "config.yaml"
    if not saved_file.is_file():
        raise PreflightError(
            f"cannot resume: {str(saved_file)!r} is missing, so this is not a dynprune run directory"
        )
    try:
        saved = yaml.safe_load(saved_file.read_text()) or {}
    except yaml.YAMLError as err:
        raise PreflightError(f"cannot resume: {str(saved_file)!r} is not valid YAML ({err})") from err
    diff = config_diff(saved, cfg.to_dict(), defaults=type(cfg)().to_dict())
    if diff:
        raise PreflightError(
            f"cannot resume {str(out)!r}: the checkpoint was made with a different config:\n  - "
            + "\n  - ".join(diff)
            + "\nresume with the same settings (logging/checkpoint/evaluation may change), or use a new --output_dir"
        )


def check_model(cfg: TrainConfig, num_labels: int) -> str:
    """Load config + tokenizer, build the gated model from the config (random weights, no load)."""
    import torch
    import transformers

    from dynprune import wrap
    from dynprune.arch import UnsupportedModelError

    if cfg.model.path is not None:
        path = cfg.model.path
    else:
        from dynprune.assets import minilm_path

        path = str(minilm_path())
    for label, p in (("model.path", path), ("model.teacher_path", cfg.model.teacher_path)):
        if p is None:
            continue
        try:
            config = transformers.AutoConfig.from_pretrained(p, num_labels=num_labels)
        except (OSError, ValueError) as err:
            raise PreflightError(f"{label}={p!r} could not be loaded as a Hugging Face model: {err}") from err
    try:
        transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise PreflightError(f"model.path={path!r} has no usable tokenizer: {err}") from err
    config = transformers.AutoConfig.from_pretrained(cfg.model.teacher_path or path, num_labels=num_labels)
    seq = cfg.data.max_length
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and seq > positions:
        raise PreflightError(
            f"data.max_length={seq} is longer than model {path!r} can read "
            f"(max_position_embeddings={positions}); set --data.max_length={positions} or less"
        )
    for stage, router in (("gated", "dynamic"), ("static", "static")):
        if stage not in cfg.stages:
            continue
        with torch.device("meta"):  # a weight-less model: sizes only, nothing loaded
            try:
                model = transformers.AutoModelForSequenceClassification.from_config(config)
            except ValueError as err:
                raise PreflightError(f"model {path!r} has no sequence-classification head: {err}") from err
        # identity unit order: nothing to compute on the meta model (thrown away afterwards)
        gate_cfg = replace(cfg.gate.gate_config(router=router), unit_order="none")
        try:
            fm = wrap(model, gate_cfg).flops
        except UnsupportedModelError as err:
            raise PreflightError(str(err)) from err
        except ValueError as err:
            raise PreflightError(f"gate settings do not fit model {path!r}: {err}") from err
        least = max(fm.fixed(t) / fm.dense(t) for t in (1, seq))
        if cfg.gate.budget_min <= least:
            raise PreflightError(
                f"gate.budget_min={cfg.gate.budget_min} is below what this gated model can run at: the router, "
                f"task head and {cfg.gate.router_layer} dense layer(s) alone cost {least:.3f} of dense FLOPs"
            )
    return path


def preflight(cfg: TrainConfig, out: Path, is_main: bool = True) -> tuple[str, TaskData]:
    """Validate everything cheap to validate -> (model path, loaded data). Raises PreflightError / DataError."""
    if is_main:
        check_output_dir(cfg, out)
        note = busy_cpu_note()
        if note:
            print(f"dynprune train: warning: {note}", file=sys.stderr, flush=True)
    data = load_task_data(cfg.data)
    return check_model(cfg, data.num_labels), data
