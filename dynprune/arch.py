"""All per-architecture knowledge in one table.

An :class:`ArchSpec` says, for one family of HF models, where the transformer
layers live, where the router reads its input, and — relative to one layer —
the attention projections, the FFN projections, the activation and the norms,
plus the layer's shape: norm position (post-LN encoders, pre-LN decoders),
causal attention, rotary position embeddings, and whether the projections are
GPT-2 ``Conv1D`` modules (weights stored transposed; Q/K/V fused in one).
Everything else in dynprune reads models only through :func:`resolve`, which
presents every projection as a :class:`Proj` (``weight`` (out, in) and
``bias``, views of the module's parameters), so no other module knows about
``Conv1D`` or fused Q/K/V.

Paths are dotted attribute paths. ``layers`` and ``embeddings`` are relative to
``model.base_model`` (the backbone, e.g. ``BertModel`` inside
``BertForSequenceClassification``); the rest are relative to one layer.
``embeddings`` names the module whose output the router reads (GPT-2: the
dropout after token + position embeddings).

**Head unit.** With grouped-query attention (``num_key_value_heads`` <
``num_attention_heads``) the gated head unit is a whole KV group: its
``G = n_heads / n_kv_heads`` query heads plus the K and V head they share. A
skipped unit is then never projected, attended or cached (the KV cache shrinks
with the budget), and kept sets stay dense matmuls. ``ModelParts.n_heads`` is
the number of head *units* (KV heads; the heads themselves for MHA) and
``heads_per_unit`` is G.
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
    attention: str | None = None  # the attention module (reads its ``scaling``), relative to a layer
    causal: bool = False  # decoder self-attention: causal mask, KV cache
    rope: bool = False  # rotary position embeddings, passed to each layer as ``position_embeddings``
    conv1d: bool = False  # GPT-2 Conv1D projections: weight stored (in, out)
    fused_qkv: bool = False  # q, k and v name one module whose outputs are [Q; K; V]


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
    **{
        name: ArchSpec(
            family=name,
            layers="layers",
            embeddings="embed_tokens",
            q="self_attn.q_proj",
            k="self_attn.k_proj",
            v="self_attn.v_proj",
            o="self_attn.o_proj",
            up="mlp.up_proj",
            down="mlp.down_proj",
            gate_proj="mlp.gate_proj",
            act="mlp.act_fn",
            attn_norm="input_layernorm",
            ffn_norm="post_attention_layernorm",
            norm_position="pre",
            attention="self_attn",
            causal=True,
            rope=True,
        )
        for name in ("llama", "qwen2", "mistral")
    },
    "gpt2": ArchSpec(
        family="gpt2",
        layers="h",
        embeddings="drop",
        q="attn.c_attn",
        k="attn.c_attn",
        v="attn.c_attn",
        o="attn.c_proj",
        up="mlp.c_fc",
        down="mlp.c_proj",
        act="mlp.act",
        attn_norm="ln_1",
        ffn_norm="ln_2",
        norm_position="pre",
        attention="attn",
        causal=True,
        conv1d=True,
        fused_qkv=True,
    ),
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


class Proj:
    """One projection seen as an ``nn.Linear``: ``weight`` (out, in) and ``bias`` (out,) are views
    of the module's parameters (read on every access, so they follow ``.to()`` / reloads).

    ``transposed``: the module stores (in, out) (GPT-2 ``Conv1D``); ``rows``: this projection is
    the slice ``rows`` of a fused module's outputs (GPT-2 ``c_attn`` = [Q; K; V]). In-place writes
    to ``weight`` / ``bias`` (the unit permutations) land in the module's parameters.
    """

    def __init__(self, module: nn.Module, transposed: bool = False, rows: slice | None = None) -> None:
        self.module, self.transposed, self.rows = module, transposed, rows

    @property
    def weight(self) -> torch.Tensor:
        w = self.module.weight
        w = w.t() if self.transposed else w
        return w if self.rows is None else w[self.rows]

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.module.bias
        return b if b is None or self.rows is None else b[self.rows]

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def register_forward_pre_hook(self, hook):  # the module's input is this projection's input
        if self.rows is not None:
            raise ValueError("a slice of a fused projection has no input hook of its own")
        return self.module.register_forward_pre_hook(hook)


@dataclass
class LayerParts:
    """Resolved modules of one transformer layer (projections as :class:`Proj`)."""

    layer: nn.Module
    q: Proj
    k: Proj
    v: Proj
    o: Proj
    up: Proj
    down: Proj
    act: Callable[[torch.Tensor], torch.Tensor]
    attn_norm: nn.Module
    ffn_norm: nn.Module
    gate_proj: Proj | None = None
    attention: nn.Module | None = None

    @property
    def scaling(self) -> float | None:
        """The attention's softmax scale when the module says (decoders), else None (1/√d)."""
        s = getattr(self.attention, "scaling", None)
        return None if s is None else float(s)


@dataclass
class LayerStack:
    """A model's backbone, embeddings and layer list, whatever the layers' widths (a physically
    pruned model has uneven layers: :func:`resolve` refuses it, early exit runs on it)."""

    spec: ArchSpec
    backbone: nn.Module
    embeddings: nn.Module
    layers: nn.ModuleList

    @property
    def n_layers(self) -> int:
        return len(self.layers)


@dataclass
class ModelParts(LayerStack):
    """Everything dynprune needs from a supported model, resolved once: its layer stack plus each
    layer's parts and the (uniform) widths.

    ``n_heads`` counts head *units* (KV groups under GQA, see module docstring);
    ``heads_per_unit`` query heads of ``head_dim`` share each unit's K and V.
    """

    parts: list[LayerParts]
    hidden: int
    n_heads: int
    head_dim: int
    ffn_dim: int
    heads_per_unit: int = 1

    @property
    def n_query_heads(self) -> int:
        return self.n_heads * self.heads_per_unit


def _config_int(config: object, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def _check_supported_config(spec: ArchSpec, config: object) -> None:
    """Options of a known family that the gathered path does not implement: a clear error now."""
    if spec.family == "gpt2":
        if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(
            config, "reorder_and_upcast_attn", False
        ):
            raise UnsupportedModelError(
                "GPT-2 with scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn is not supported"
            )
        if getattr(config, "add_cross_attention", False):
            raise UnsupportedModelError("GPT-2 with cross-attention is not supported")


def _layer_parts(layer: nn.Module, spec: ArchSpec, hidden: int) -> LayerParts:
    def proj(path: str) -> Proj:
        return Proj(get_attr_path(layer, path), transposed=spec.conv1d)  # type: ignore[arg-type]

    if spec.fused_qkv:  # one module, outputs [Q; K; V] of equal width
        fused = get_attr_path(layer, spec.q)
        q, k, v = (Proj(fused, spec.conv1d, slice(i * hidden, (i + 1) * hidden)) for i in range(3))  # type: ignore[arg-type]
    else:
        q, k, v = proj(spec.q), proj(spec.k), proj(spec.v)
    return LayerParts(
        layer=layer,
        q=q,
        k=k,
        v=v,
        o=proj(spec.o),
        up=proj(spec.up),
        down=proj(spec.down),
        act=get_attr_path(layer, spec.act),  # type: ignore[arg-type]
        attn_norm=get_attr_path(layer, spec.attn_norm),  # type: ignore[arg-type]
        ffn_norm=get_attr_path(layer, spec.ffn_norm),  # type: ignore[arg-type]
        gate_proj=proj(spec.gate_proj) if spec.gate_proj else None,
        attention=get_attr_path(layer, spec.attention) if spec.attention else None,  # type: ignore[arg-type]
    )


def layer_parts(model: nn.Module) -> list[LayerParts]:
    """Every layer's modules through the arch table, *without* :func:`resolve`'s uniform-width
    checks: also reads physically pruned models (per-layer widths)."""
    spec = spec_for(model)
    backbone = getattr(model, "base_model", model)
    layers = get_attr_path(backbone, spec.layers)
    hidden = int(model.config.hidden_size)  # type: ignore[union-attr]
    return [_layer_parts(layer, spec, hidden) for layer in layers]  # type: ignore[union-attr]


def layer_stack(model: nn.Module) -> LayerStack:
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
    assert isinstance(layers, nn.ModuleList) and isinstance(embeddings, nn.Module)
    return LayerStack(spec, backbone, embeddings, layers)


def resolve(model: nn.Module) -> ModelParts:
    """Resolve every module dynprune touches, checking shapes are consistent."""
    spec = spec_for(model)
    config = model.config  # type: ignore[union-attr]
    _check_supported_config(spec, config)
    stack = layer_stack(model)
    backbone, layers, embeddings = stack.backbone, stack.layers, stack.embeddings
    hidden = int(config.hidden_size)
    parts = [_layer_parts(layer, spec, hidden) for layer in layers]
    n_query = int(config.num_attention_heads)
    n_kv = _config_int(config, "num_key_value_heads") or n_query
    if n_query % n_kv:
        raise UnsupportedModelError(f"{n_query} query heads are not a multiple of {n_kv} KV heads")
    all_head = parts[0].q.out_features
    if all_head % n_query:
        raise UnsupportedModelError(f"query width {all_head} is not divisible by {n_query} heads")
    head_dim = all_head // n_query
    if parts[0].k.out_features != n_kv * head_dim:
        raise UnsupportedModelError(
            f"key width {parts[0].k.out_features} != {n_kv} KV heads x head_dim {head_dim}"
        )
    ffn_dim = parts[0].up.out_features
    for i, p in enumerate(parts):
        if (
            p.up.out_features != ffn_dim
            or p.q.out_features != all_head
            or p.k.out_features != n_kv * head_dim
        ):
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
        n_heads=n_kv,
        head_dim=head_dim,
        ffn_dim=ffn_dim,
        heads_per_unit=n_query // n_kv,
    )
