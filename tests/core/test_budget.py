"""Per-sample budgets: executed FLOPs never exceed the budget, and land close to it."""

import itertools
import math

import pytest
import torch

import dynprune
from dynprune import GateConfig
from tests.helpers import ENCODER_TYPES, tiny_batch, tiny_model


def _diverse_router(gated, seed=0):
    """Give the (untrained) router large random output weights so samples differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gated.router.out.weight.copy_(torch.randn(gated.router.out.weight.shape, generator=g) * 2.0)
        gated.router.out.bias.copy_(torch.randn(gated.router.out.bias.shape, generator=g))
    return gated


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
@pytest.mark.parametrize(
    "cfg", [GateConfig(ffn_slice_size=32), GateConfig(ffn_slice_size=16, nested=False, layers=False)]
)
def test_executed_flops_within_budget_and_close_to_it(model_type, cfg):
    gated = _diverse_router(dynprune.wrap(tiny_model(model_type, layers=4), cfg))
    batch = tiny_batch(batch=6, seq=20)
    fm = gated.flops
    budgets = torch.tensor([0.2, 0.35, 0.5, 0.65, 0.8, 0.95])
    with torch.no_grad():
        gated(**batch, budget=budgets)
    info = gated.last
    seq = batch["input_ids"].shape[1]
    assert info.seq_len == seq and math.isclose(info.dense_flops, fm.dense(seq))
    assert bool((info.flops <= budgets.double() * info.dense_flops * (1 + 1e-9)).all())
    # greedy stops within the cost of one unit of the budget unless everything was kept
    largest_unit = max(fm.head_cost(seq), fm.slice_cost(seq))
    gap = budgets.double() * info.dense_flops - info.flops
    kept_all = info.masks.head.all(-1).all(-1) & info.masks.ffn.all(-1).all(-1)
    layer_gap = gap[~kept_all]
    # samples whose router switched layers off may have budget left; the rest are tight
    tight = info.masks.layer.all(-1)[~kept_all]
    assert bool((layer_gap[tight] <= largest_unit).all()), (gap, largest_unit)


def test_more_budget_never_means_fewer_flops():
    gated = _diverse_router(dynprune.wrap(tiny_model("bert", layers=4), GateConfig(ffn_slice_size=32)))
    batch = tiny_batch(batch=4)
    spent = []
    with torch.no_grad():
        for b in (0.2, 0.4, 0.6, 0.8, 1.0):
            gated(**batch, budget=b)
            spent.append(gated.last.flops)
    for lo, hi in itertools.pairwise(spent):
        assert bool((lo <= hi).all())


def test_budget_one_is_dense_and_skips_the_router():
    gated = dynprune.wrap(tiny_model("bert"), GateConfig(ffn_slice_size=32))
    batch = tiny_batch()
    with torch.no_grad():
        gated(**batch, budget=1.0)
    info = gated.last
    assert info.gates is None and info.scores is None
    assert torch.allclose(info.flops, torch.full_like(info.flops, info.dense_flops))


def test_mixed_batch_routes_only_rows_below_one():
    gated = _diverse_router(dynprune.wrap(tiny_model("bert"), GateConfig(ffn_slice_size=32)))
    batch = tiny_batch(batch=4)
    budgets = torch.tensor([1.0, 0.3, 1.0, 0.5])
    with torch.no_grad():
        gated(**batch, budget=budgets)
    info = gated.last
    assert info.routed_rows.tolist() == [1, 3]
    assert float(info.flops[0]) == info.dense_flops == float(info.flops[2])
    assert bool((info.flops[[1, 3]] <= budgets[[1, 3]].double() * info.dense_flops).all())
    assert bool(info.masks.head[[0, 2]].all())


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), float("inf"), "half"])
def test_bad_budgets_are_rejected_not_clamped(bad):
    gated = dynprune.wrap(tiny_model("bert"), GateConfig(ffn_slice_size=32))
    with pytest.raises(ValueError, match=r"\(0, 1\]|float or a tensor"):
        gated(**tiny_batch(), budget=bad)


def test_per_sample_budget_shape_is_checked():
    gated = dynprune.wrap(tiny_model("bert"), GateConfig(ffn_slice_size=32))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        gated(**tiny_batch(batch=5), budget=torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="sample 1"):
        gated(**tiny_batch(batch=3), budget=torch.tensor([0.5, 0.0, 0.5]))


def test_budget_below_fixed_costs_names_the_minimum():
    # heads and FFN not gated: only whole layers can go; a tiny budget cannot even pay the router + head
    gated = dynprune.wrap(tiny_model("bert"), GateConfig(ffn_slice_size=32, router_layer=1))
    with pytest.raises(ValueError, match="smallest this gated model can run"):
        gated(**tiny_batch(), budget=0.05)
