"""A sparse on-disk format for unstructured-pruned models: only the non-zeros are stored.

Layout of a directory written by :func:`save_sparse`::

    config.json                HF config (architectures, sizes) as save_pretrained writes it
    sparse_model.safetensors   for each sparse weight W: ``W.values`` (the non-zeros, row-major,
                               original dtype) + ``W.bitmap`` (uint8, one bit per element,
                               numpy ``packbits`` little bit order); every other tensor as is
    (tokenizer files, if a tokenizer is given)

A bitmap costs 1 bit per element, so the file shrinks as soon as more than
1/32 of an fp32 weight is zero (CSR with int16 column indices would need
2 bytes per non-zero: larger than the bitmap at any sparsity below 94 %).
Metadata (format tag, shapes of the sparse weights) lives in the safetensors
header. :func:`load_sparse` rebuilds the dense model exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

FORMAT = "dynprune-bitmap-sparse/1"
WEIGHTS = "sparse_model.safetensors"


def _encode(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = t.detach().cpu().contiguous().reshape(-1)
    nz = flat != 0
    bitmap = np.packbits(nz.numpy(), bitorder="little")
    return flat[nz].clone(), torch.from_numpy(bitmap)


def _decode(values: torch.Tensor, bitmap: torch.Tensor, shape: list[int]) -> torch.Tensor:
    n = int(np.prod(shape)) if shape else 1
    nz = torch.from_numpy(np.unpackbits(bitmap.numpy(), count=n, bitorder="little").astype(bool))
    out = torch.zeros(n, dtype=values.dtype)
    out[nz] = values
    return out.reshape(shape)


def save_sparse(
    model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None, min_sparsity: float = 0.05
) -> int:
    """Write ``model`` with every floating tensor that is at least ``min_sparsity`` zeros
    stored sparsely; returns the bytes on disk of the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        zeros = float((t == 0).sum()) / max(t.numel(), 1)
        if t.is_floating_point() and t.dim() >= 2 and zeros >= min_sparsity:
            tensors[f"{name}.values"], tensors[f"{name}.bitmap"] = _encode(t)
            shapes[name] = list(t.shape)
        else:
            tensors[name] = t.contiguous().clone()
    save_file(tensors, str(out / WEIGHTS), metadata={"format": FORMAT, "sparse": json.dumps(shapes)})
    return dir_bytes(out)


def load_sparse(directory: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """Rebuild the dense HF model saved by :func:`save_sparse` (eval mode)."""
    import transformers

    root = Path(directory)
    path = root / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{root} has no {WEIGHTS}: not a model saved by dynprune's save_sparse")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        shapes: dict[str, list[int]] = json.loads(meta["sparse"])
        raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    encoded = {f"{n}.values" for n in shapes} | {f"{n}.bitmap" for n in shapes}
    state = {k: v for k, v in raw.items() if k not in encoded}
    for name, shape in shapes.items():
        state[name] = _decode(raw[f"{name}.values"], raw[f"{name}.bitmap"], shape)
    config = transformers.AutoConfig.from_pretrained(root)
    arch = (getattr(config, "architectures", None) or ["AutoModelForSequenceClassification"])[0]
    cls = getattr(transformers, arch, transformers.AutoModelForSequenceClassification)
    model = cls.from_config(config) if cls is transformers.AutoModelForSequenceClassification else cls(config)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def dir_bytes(directory: str | os.PathLike) -> int:
    """Bytes of every file under ``directory``."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def weights_bytes(directory: str | os.PathLike) -> int:
    """Bytes of the weight files (``*.safetensors``) under ``directory`` (excludes tokenizer files)."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*.safetensors"))
