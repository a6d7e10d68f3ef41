"""`dynprune train --config configs/X.yaml [--section.key=value ...] [--resume]`.

The YAML file maps onto :class:`dynprune.train.config.TrainConfig` one-to-one;
every field can be overridden with a dotted flag, type-checked by draccus
(``--gate.temperature=0.5``, ``--evaluation.budgets=[0.25,0.5]``,
``--model.path=null``). Unknown keys, wrong types and invalid values are
errors that name the key, before anything is loaded or written.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from dynprune.train.config import TrainConfig

USAGE = """usage: dynprune train [--config FILE.yaml] [--section.key=value ...] [--resume]

Fine-tune a dense teacher, then a gated model (and its static control) to FLOPs budgets.
Sections: model, data, gate, optim, regularizer, distill, logging, checkpoint, evaluation
(docs/training.md lists every key). Examples:
  dynprune train --config configs/minilm_rt_quick.yaml
  dynprune train --config configs/minilm_rt.yaml --output_dir runs/rt --gate.temperature=0.5
  dynprune train --config configs/minilm_rt.yaml --output_dir runs/rt --resume
  dynprune train --config configs/minilm_rt.yaml --data.path=reviews.csv --data.label_column=sentiment
Multi-process (CPU): ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 \\
  -m dynprune.train --config ...     `dynprune train --help-keys` prints every key with its default."""


class ConfigError(ValueError):
    """The command line or the YAML file does not describe a valid TrainConfig."""


def _explain(err: BaseException) -> str:
    """The most useful message in an exception chain: draccus names the key in its own messages,
    except for "Couldn't instantiate ...", whose cause is our __post_init__ ValueError (naming it)."""
    seen = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = str(cur)
        if text and not text.startswith("Couldn't instantiate"):
            return text
        cur = cur.__cause__ or cur.__context__
    return str(err) or type(err).__name__


def config_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the config (``gate.temperature``, ...)."""
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        section = f.default_factory  # sections are fields with a dataclass as default factory
        if isinstance(section, type) and dataclasses.is_dataclass(section):
            out += config_keys(section, f"{key}.")
        else:
            out.append(key)
    return out


def _suggest(message: str) -> str:
    """Add "did you mean" for unknown keys."""
    import difflib

    unknown = re.findall(r"--([\w.]+)", message) + re.findall(r"fields `(\w+)`", message)
    keys = config_keys()
    hints = []
    for u in unknown:
        pool = keys if "." in u else keys + [k.split(".")[-1] for k in keys]
        close = difflib.get_close_matches(u, pool, n=1, cutoff=0.75)
        if close and close[0] != u:
            hints.append(f"{u} -> {close[0]}?")
    return f"{message} (did you mean: {', '.join(hints)})" if hints else message


def parse_config(argv: list[str]) -> TrainConfig:
    """argv (without the command name) -> validated TrainConfig; raises ConfigError naming the bad key."""
    import draccus

    args, config_path = [], None
    it = iter(argv)
    for a in it:
        if a == "--config":
            config_path = next(it, None)
            if config_path is None:
                raise ConfigError("--config needs a YAML file path")
        elif a.startswith("--config="):
            config_path = a.split("=", 1)[1]
        elif a == "--resume":
            args.append("--resume=true")
        else:
            args.append(a)
    if config_path is not None and not Path(config_path).is_file():
        raise ConfigError(f"config file {config_path!r} does not exist")
    from dynprune.train.config_compat import removed_key_note

    for a in args:
        note = removed_key_note(a.removeprefix("--").split("=", 1)[0])
        if note:
            raise ConfigError(note)
    bad = [a for a in args if a.startswith("-") and not a.startswith("--")]
    if bad:
        raise ConfigError(f"unknown option {bad[0]!r}: options look like --section.key=value")
    try:
        return draccus.parse(TrainConfig, config_path=config_path, args=args, exit_on_error=False)
    except SystemExit:
        raise
    except Exception as err:
        where = f" (config {config_path})" if config_path else ""
        message = _explain(err)
        section = re.match(r"`(\w+)`: The fields? `(\w+)`", message)
        note = section and removed_key_note(f"{section.group(1)}.{section.group(2)}")
        raise ConfigError(f"{note or _suggest(message)}{where}") from err


def dump_config(cfg: TrainConfig) -> str:
    import draccus

    return draccus.dump(cfg, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv and argv[0] == "--help-keys":
        print(dump_config(TrainConfig()))
        return 0
    try:
        cfg = parse_config(argv)
    except ConfigError as err:
        print(f"dynprune train: error: {err}", file=sys.stderr)
        return 2
    from dynprune.train.checkpoint import ResumeError
    from dynprune.train.data import DataError
    from dynprune.train.pipeline import run
    from dynprune.train.preflight import PreflightError

    try:
        run(cfg, dump_config(cfg))
    except (PreflightError, DataError, ResumeError) as err:
        print(f"dynprune train: error: {err}", file=sys.stderr)
        return 2
    return 0
