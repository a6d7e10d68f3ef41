"""Export of statically pruned models: smaller HF directories that reload with equal predictions."""

import numpy as np
import pytest
import torch
from dynprune.eval.export import export_static, expressible, frozen_structure, load_pruned
from dynprune.eval.physical import physically_prune
from dynprune.eval.structure import Structure
from transformers import AutoModelForSequenceClassification

import dynprune
from dynprune import GateConfig
from tests.helpers import ENCODER_TYPES, tiny_batch, tiny_model


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_uniform_structure_exports_to_a_stock_hf_model(tmp_path, model_type):
    model = tiny_model(model_type, layers=3)
    s = Structure.from_indices(
        [range(4), [], range(4)], [range(0, 128, 2), [], range(64, 128)], [True, False, True]
    )
    assert expressible(s, 4)[0]
    batch = tiny_batch(batch=4)
    want = _logits(physically_prune(model, s.heads, s.neurons, s.layers), batch)
    info = export_static(model, s, tmp_path / "m")
    assert info.stock_loadable and info.params < sum(p.numel() for p in model.parameters())
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert len(dynprune.arch.resolve(loaded).parts) == 2
    torch.testing.assert_close(_logits(loaded, batch), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(load_pruned(tmp_path / "m"), batch), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_non_uniform_structure_needs_our_loader_and_roundtrips(tmp_path, model_type):
    model = tiny_model(model_type, layers=4)
    s = Structure.from_indices(
        [[0, 2], [], [1, 2, 3], [3]], [range(0, 128, 3), range(50), [], []], [True, True, True, False]
    )
    ok, why = expressible(s, 4)
    assert not ok and "head" in why
    batch = tiny_batch(batch=5)
    want = _logits(physically_prune(model, s.heads, s.neurons, s.layers), batch)
    info = export_static(model, s, tmp_path / "m")
    assert not info.stock_loadable and info.reason == why
    loaded = load_pruned(tmp_path / "m")
    torch.testing.assert_close(_logits(loaded, batch), want, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in loaded.parameters()) == info.params
    # plain Hugging Face with the modeling file written next to the weights (no dynprune involved)
    remote = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    assert type(remote).__module__.startswith("transformers_modules.")  # loaded from the export dir
    torch.testing.assert_close(_logits(remote, batch), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match=r"(?i)size|shape|trust_remote_code"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", trust_remote_code=False)


def test_per_layer_ffn_widths_are_not_stock_expressible():
    s = Structure.from_indices([range(4), range(4)], [range(10), range(20)], [True, True])
    ok, why = expressible(s, 4)
    assert not ok and "FFN widths" in why


def test_frozen_most_common_mask_equals_the_gated_model_on_those_inputs(tmp_path):
    model = tiny_model("bert", layers=3)
    gated = dynprune.wrap(model, GateConfig(ffn_slice_size=32)).eval()
    head = np.zeros((5, 3, 4), bool)
    ffn = np.zeros((5, 3, 4), bool)
    layer = np.ones((5, 3), bool)
    head[:, :, :2] = True
    ffn[:, :, :3] = True
    head[4, 1, 2] = True  # one sample differs
    s, share = frozen_structure(
        head, ffn, layer, gated.head_perm, gated.ffn_perm, 32, n_layers=3, n_heads=4, ffn_dim=128
    )
    assert share == pytest.approx(0.8)
    assert s.head_counts() == [2, 2, 2] and s.neuron_counts() == [96, 96, 96]
    batch = tiny_batch(batch=2)
    masks = dynprune.UnitMasks(
        torch.from_numpy(head[:2]), torch.from_numpy(ffn[:2]), torch.from_numpy(layer[:2])
    )
    want = _logits_gated(gated, batch, masks)
    plain = dynprune.unwrap(gated)
    export_static(plain, s, tmp_path / "frozen")
    got = _logits(load_pruned(tmp_path / "frozen"), batch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _logits_gated(gated, batch, masks):
    with torch.no_grad():
        return gated(**batch, masks=masks).logits
