"""Physically sliced models equal the masked gated model with the same kept units."""

import copy

import pytest
import torch
from dynprune.eval.physical import physically_prune, units_of_sample
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import dynprune
from dynprune import GateConfig, UnitMasks
from tests.helpers import ENCODER_TYPES, random_masks, tiny_batch, tiny_model


def _shared_masks(gated, seed):
    m = random_masks(gated, 1, 0.5, seed=seed, nested=False, skip_layers=True)
    m.head[0, 1] = False  # a layer with no head
    m.ffn[0, 2] = False  # a layer with no FFN neuron
    m.layer[0, 1] = True
    m.layer[0, 3] = False  # a removed layer
    return m


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_physical_equals_masked_with_same_units(model_type):
    base = tiny_model(model_type, layers=4)
    reference = copy.deepcopy(base)
    gated = dynprune.wrap(base, GateConfig(ffn_slice_size=16, execution="masked"))
    one = _shared_masks(gated, seed=2)
    batch = tiny_batch(batch=4, seq=15)
    masks = UnitMasks(*(t.expand(4, *t.shape[1:]) for t in (one.head, one.ffn, one.layer)))
    heads, neurons, layers = units_of_sample(gated, one, 0)
    pruned = physically_prune(reference, heads, neurons, layers)
    with torch.no_grad():
        want = gated(**batch, masks=masks).logits
        got = pruned(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # really smaller: parameter count, layer count, and FLOPs as the FLOPs module says
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in reference.parameters())
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        pruned(**batch)
    seq = batch["input_ids"].shape[1]
    assert counter.get_total_flops() == pytest.approx(4 * float(gated.last.flops[0]), rel=0.01)
    assert gated.last.flops[0] < gated.flops.dense(seq)


def test_original_model_untouched_and_inplace_option():
    model = tiny_model("bert", layers=2, heads=4, hidden=64, ffn=128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = physically_prune(model, [[0, 2], [1]], [list(range(10)), []])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert pruned.bert.encoder.layer[0].attention.self.query.out_features == 2 * 16
    assert pruned.bert.encoder.layer[1].output.dense.in_features == 0
    same = physically_prune(model, [[0], [0]], [[0], [0]], [True, False], inplace=True)
    assert same is model and len(model.bert.encoder.layer) == 1


def test_bad_indices_are_clear_errors():
    model = tiny_model("bert", layers=2, heads=4)
    with pytest.raises(ValueError, match="indices must be in"):
        physically_prune(model, [[0, 4], [0]], [[0], [0]])
    with pytest.raises(ValueError, match="duplicated"):
        physically_prune(model, [[0, 0], [0]], [[0], [0]])
    with pytest.raises(ValueError, match="2 layers"):
        physically_prune(model, [[0]], [[0], [0]])
    gated = dynprune.wrap(model)
    with pytest.raises(ValueError, match="plain HF model"):
        physically_prune(gated.model, [[0], [0]], [[0], [0]])
