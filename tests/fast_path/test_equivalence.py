"""The fast gathered CPU path equals the masked path (HF layers × gate multipliers).

Tolerance (fp32): atol 1e-5 on logits / 2e-5 on hidden states; the paths differ
only in summation order (fused Q/K/V, blocks, residual folded into addmm).
"""

import pytest
import torch

import dynprune
from dynprune import GateConfig, UnitMasks
from tests.helpers import ENCODER_TYPES, minilm_gated, random_masks, tiny_batch, tiny_model

ATOL = 1e-5


def _both(gated, batch, **kw):
    outs = []
    for execution in ("masked", "gathered"):
        with gated.running(execution=execution), torch.no_grad():
            outs.append(gated(**batch, **kw).logits)
    return outs


def _shared(masks: UnitMasks, batch: int) -> UnitMasks:
    return UnitMasks(
        masks.head[:1].expand(batch, -1, -1).clone(),
        masks.ffn[:1].expand(batch, -1, -1).clone(),
        masks.layer[:1].expand(batch, -1).clone(),
    )


@pytest.fixture(params=ENCODER_TYPES)
def gated(request):
    return dynprune.wrap(tiny_model(request.param, layers=4), GateConfig(ffn_slice_size=16))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("mode", ["shared", "different", "different_arbitrary"])
def test_masks_per_batch(gated, mode, padded):
    batch = tiny_batch(batch=7, seq=19, padded=padded)
    masks = random_masks(gated, 7, 0.5, seed=3, nested=(mode != "different_arbitrary"), skip_layers=True)
    if mode == "shared":
        masks = _shared(masks, 7)
    masked, gathered = _both(gated, batch, masks=masks)
    torch.testing.assert_close(gathered, masked, atol=ATOL, rtol=0)


@pytest.mark.parametrize("keep", [0.0, 1.0])
def test_empty_and_full_keep_sets(gated, keep):
    batch = tiny_batch(batch=5, seq=13)
    masks = random_masks(gated, 5, keep, seed=1, skip_layers=False)
    masked, gathered = _both(gated, batch, masks=masks)
    torch.testing.assert_close(gathered, masked, atol=ATOL, rtol=0)


def test_mixed_empty_full_and_skipped_rows_in_one_batch(gated):
    n_layers, n_heads, n_slices = gated.n_gated, gated.parts.n_heads, gated.n_slices
    masks = UnitMasks.full(4, n_layers, n_heads, n_slices)
    masks.head[1] = False  # no heads anywhere
    masks.ffn[2] = False  # no FFN anywhere
    masks.layer[3, ::2] = False  # every other layer skipped
    masks.head[0, 1, 2:] = False  # a prefix
    batch = tiny_batch(batch=4, seq=11)
    masked, gathered = _both(gated, batch, masks=masks)
    torch.testing.assert_close(gathered, masked, atol=ATOL, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_batch_of_one(gated, seed):
    batch = tiny_batch(batch=1, seq=23, seed=seed)
    masks = random_masks(gated, 1, 0.5, seed=seed)
    masked, gathered = _both(gated, batch, masks=masks)
    torch.testing.assert_close(gathered, masked, atol=ATOL, rtol=0)


def test_nested_masks_with_many_count_levels(gated):
    """Nested masks, several samples per count level and skipped layers: exact blocks, unit runs."""
    batch = tiny_batch(batch=9, seq=17)
    masks = random_masks(gated, 9, 0.6, seed=5, nested=True, skip_layers=True)
    masked, gathered = _both(gated, batch, masks=masks)
    torch.testing.assert_close(gathered, masked, atol=ATOL, rtol=0)


def test_router_chosen_masks_with_dense_prefix_layer():
    model = tiny_model("bert", layers=4)
    gated = dynprune.wrap(model, GateConfig(ffn_slice_size=16, router_layer=1))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        gated.router.out.weight.copy_(torch.randn(gated.router.out.weight.shape, generator=g) * 2)
    batch = tiny_batch(batch=6, seq=15)
    budgets = torch.tensor([0.3, 0.45, 0.6, 0.75, 0.9, 1.0])
    masked, gathered = _both(gated, batch, budget=budgets)
    torch.testing.assert_close(gathered, masked, atol=ATOL, rtol=0)


@pytest.mark.real
@pytest.mark.parametrize("mode", ["shared", "different"])
def test_minilm_fast_path_equals_masked(minilm_dir, mode):
    gated, batch = minilm_gated(minilm_dir, batch=6, padded_from=3)  # padding in half of the rows
    masks = random_masks(gated, 6, 0.5, seed=2, nested=True, skip_layers=True)
    if mode == "shared":
        masks = _shared(masks, 6)
    masked, gathered = _both(gated, batch, masks=masks)
    torch.testing.assert_close(gathered, masked, atol=ATOL, rtol=0)
