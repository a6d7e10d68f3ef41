"""Tiny HF models built from configs (milliseconds, no downloads) and input batches."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

ENCODER_TYPES = ("bert", "roberta", "distilbert")
VOCAB = 120


def tiny_model(
    model_type: str = "bert",
    seed: int = 0,
    layers: int = 3,
    heads: int = 4,
    hidden: int = 64,
    ffn: int = 128,
    num_labels: int = 2,
    vocab: int = VOCAB,
    context: int = 160,
    **config: object,
) -> torch.nn.Module:
    """A tiny randomly initialised ForSequenceClassification model in eval mode (the one
    encoder builder of the tests). ``config``: further HF config fields (labels, init, ...)."""
    torch.manual_seed(seed)
    if model_type == "bert":
        cfg = BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=ffn,
            max_position_embeddings=context,
            num_labels=num_labels,
            **config,
        )
        model = BertForSequenceClassification(cfg)
    elif model_type == "roberta":
        cfg = RobertaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=ffn,
            max_position_embeddings=context,
            num_labels=num_labels,
            **{"pad_token_id": 1, **config},
        )
        model = RobertaForSequenceClassification(cfg)
    elif model_type == "distilbert":
        cfg = DistilBertConfig(
            vocab_size=vocab,
            dim=hidden,
            n_layers=layers,
            n_heads=heads,
            hidden_dim=ffn,
            max_position_embeddings=context,
            num_labels=num_labels,
            **config,
        )
        model = DistilBertForSequenceClassification(cfg)
    else:
        raise ValueError(model_type)
    return model.eval()


def tiny_batch(batch: int = 5, seq: int = 17, seed: int = 1, padded: bool = True) -> dict[str, torch.Tensor]:
    """input_ids + attention_mask with different right-padding per row (row 0 unpadded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        for row in range(1, batch):
            length = int(torch.randint(1, seq + 1, (1,), generator=g))
            mask[row, length:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask}


def random_masks(
    gated, batch: int, keep: float, seed: int = 0, nested: bool = True, skip_layers: bool = True
):
    """Random per-sample UnitMasks for a GatedModel; nested=True gives prefixes."""
    from dynprune import UnitMasks

    g = torch.Generator().manual_seed(seed)
    n_layers, n_heads, n_slices = gated.n_gated, gated.parts.n_heads, gated.n_slices

    def draw(n: int) -> torch.Tensor:
        if nested:
            counts = torch.binomial(
                torch.full((batch, n_layers), float(n)), torch.full((batch, n_layers), keep), generator=g
            )
            return torch.arange(n)[None, None, :] < counts[..., None]
        return torch.rand(batch, n_layers, n, generator=g) < keep

    layer = torch.ones(batch, n_layers, dtype=torch.bool)
    if skip_layers:
        layer = torch.rand(batch, n_layers, generator=g) < max(keep, 0.5)
    return UnitMasks(draw(n_heads), draw(n_slices), layer)


DECODER_TYPES = ("llama", "qwen2", "mistral", "gpt2")


def tiny_decoder(
    model_type: str = "llama",
    seed: int = 0,
    layers: int = 3,
    hidden: int = 64,
    ffn: int = 128,
    vocab: int = VOCAB,
    context: int = 96,
    pad_token_id: int = 0,
    **config: object,
) -> torch.nn.Module:
    """A tiny randomly initialised causal LM in eval mode (no dropout): the one decoder builder of
    the tests. Llama / Qwen2 / Mistral use GQA (4 query heads, 2 KV heads); Qwen2 has Q/K/V
    biases; GPT-2 has fused Conv1D Q/K/V. ``config``: further HF config fields (token ids, ...)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        pad_token_id=pad_token_id,
        **config,
    )
    if model_type == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif model_type == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif model_type == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif model_type == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_inner=ffn,
            n_layer=layers,
            n_head=4,
            n_positions=context,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=pad_token_id,
            **config,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(model_type)
    model.generation_config.pad_token_id = pad_token_id
    return model.eval()


def left_padded(prompts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """input_ids + attention_mask of 1-D prompts, left-padded with token 0."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def minilm_gated(minilm_dir, batch: int, padded_from: int):
    """(wrapped packaged MiniLM classifier, batch of ``batch`` random 40-token inputs whose rows from
    ``padded_from`` on are padded after 25 tokens), seeded."""
    from transformers import AutoModelForSequenceClassification

    import dynprune

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, (batch, 40), generator=g)
    attention_mask = torch.ones_like(ids)
    attention_mask[padded_from:, 25:] = 0
    return dynprune.wrap(model), {"input_ids": ids, "attention_mask": attention_mask}


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (the scripts folder is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
