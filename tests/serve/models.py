"""Tiny models on disk for the server tests: a BERT classifier with the packaged MiniLM
tokenizer (real tokenization, milliseconds per forward) and a gated checkpoint of it."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

import dynprune
from tests.helpers import tiny_decoder, tiny_model


def tiny_classifier(tokenizer, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A tiny BERT for ``tokenizer``'s vocabulary, with named labels (served as label names)."""
    return tiny_model(
        "bert",
        seed,
        layers,
        hidden=32,
        ffn=64,
        vocab=tokenizer.vocab_size,
        initializer_range=0.3,  # outputs far from uniform, so wrong answers show
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
        architectures=["BertForSequenceClassification"],
    )


def save_tiny_model(directory: Path, minilm_dir: Path, seed: int = 0, layers: int = 2) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    tiny_classifier(tokenizer, seed, layers).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_checkpoint(directory: Path, minilm_dir: Path, seed: int = 0, layers: int = 2) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(seed + 1)
    gated = dynprune.wrap(tiny_classifier(tokenizer, seed, layers), dynprune.GateConfig(ffn_slice_size=16))
    with torch.no_grad():  # a router that is not at its init, so budgets pick different units per text
        gated.router.out.weight.add_(torch.randn_like(gated.router.out.weight) * 0.3)
    dynprune.save_gated_model(gated.eval(), directory, tokenizer=tokenizer)
    return directory


def lm_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (GPT-2 style: any Unicode text encodes) trained here on the
    packaged King James text, small enough that the tiny LM's head does not dominate its FLOPs."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dynprune.assets import kjv_path

    with open(kjv_path(), encoding="utf-8") as f:
        verses = [json.loads(line)["text"] for _, line in zip(range(4000), f)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"], initial_alphabet=alphabet
    )
    tok.train_from_iterator(verses, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


def tiny_lm(tokenizer, seed: int = 0, context: int = 2048):
    """A tiny Llama (GQA: 4 query heads, 2 KV heads; FFN 256 = 2 slices of 128, so ``--model``
    can wrap it with the default GateConfig) for ``tokenizer``'s vocabulary."""
    return tiny_decoder(
        "llama",
        seed,
        layers=2,
        ffn=256,
        vocab=len(tokenizer),
        context=context,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,  # peaked next-token distributions: greedy ties are unlikely
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        architectures=["LlamaForCausalLM"],
    )


def save_tiny_lm(directory: Path, tokenizer, seed: int = 0) -> Path:
    """``--model`` directory: the tiny Llama (safetensors) + the tokenizer."""
    tiny_lm(tokenizer, seed).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_lm_checkpoint(directory: Path, tokenizer, seed: int = 0) -> Path:
    """A gated checkpoint of the tiny Llama whose router is off its init (budgets matter)."""
    torch.manual_seed(seed + 1)
    gated = dynprune.wrap(tiny_lm(tokenizer, seed), dynprune.GateConfig(ffn_slice_size=64))
    with torch.no_grad():
        gated.router.out.weight.add_(torch.randn_like(gated.router.out.weight) * 0.3)
    dynprune.save_gated_model(gated.eval(), directory, tokenizer=tokenizer)
    return directory
