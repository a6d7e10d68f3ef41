"""Save and load only what dynprune adds: gate config, router weights, unit orders.

Layout of a gates directory::

    gates.json          {"format": 1, "gate_config": {...}, "model": {...sizes...}}
    gates.safetensors   router.* weights, head_perm, ffn_perm
    calibration.json    (optional) mean-budget policies per target (dynprune.calibration)
    cost_table.json     (optional) this machine's measured unit times, for ms budgets (dynprune.cost_model)

Loading wraps a freshly loaded base model (same architecture and sizes) with
the saved config and unit orders, then loads the router weights. Nothing is
pickled. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from dynprune.arch import resolve
from dynprune.calibration import Calibration
from dynprune.config import REMOVED_KEYS, GateConfig
from dynprune.cost_model import load_if_present
from dynprune.model import GatedModel, unwrap, wrap

GATES_JSON = "gates.json"
GATES_WEIGHTS = "gates.safetensors"
FORMAT_VERSION = 1


class IncompatibleGatesError(ValueError):
    """Saved gates do not fit the model they are loaded onto."""


def _model_signature(model: nn.Module) -> dict[str, Any]:
    parts = resolve(model)
    signature = {
        "model_type": parts.spec.family,
        "n_layers": parts.n_layers,
        "n_heads": parts.n_heads,  # head units (KV groups under GQA)
        "head_dim": parts.head_dim,
        "hidden": parts.hidden,
        "ffn_dim": parts.ffn_dim,
    }
    if parts.heads_per_unit != 1:  # GQA only, so gates saved before GQA support still load
        signature["heads_per_unit"] = parts.heads_per_unit
    return signature


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_gates(gated: GatedModel, directory: str | os.PathLike) -> Path:
    """Write gates.json + gates.safetensors for ``gated`` into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"router.{k}": v.detach().cpu().contiguous() for k, v in gated.router.state_dict().items()}
    tensors["head_perm"] = gated.head_perm.cpu().contiguous()
    tensors["ffn_perm"] = gated.ffn_perm.cpu().contiguous()
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".gates.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, out / GATES_WEIGHTS)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with gated.original_unit_order():
        signature = _model_signature(gated.model)
    meta = {"format": FORMAT_VERSION, "gate_config": gated.gate_config.to_dict(), "model": signature}
    atomic_write_bytes(out / GATES_JSON, json.dumps(meta, indent=2).encode())
    if gated.calibration:
        gated.calibration.save(out)
    if gated.cost_table is not None:
        gated.cost_table.save(out)
    return out


def read_gate_config(directory: str | os.PathLike) -> GateConfig:
    meta = _read_meta(Path(directory))
    return GateConfig.from_dict(saved_config(meta["gate_config"]))


def saved_config(gate_config: dict[str, Any]) -> dict[str, Any]:
    """A saved gate config -> today's keys: removed keys dropped; gates saved before
    ``unit_ranking`` existed were trained and evaluated ranking units per FLOP, and keep doing so."""
    cfg = {k: v for k, v in gate_config.items() if k not in REMOVED_KEYS}
    cfg.setdefault("unit_ranking", "per_flop")
    return cfg


def upgrade_legacy(gate_config: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """Gates saved before the static and dynamic routers shared one hidden layer -> today's form.

    The same function, re-expressed (``tensors`` is updated in place; returns the config dict
    without the removed keys): the static router's ``inp_static`` is ``budget_inp``; the dynamic
    router's input-layer bias moves into ``budget_inp``'s bias (a dynamic router saved without a
    budget hidden layer gets zero budget weights). Training state (temperature, hard) is dropped.
    """
    import torch

    cfg = saved_config(gate_config)
    for part in ("weight", "bias"):
        old = tensors.pop(f"router.inp_static.{part}", None)
        if old is not None:
            tensors[f"router.budget_inp.{part}"] = old
    inp_bias = tensors.pop("router.inp.bias", None)
    if inp_bias is not None:
        if "router.budget_inp.bias" in tensors:
            tensors["router.budget_inp.bias"] = tensors["router.budget_inp.bias"] + inp_bias
        else:
            n_budget = 2 if cfg.get("budget_conditioned", True) else 1
            tensors["router.budget_inp.weight"] = torch.zeros(
                inp_bias.shape[0], n_budget, dtype=inp_bias.dtype
            )
            tensors["router.budget_inp.bias"] = inp_bias
    return cfg


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / GATES_JSON
    if not path.is_file() or not (directory / GATES_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"no saved gates in {directory} (expected {GATES_JSON} and {GATES_WEIGHTS}, written by dynprune.save_gates)"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise IncompatibleGatesError(
            f"{path} has format {meta.get('format')!r}; this dynprune reads format {FORMAT_VERSION}"
        )
    return meta


def load_gates(model: nn.Module, directory: str | os.PathLike) -> GatedModel:
    """Wrap a freshly loaded base ``model`` with the gates saved in ``directory``."""
    directory = Path(directory)
    meta = _read_meta(directory)
    saved, have = meta["model"], _model_signature(model)
    diff = {k: (saved.get(k), have[k]) for k in have if saved.get(k) != have[k]}
    if diff:
        detail = ", ".join(f"{k}: saved {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise IncompatibleGatesError(
            f"gates in {directory} were saved for a different model ({detail}); load them onto the model they were trained with"
        )
    tensors = load_file(str(directory / GATES_WEIGHTS))
    cfg = GateConfig.from_dict(upgrade_legacy(meta["gate_config"], tensors))
    gated = wrap(model, cfg, orders=(tensors.pop("head_perm"), tensors.pop("ffn_perm")))
    router_state = {k.removeprefix("router."): v for k, v in tensors.items()}
    try:
        gated.router.load_state_dict(router_state, strict=True)
    except RuntimeError as err:
        unwrap(gated)
        raise IncompatibleGatesError(
            f"router weights in {directory} do not fit this gate config: {err}"
        ) from err
    gated.calibration = Calibration.load(directory)
    gated.cost_table = load_if_present(directory)  # checked against the model when a ms budget asks
    return gated


BASE_DIR, GATES_DIR = "base", "gates"


@contextmanager
def atomic_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary sibling of ``directory`` to write into; when the block ends
    without error it replaces ``directory`` (renamed into place), else it is removed: a crash
    never leaves a half-written directory."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        _replace_dir(tmp, target)
    except BaseException:
        _rmtree(tmp)
        raise


def save_gated_model(gated: GatedModel, directory: str | os.PathLike, tokenizer: Any = None) -> Path:
    """A complete, reloadable gated model: ``base/`` (HF model dir, original unit order,
    + tokenizer) and ``gates/`` (:func:`save_gates`), written atomically (:func:`atomic_directory`)."""
    with atomic_directory(directory) as tmp:
        with gated.original_unit_order() as base:
            base.save_pretrained(tmp / BASE_DIR, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / BASE_DIR)
        save_gates(gated, tmp / GATES_DIR)
    return Path(directory)


def load_gated_model(directory: str | os.PathLike, device: str = "cpu") -> tuple[GatedModel, Any]:
    """Load what :func:`save_gated_model` wrote -> (GatedModel in eval mode, tokenizer or None)."""
    import transformers

    root = Path(directory)
    base_dir = root / BASE_DIR
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{root} is not a saved gated model: {base_dir}/config.json is missing "
            "(expected base/ and gates/ written by dynprune.io.save_gated_model / dynprune train)"
        )
    config = transformers.AutoConfig.from_pretrained(base_dir)
    arch = (getattr(config, "architectures", None) or ["AutoModel"])[0]
    model_cls = getattr(transformers, arch, transformers.AutoModel)
    model = model_cls.from_pretrained(base_dir).to(device).eval()
    gated = load_gates(model, root / GATES_DIR)
    tokenizer = None
    if (base_dir / "tokenizer_config.json").is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    return gated, tokenizer


def _replace_dir(src: Path, dst: Path) -> None:
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        _rmtree(old)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
