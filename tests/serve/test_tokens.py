"""Tokens made on arrival and padded once (dynprune/serve/tokens.py) equal the HF tokenizer's call."""

from __future__ import annotations

import copy

import pytest
import torch

from dynprune.serve import ServeConfig
from dynprune.serve.engine import ClassifierEngine
from dynprune.serve.tokens import Tokens, fast_tokenizer

ODD = [
    "a gripping, funny and warm film",
    "x",
    "  Héllo,\tWÖRLD!  😀 naïve café — “quoted” ",
    "word " * 300,  # truncated
    "pre-release ... (2002) 100% [sic] don't",
    "日本語のテキスト と English",
]


@pytest.fixture(scope="module")
def reviews():
    from dynprune.assets import rotten_tomatoes_split

    return [t for t, _ in rotten_tomatoes_split()["test"]][:96]


def _reference(tokenizer, max_length: int, multiple: int):
    def call(texts: list[str]) -> dict[str, torch.Tensor]:
        cut = {"truncation": True, "max_length": max_length}
        return dict(tokenizer(texts, **cut, padding=True, pad_to_multiple_of=multiple, return_tensors="pt"))

    return call


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.real
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(("max_length", "multiple"), [(128, 8), (16, 1), (24, 8), (13, 1)])
def test_per_text_ids_padded_once_equal_the_batch_call(minilm_tokenizer, reviews, side, max_length, multiple):
    tok = copy.deepcopy(minilm_tokenizer)
    tok.padding_side = side
    reference = _reference(tok, max_length, multiple)
    fast = fast_tokenizer(tok, max_length, multiple, reference)
    assert fast is not None
    texts = reviews + ODD
    for start in range(0, len(texts), 16):
        group = texts[start : start + 16]
        assert _equal(fast.pad([fast(t) for t in group]), reference(group))
    assert _equal(fast.pad([fast(ODD[2])]), reference([ODD[2]]))  # a batch of one


def test_no_fast_path_when_the_reference_disagrees_or_the_tokenizer_is_slow(minilm_tokenizer):
    reference = _reference(minilm_tokenizer, 128, 8)

    def shifted(texts):
        out = reference(texts)
        return {**out, "input_ids": out["input_ids"] + 1}

    assert fast_tokenizer(minilm_tokenizer, 128, 8, shifted) is None

    class Slow:  # no Rust backend: the HF call it is
        is_fast = False

    assert fast_tokenizer(Slow(), 128, 8, reference) is None


def test_engine_classifies_prepared_tokens_and_texts_alike(tiny_checkpoint):
    from dynprune.serve import load_engine

    engine = load_engine(ServeConfig(max_batch=8), checkpoint=str(tiny_checkpoint))
    assert engine.fast is not None
    prepared = [engine.prepare(t) for t in ODD]
    assert all(isinstance(p, Tokens) for p in prepared)
    assert _equal(engine.batch_of(prepared), engine.encode(ODD))
    budgets = [1.0, 0.7, 0.5, 0.4, 0.6, 0.9]
    assert engine.classify(prepared, budgets) == engine.classify(ODD, budgets)
    # without the fast path (a tokenizer it cannot use) the texts go through the HF call
    plain = copy.copy(engine)
    plain.fast = None
    assert plain.prepare(ODD[0]) == ODD[0]
    assert plain.classify(ODD, budgets) == engine.classify(prepared, budgets)
    assert isinstance(engine, ClassifierEngine)
