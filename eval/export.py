"""Export statically pruned models as ordinary, smaller Hugging Face model directories.

:func:`export_static` physically removes the pruned heads, FFN neurons and
layers (:func:`dynprune.eval.physical.physically_prune`) and writes the
smaller model with ``save_pretrained`` (safetensors) + tokenizer.

What the stock HF architectures can express (BERT, RoBERTa, DistilBERT):
the number of layers and *one* FFN width for all layers. They cannot express
fewer heads (the head size is ``hidden_size / num_attention_heads``, so a
smaller head count would change the head size) nor per-layer FFN widths.

- Every kept layer keeps all heads and the same FFN width: the config is
  rewritten (``num_hidden_layers``, ``intermediate_size``) and the directory
  loads with plain ``AutoModelForSequenceClassification.from_pretrained``.
- Otherwise the config keeps the original sizes and records the per-layer
  widths under ``dynprune_pruning``; stock ``from_pretrained`` refuses it
  (size mismatch). Two loaders: :func:`load_pruned` (ours; it also loads the
  stock case), and plain ``AutoModelForSequenceClassification.from_pretrained(
  dir, trust_remote_code=True)``, which runs the self-contained
  ``modeling_dynprune_pruned.py`` written next to the weights (a copy of
  :mod:`dynprune.eval.hf_pruned`, referenced by ``auto_map`` in config.json).

:func:`frozen_structure` turns a dynamic model at one budget into a static
one: the most common per-sample mask over some data (often a large share of
inputs at low budgets). Exporting that is "a dynamic model frozen to one
budget's most common mask".
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dynprune.eval import hf_pruned
from dynprune.eval.physical import physically_prune
from dynprune.eval.sparse_io import dir_bytes, weights_bytes
from dynprune.eval.structure import Structure
from torch import nn

from dynprune.arch import ArchSpec, spec_for

PRUNING_KEY = "dynprune_pruning"
REMOTE_MODULE = "modeling_dynprune_pruned"
FORMAT_VERSION = 2  # 2: module paths recorded from the arch table
# model_type -> (config key of the layer count, config key of the FFN width)
_CONFIG_KEYS = {
    "bert": ("num_hidden_layers", "intermediate_size"),
    "roberta": ("num_hidden_layers", "intermediate_size"),
    "distilbert": ("n_layers", "hidden_dim"),
}


@dataclass
class ExportInfo:
    directory: Path
    stock_loadable: bool  # plain AutoModel...from_pretrained works
    weights_bytes: int
    disk_bytes: int
    params: int
    reason: str  # why stock HF cannot express it ("" if it can)


def _config_keys(model: nn.Module) -> tuple[str, str]:
    model_type = spec_for(model).family
    if model_type not in _CONFIG_KEYS:
        raise ValueError(f"export: no config keys known for model_type {model_type!r}")
    return _CONFIG_KEYS[model_type]


def expressible(structure: Structure, n_heads: int) -> tuple[bool, str]:
    """Can a stock HF config of this family describe ``structure``? (yes/no, why not)."""
    kept = [i for i, k in enumerate(structure.layers) if k]
    heads = {len(structure.heads[i]) for i in kept}
    widths = {len(structure.neurons[i]) for i in kept}
    if heads and heads != {n_heads}:
        return False, (
            f"heads were removed ({sorted(heads)} of {n_heads} per kept layer): the HF config derives the "
            "head size from hidden_size / num_attention_heads, so it cannot express fewer heads"
        )
    if len(widths) > 1:
        return False, f"per-layer FFN widths {sorted(widths)}: the HF config has one intermediate size"
    return True, ""


def export_static(
    model: nn.Module, structure: Structure, directory: str | os.PathLike, tokenizer: Any = None
) -> ExportInfo:
    """Physically prune a copy of the plain HF ``model`` to ``structure`` and save it (see module doc)."""
    out = Path(directory)
    pruned = physically_prune(model, structure.heads, structure.neurons, structure.layers)
    return save_pruned(pruned, structure, out, model.config.num_attention_heads, tokenizer)


def save_pruned(
    pruned: nn.Module, structure: Structure, directory: str | os.PathLike, n_heads: int, tokenizer: Any = None
) -> ExportInfo:
    """Save an already physically pruned model of ``structure`` (from the original of ``n_heads``)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    layers_key, width_key = _config_keys(pruned)
    ok, reason = expressible(structure, n_heads)
    config = pruned.config
    saved = {k: getattr(config, k) for k in (layers_key, width_key)}
    extra = None
    kept = [i for i, k in enumerate(structure.layers) if k]
    try:
        setattr(config, layers_key, len(kept))
        if ok:
            if kept:
                setattr(config, width_key, len(structure.neurons[kept[0]]))
        else:
            extra = {
                "format": FORMAT_VERSION,
                "heads_per_layer": [len(structure.heads[i]) for i in kept],
                "ffn_per_layer": [len(structure.neurons[i]) for i in kept],
                "paths": _module_paths(spec_for(pruned)),
                "why": reason,
                "loader": "dynprune.eval.export.load_pruned, or from_pretrained(dir, trust_remote_code=True)",
            }
            setattr(config, PRUNING_KEY, extra)
            family = spec_for(pruned).family
            class_name = hf_pruned.CLASSES[family].__name__
            config.auto_map = {"AutoModelForSequenceClassification": f"{REMOTE_MODULE}.{class_name}"}
            shutil.copyfile(hf_pruned.__file__, out / f"{REMOTE_MODULE}.py")
        pruned.save_pretrained(out, safe_serialization=True)
    finally:
        for k, v in saved.items():
            setattr(config, k, v)
        if extra is not None:
            delattr(config, PRUNING_KEY)
            delattr(config, "auto_map")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "dynprune_structure.json").write_text(json.dumps(structure.to_dict()))
    return ExportInfo(
        directory=out,
        stock_loadable=ok,
        weights_bytes=weights_bytes(out),
        disk_bytes=dir_bytes(out),
        params=sum(p.numel() for p in pruned.parameters()),
        reason=reason,
    )


def _module_paths(spec: ArchSpec) -> dict[str, str]:
    """The arch table's module paths that :mod:`dynprune.eval.hf_pruned` needs (one table)."""
    if spec.fused_qkv or spec.conv1d or spec.gate_proj:
        raise ValueError(f"per-layer-width export supports encoder families, not {spec.family!r}")
    return {key: getattr(spec, key) for key in hf_pruned.PATH_KEYS}


def load_pruned(directory: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """Load what :func:`export_static` wrote (stock or per-layer widths), in eval mode."""
    import transformers
    from safetensors.torch import load_file

    root = Path(directory)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root} has no config.json: not an exported model directory")
    config = transformers.AutoConfig.from_pretrained(root)
    info = getattr(config, PRUNING_KEY, None)
    if info is None:
        return transformers.AutoModelForSequenceClassification.from_pretrained(root).to(device).eval()
    if info.get("format") != FORMAT_VERSION:
        raise ValueError(f"{root}: {PRUNING_KEY} format {info.get('format')!r}, expected {FORMAT_VERSION}")
    model = hf_pruned.CLASSES[config.model_type](config)  # the same classes as trust_remote_code loads
    state = {}
    for f in sorted(root.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # HF may drop tied / non-persistent entries; anything else is an error
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"{root}: weights do not fit the recorded structure (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


def frozen_structure(
    masks_head: np.ndarray,
    masks_ffn: np.ndarray,
    masks_layer: np.ndarray,
    head_perm: torch.Tensor,
    ffn_perm: torch.Tensor,
    slice_size: int,
    n_layers: int,
    n_heads: int,
    ffn_dim: int,
) -> tuple[Structure, float]:
    """The most common per-sample mask (arrays (N, L_gated, ·) in gated order) as a Structure in
    original indices, and the share of samples that used exactly that mask. Dense prefix layers
    (``n_layers - L_gated``, the router's input layers) are kept whole."""
    n, n_gated = masks_layer.shape[:2]
    keys = [masks_head[i].tobytes() + masks_ffn[i].tobytes() + masks_layer[i].tobytes() for i in range(n)]
    ((key, count),) = Counter(keys).most_common(1)
    row = keys.index(key)
    prefix = n_layers - n_gated
    heads = [list(range(n_heads)) for _ in range(prefix)]
    neurons = [list(range(ffn_dim)) for _ in range(prefix)]
    layers = [True] * prefix
    offs = np.arange(slice_size)
    for g in range(n_gated):
        keep = bool(masks_layer[row, g])
        pos = np.flatnonzero(masks_head[row, g]) if keep else np.array([], dtype=int)
        slices = np.flatnonzero(masks_ffn[row, g]) if keep else np.array([], dtype=int)
        cols = (slices[:, None] * slice_size + offs).reshape(-1)
        heads.append(head_perm[g][torch.as_tensor(pos, dtype=torch.long)].tolist())
        neurons.append(ffn_perm[g][torch.as_tensor(cols, dtype=torch.long)].tolist())
        layers.append(keep)
    return Structure.from_indices(heads, neurons, layers), count / n
