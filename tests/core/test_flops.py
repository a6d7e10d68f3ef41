"""The FLOPs module agrees with torch's FlopCounterMode on what actually runs (within 1%)."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import dynprune
from dynprune import GateConfig
from dynprune.arch import resolve
from dynprune.flops import build_flops_model
from tests.core.test_budget import _diverse_router
from tests.helpers import DECODER_TYPES, ENCODER_TYPES, random_masks, tiny_batch, tiny_decoder, tiny_model


def _counted(fn):
    # the math SDPA backend decomposes attention into matmuls that FlopCounterMode counts
    # (the fused CPU kernel is not in its registry)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_dense_flops_match_counter(model_type):
    model = tiny_model(model_type)
    batch = tiny_batch(batch=3, seq=23)
    fm = build_flops_model(model, resolve(model), slice_size=32)
    counted = _counted(lambda: model(**batch))
    assert counted == pytest.approx(3 * fm.dense(23), rel=0.01)


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
@pytest.mark.parametrize("router_layer", [0, 1])
def test_exact_flops_of_router_chosen_gathered_forward_match_counter(model_type, router_layer):
    cfg = GateConfig(ffn_slice_size=32, router_layer=router_layer)
    gated = _diverse_router(dynprune.wrap(tiny_model(model_type, layers=4), cfg), seed=5)
    batch = tiny_batch(batch=5, seq=21)
    budgets = torch.tensor([0.5, 0.6, 0.75, 0.9, 1.0])
    counted = _counted(lambda: gated(**batch, budget=budgets))
    info = gated.last
    assert info.masks is not None and not bool(info.masks.head.all())
    assert counted == pytest.approx(float(info.flops.sum()), rel=0.01)


def test_exact_flops_with_skipped_layers_and_padding_match_counter():
    gated = dynprune.wrap(tiny_model("bert", layers=3), GateConfig(ffn_slice_size=16))
    batch = tiny_batch(batch=6, seq=30)
    masks = random_masks(gated, 6, 0.5, seed=11, nested=True, skip_layers=True)
    counted = _counted(lambda: gated(**batch, masks=masks))
    assert counted == pytest.approx(float(gated.last.flops.sum()), rel=0.01)


def test_expected_flops_are_differentiable_and_match_exact_at_hard_probabilities():
    gated = dynprune.wrap(tiny_model("bert"), GateConfig(ffn_slice_size=32))
    gated.train()
    batch = tiny_batch(batch=4)
    gated(**batch, budget=0.5)
    expected = gated.last.expected_flops
    assert expected.requires_grad
    expected.sum().backward()
    assert gated.router.out.weight.grad is not None and gated.router.out.weight.grad.abs().sum() > 0
    # probabilities of exactly 0/1 give the exact count
    fm, seq = gated.flops, batch["input_ids"].shape[1]
    masks = random_masks(gated, 4, 0.5, seed=2)
    exact = fm.gated_units(masks.head.double(), masks.ffn.double(), masks.layer.double(), seq)
    per_layer = (
        masks.head.sum(-1) * fm.head_cost(seq) + masks.ffn.sum(-1) * fm.slice_cost(seq)
    ) * masks.layer
    torch.testing.assert_close(exact, per_layer.sum(-1).double())


def test_router_flops_are_counted():
    gated = dynprune.wrap(tiny_model("bert"), GateConfig(ffn_slice_size=32, router_hidden=32))
    r = gated.router
    want = 2 * sum(lin.in_features * lin.out_features for lin in (r.inp, r.budget_inp, r.out))
    assert gated.flops.router == want == r.flops_per_sample()
    assert gated.flops.fixed(10) - gated.flops.fixed(10, with_router=False) == want


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_decoder_dense_flops_match_counter(model_type):
    model = tiny_decoder(model_type)
    fm = build_flops_model(model, resolve(model), slice_size=32)
    ids = torch.randint(3, 100, (2, 19))
    counted = _counted(lambda: model(ids, use_cache=False))  # LM head: a fixed per-token cost
    assert fm.task_per_token > 0
    assert counted == pytest.approx(2 * fm.dense(19), rel=0.01)


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_decoder_exact_flops_of_gathered_forward_match_counter(model_type):
    # GQA: a head unit is a KV group (G query heads + K + V); GPT-2: fused Conv1D Q/K/V
    gated = dynprune.wrap(tiny_decoder(model_type, layers=4), GateConfig(ffn_slice_size=32))
    ids = torch.randint(3, 100, (5, 17))
    masks = random_masks(gated, 5, 0.5, seed=4, nested=True, skip_layers=True)
    counted = _counted(lambda: gated(ids, masks=masks))
    assert not bool(masks.head.all())
    assert counted == pytest.approx(float(gated.last.flops.sum()), rel=0.01)
