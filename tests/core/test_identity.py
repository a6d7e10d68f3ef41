"""Wrapping changes nothing while gates are open; unwrap restores the original model."""

import copy

import pytest
import torch

import dynprune
from dynprune import GateConfig, UnitMasks
from tests.helpers import ENCODER_TYPES, tiny_batch, tiny_model


def _logits(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, **kw).logits


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_wrap_with_gates_open_equals_unwrapped(model_type):
    model = tiny_model(model_type)
    reference = copy.deepcopy(model)
    batch = tiny_batch()
    gated = dynprune.wrap(model, GateConfig(ffn_slice_size=32))
    want = _logits(reference, batch)
    torch.testing.assert_close(_logits(gated, batch), want, atol=1e-6, rtol=0)  # default budget 1.0
    torch.testing.assert_close(_logits(gated, batch, budget=1.0), want, atol=1e-6, rtol=0)
    # the gathered path with every unit kept computes the same function
    full = UnitMasks.full(5, gated.n_gated, gated.parts.n_heads, gated.n_slices)
    got = _logits(gated, batch, masks=full)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert gated.last.masks is not None and bool(gated.last.masks.head.all())


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_unwrap_restores_module_tree_and_weights_exactly(model_type):
    model = tiny_model(model_type)
    reference = copy.deepcopy(model)
    classes = [type(m) for m in model.modules()]
    gated = dynprune.wrap(model, GateConfig(ffn_slice_size=32))
    # the gated model reorders units (importance order) but keeps every key
    assert set(gated.model.state_dict()) == set(reference.state_dict())
    restored = dynprune.unwrap(gated)
    assert restored is model
    assert [type(m) for m in restored.modules()] == classes
    for (k, a), (_, b) in zip(restored.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), k
    batch = tiny_batch()
    torch.testing.assert_close(_logits(restored, batch), _logits(reference, batch), atol=0, rtol=0)
    # and it can be wrapped again after unwrapping
    dynprune.wrap(restored)


def test_wrap_twice_and_bad_unwrap_are_clear_errors():
    model = tiny_model("bert")
    gated = dynprune.wrap(model, GateConfig(ffn_slice_size=32))
    with pytest.raises(ValueError, match="already"):
        dynprune.wrap(model)
    with pytest.raises(ValueError, match="already"):
        dynprune.wrap(gated)
    with pytest.raises(ValueError, match="GatedModel"):
        dynprune.unwrap(model)


def test_slice_size_must_divide_ffn_width():
    with pytest.raises(ValueError, match="does not divide the FFN width 128"):
        dynprune.wrap(tiny_model("bert"), GateConfig(ffn_slice_size=48))


@pytest.mark.real
def test_minilm_identity_with_padding(minilm_dir, minilm_tokenizer):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()
    reference = copy.deepcopy(model)
    texts = [
        "A three-hour cinema master class.",
        "Dull.",
        "It is a film that never quite finds its footing, alas.",
    ]
    batch = dict(minilm_tokenizer(texts, padding=True, return_tensors="pt"))
    assert not bool(batch["attention_mask"].all())  # really padded
    gated = dynprune.wrap(model)
    want = _logits(reference, batch)
    torch.testing.assert_close(_logits(gated, batch), want, atol=1e-6, rtol=0)
    full = UnitMasks.full(3, gated.n_gated, gated.parts.n_heads, gated.n_slices)
    torch.testing.assert_close(_logits(gated, batch, masks=full), want, atol=1e-5, rtol=0)
