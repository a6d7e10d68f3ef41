"""Static structures: FLOPs of physically pruned models (vs FlopCounterMode), budget allocation."""

import pytest
import torch
from dynprune.eval.baselines.structured import (
    counts_from_ratios,
    ln_scores,
    random_units,
    select,
    top_units,
    uniform_counts,
)
from dynprune.eval.physical import physically_prune
from dynprune.eval.structure import Structure, static_flops_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers import ENCODER_TYPES, tiny_batch, tiny_model


def _counted(fn) -> int:
    # the math SDPA backend decomposes attention into matmuls that FlopCounterMode counts
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _prune(model, s: Structure):
    return physically_prune(model, s.heads, s.neurons, s.layers)


MIXED = Structure.from_indices(
    heads=[[0, 2], [], [1, 2, 3], [3]],
    neurons=[list(range(0, 128, 3)), list(range(50)), [], []],
    layers=[True, True, True, False],
)


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_physically_pruned_flops_match_flop_counter(model_type):
    model = tiny_model(model_type, layers=4)
    fm = static_flops_model(model)
    pruned = _prune(model, MIXED)
    seq = 19
    batch = tiny_batch(batch=3, seq=seq, padded=False)
    assert _counted(lambda: pruned(**batch)) == pytest.approx(3 * MIXED.flops(fm, seq), rel=1e-6)
    full = Structure.full(4, 4, 128)
    assert full.flops(fm, seq) == pytest.approx(fm.dense(seq))
    assert _counted(lambda: model(**batch)) == pytest.approx(3 * fm.dense(seq), rel=1e-6)
    assert MIXED.flops_ratio(fm, seq) < 0.5


def test_structure_roundtrip_and_removed_layers():
    s = Structure.from_dict(MIXED.to_dict())
    assert s == MIXED
    assert s.head_counts() == [2, 0, 3, 0] and s.neuron_counts() == [43, 50, 0, 0]
    assert s.layers == (True, True, True, False)
    # a layer left with nothing is removed unless the caller says otherwise
    auto = Structure.from_indices([[], [1]], [[], [2]])
    assert auto.layers == (False, True)
    assert not MIXED.is_uniform() and Structure.full(2, 4, 8).is_uniform()


@pytest.mark.parametrize("budget", [0.15, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("seq", [8, 40])
def test_uniform_counts_fit_and_spend_the_budget(budget, seq):
    model = tiny_model("bert", layers=3)
    fm = static_flops_model(model)
    h, n = uniform_counts(fm, budget, seq)
    s = Structure.from_indices([list(range(h))] * 3, [list(range(n))] * 3, [True] * 3)
    ratio = s.flops_ratio(fm, seq)
    assert ratio <= budget + 1e-9
    # within one neuron per layer of the budget
    assert ratio >= budget - 3 * fm.slice_cost(seq) / fm.slice_size / fm.dense(seq) - 1e-9
    _, n8 = uniform_counts(fm, budget, seq, multiple=8)
    assert n8 % 8 == 0 and n8 <= n


def test_counts_from_ratios_respect_budget_and_proportions():
    fm = static_flops_model(tiny_model("bert", layers=3))
    h, n = counts_from_ratios(fm, 0.4, 32, [1.0, 0.5, 0.1], [0.2, 1.0, 0.6])
    s = Structure.from_indices([list(range(k)) for k in h], [list(range(k)) for k in n], [True] * 3)
    assert s.flops_ratio(fm, 32) <= 0.4 + 1e-9
    assert s.flops_ratio(fm, 32) > 0.35
    assert n[1] > n[2] > n[0]
    # ratios allowing more than the model has: everything kept, nothing more
    h, n = counts_from_ratios(fm, 1.0, 32, [1.0] * 3, [1.0] * 3)
    assert h == [4] * 3 and n == [128] * 3


def test_ln_scores_pick_the_largest_units_and_select_maps_to_original_indices():
    model = tiny_model("bert", layers=2)
    layer = model.bert.encoder.layer[0]
    with torch.no_grad():
        layer.attention.self.value.weight[2 * 16 : 3 * 16] *= 50  # head 2 huge
        layer.intermediate.dense.weight[7] *= 50  # neuron 7 huge
    hs, ns = ln_scores(model, head_dim=16)
    assert int(hs[0].argmax()) == 2 and int(ns[0].argmax()) == 7
    assert top_units(hs, [1, 1])[0] == [2]
    # scores of a pruned model refer to positions among the kept units
    current = Structure.from_indices([[1, 2, 3], [0, 1]], [[5, 7, 9], [0, 1, 2]], [True, True])
    pruned = _prune(model, current)
    hs2, ns2 = ln_scores(pruned, head_dim=16)
    assert [len(x) for x in hs2] == [3, 2] and [len(x) for x in ns2] == [3, 3]
    nxt = select(current, hs2, ns2, [1, 1], [1, 1])
    assert nxt.heads[0] == (2,) and nxt.neurons[0] == (7,)


def test_random_units_have_the_counts_and_depend_on_the_seed():
    a = random_units(4, 128, [2, 3], [10, 20], seed=0)
    b = random_units(4, 128, [2, 3], [10, 20], seed=1)
    assert a.head_counts() == [2, 3] and a.neuron_counts() == [10, 20]
    assert a != b and a == random_units(4, 128, [2, 3], [10, 20], seed=0)


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_expand_into_puts_fine_tuned_pruned_weights_back_exactly(model_type):
    import copy

    from dynprune.eval.baselines.structured import expand_into

    model = tiny_model(model_type, layers=4)
    pruned = _prune(model, MIXED)
    with torch.no_grad():  # "fine-tuning": every weight of the pruned model changes
        for p in pruned.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    full = expand_into(copy.deepcopy(model), pruned, MIXED, head_dim=16)
    batch = tiny_batch(batch=3)
    with torch.no_grad():
        want = pruned(**batch).logits
        got = _prune(full, MIXED)(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
