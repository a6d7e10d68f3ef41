"""All per-architecture knowledge in one table.

An :class:`ArchSpec` says, for one family of HF models, where the transformer
layers live, where the router reads its input, and — relative to one layer —
the attention projections, the FFN projections, the activation and the norms.
Everything else in dynprune reads models only through :func:`resolve`, so a
new family is one table entry (plus, for new attention math such as RoPE/GQA,
its gathered attention forward).

Paths are dotted attribute paths. ``layers`` and ``embeddings`` are relative to
``model.base_model`` (the backbone, e.g. ``BertModel`` inside
``BertForSequenceClassification``); the rest are relative to one layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

NormPosition = Literal["post", "pre"]


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one model family (see module docstring)."""

    family: str
    layers: str
    embeddings: str
    q: str
    k: str
    v: str
    o: str
    up: str
    down: str
    act: str  # attribute path to the activation callable, relative to a layer
    attn_norm: str
    ffn_norm: str
    norm_position: NormPosition = "post"
    gate_proj: str | None = None  # SwiGLU gate projection (decoders)


_BERT_LIKE = dict(
    layers="encoder.layer",
    embeddings="embeddings",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    up="intermediate.dense",
    down="output.dense",
    act="intermediate.intermediate_act_fn",
    attn_norm="attention.output.LayerNorm",
    ffn_norm="output.LayerNorm",
    norm_position="post",
)

#: model_type -> ArchSpec. Add a family here (see docs/architecture.md).
ARCH_TABLE: dict[str, ArchSpec] = {
    "bert": ArchSpec(family="bert", **_BERT_LIKE),
    "roberta": ArchSpec(family="roberta", **_BERT_LIKE),
    "distilbert": ArchSpec(
        family="distilbert",
        layers="transformer.layer",
        embeddings="embeddings",
        q="attention.q_lin",
        k="attention.k_lin",
        v="attention.v_lin",
        o="attention.out_lin",
        up="ffn.lin1",
        down="ffn.lin2",
        act="ffn.activation",
        attn_norm="sa_layer_norm",
        ffn_norm="output_layer_norm",
        norm_position="post",
    ),
}


class UnsupportedModelError(ValueError):
    """Raised for a model whose ``model_type`` is not in :data:`ARCH_TABLE`."""


def get_attr_path(root: nn.Module, path: str) -> object:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def spec_for(model: nn.Module) -> ArchSpec:
    """The table entry for ``model`` (by ``model.config.model_type``), or a clear error."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCH_TABLE:
        supported = ", ".join(sorted(ARCH_TABLE))
        raise UnsupportedModelError(
            f"dynprune does not know model_type={model_type!r} (supported: {supported}). "
            "To add a family, add an ArchSpec to dynprune.arch.ARCH_TABLE naming the layer list, "
            "embeddings, Q/K/V/O projections, FFN up/down projections, activation and norms "
            "(see docs/architecture.md, 'Adding a model family')."
        )
    return ARCH_TABLE[model_type]


@dataclass
class LayerParts:
    """Resolved modules of one transformer layer."""

    layer: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    up: nn.Linear
    down: nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    attn_norm: nn.LayerNorm
    ffn_norm: nn.LayerNorm
    gate_proj: nn.Linear | None = None


@dataclass
class ModelParts:
    """Everything dynprune needs from a supported model, resolved once."""

    spec: ArchSpec
    backbone: nn.Module
    embeddings: nn.Module
    layers: nn.ModuleList
    parts: list[LayerParts]
    hidden: int
    n_heads: int
    head_dim: int
    ffn_dim: int

    @property
    def n_layers(self) -> int:
        return len(self.parts)


def resolve(model: nn.Module) -> ModelParts:
    """Resolve every module dynprune touches, checking shapes are consistent."""
    spec = spec_for(model)
    backbone = getattr(model, "base_model", model)
    try:
        layers = get_attr_path(backbone, spec.layers)
        embeddings = get_attr_path(backbone, spec.embeddings)
    except AttributeError as err:
        raise UnsupportedModelError(
            f"model_type={spec.family!r} but the model has no {spec.layers!r}/{spec.embeddings!r} "
            f"under {type(backbone).__name__}: {err}"
        ) from err
    assert isinstance(layers, nn.ModuleList)
    parts = []
    for layer in layers:
        gate = get_attr_path(layer, spec.gate_proj) if spec.gate_proj else None
        parts.append(
            LayerParts(
                layer=layer,
                q=get_attr_path(layer, spec.q),  # type: ignore[arg-type]
                k=get_attr_path(layer, spec.k),  # type: ignore[arg-type]
                v=get_attr_path(layer, spec.v),  # type: ignore[arg-type]
                o=get_attr_path(layer, spec.o),  # type: ignore[arg-type]
                up=get_attr_path(layer, spec.up),  # type: ignore[arg-type]
                down=get_attr_path(layer, spec.down),  # type: ignore[arg-type]
                act=get_attr_path(layer, spec.act),  # type: ignore[arg-type]
                attn_norm=get_attr_path(layer, spec.attn_norm),  # type: ignore[arg-type]
                ffn_norm=get_attr_path(layer, spec.ffn_norm),  # type: ignore[arg-type]
                gate_proj=gate,  # type: ignore[arg-type]
            )
        )
    config = model.config  # type: ignore[union-attr]
    n_heads = int(config.num_attention_heads)
    hidden = parts[0].q.in_features
    all_head = parts[0].q.out_features
    if all_head % n_heads:
        raise UnsupportedModelError(f"query width {all_head} is not divisible by {n_heads} heads")
    ffn_dim = parts[0].up.out_features
    for i, p in enumerate(parts):
        if p.up.out_features != ffn_dim or p.q.out_features != all_head:
            raise UnsupportedModelError(
                f"layer {i} has a different width from layer 0; dynprune expects uniform layers "
                "(was the model already physically pruned?)"
            )
    return ModelParts(
        spec=spec,
        backbone=backbone,
        embeddings=embeddings,  # type: ignore[arg-type]
        layers=layers,
        parts=parts,
        hidden=hidden,
        n_heads=n_heads,
        head_dim=all_head // n_heads,
        ffn_dim=ffn_dim,
    )
