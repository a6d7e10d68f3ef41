"""Crash-safe training checkpoints: written to a temporary directory, then renamed.

Layout of one stage's checkpoints::

    checkpoints/<stage>/step-00000400/
        model.safetensors      the trained module (GatedModel: HF weights in unit order + routers)
        optimizer.pt           optimiser state (tensors only; loaded with weights_only=True)
        scheduler.pt           LR scheduler state
        state.json             step, data position, objective state (multipliers...), history
        rng-<rank>.json        python / numpy / torch RNG states of every process
        config.yaml            the resolved training config
        complete.json          written last: every file above with its size

A checkpoint directory is only ever created by an atomic rename of a
finished temporary directory, and it is only loaded if ``complete.json``
lists files that are all there with the listed sizes: a half-written
checkpoint (killed process, full disk, copied tree) is never loaded.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run (other process count, data or schedule)."""


PREFIX = "step-"
MANIFEST = "complete.json"
_NAME = re.compile(r"^step-(\d{8})$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (temp file + fsync + rename)."""
    from dynprune.io import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(data, indent=2, default=_jsonable).encode())


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of directories named like checkpoints, ascending (complete or not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def is_complete(path: Path) -> bool:
    manifest = path / MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(
        (path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items()
    )


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (incomplete ones are skipped)."""
    for _, path in reversed(checkpoint_dirs(root)):
        if is_complete(path):
            return path
    return None


def remove_stale_temporaries(root: Path) -> None:
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    root: Path,
    step: int,
    write_main: Callable[[Path], None],
    *,
    keep_last: int,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Write checkpoint ``step`` atomically; every rank adds its RNG state, rank 0 the rest.

    ``write_main(tmp_dir)`` writes the main files (rank 0 only). After the
    rename, older complete checkpoints beyond ``keep_last`` are deleted.
    """
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    write_json(tmp / f"rng-{rank}.json", rng_state())
    barrier()
    if rank == 0:
        write_main(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file() and p.name != MANIFEST}
        write_json(tmp / MANIFEST, {"step": step, "files": files})
        _fsync_tree(tmp)
        if final.exists():  # a re-run of the same step (after resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        complete = [p for _, p in checkpoint_dirs(root) if is_complete(p)]
        for old in complete[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def load_rng(path: Path, rank: int) -> None:
    file = path / f"rng-{rank}.json"
    if not file.is_file():
        raise ResumeError(
            f"{path} has no RNG state for process {rank}: it was written with fewer processes; "
            "resume with the same number of processes"
        )
    restore_rng_state(json.loads(file.read_text()))
