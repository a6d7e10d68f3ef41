"""Planner: blocks cover exactly the kept units, merging is optimal, nested plans use views only."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dynprune
from dynprune import GateConfig
from dynprune.plan import plan_forward
from tests.helpers import random_masks, tiny_batch, tiny_model


def _coverage(plan, n_units, batch):
    """(B, U) int: how often each (sample, unit) is computed, and how often it is *kept* by the block."""
    computed = np.zeros((batch, n_units), dtype=int)
    kept = np.zeros((batch, n_units), dtype=int)
    for blk in plan.blocks:
        units = np.arange(n_units)[blk.units] if isinstance(blk.units, slice) else blk.units.numpy()
        for r in range(blk.start, blk.stop):
            sample = plan.rows[r]
            computed[sample, units] += 1
            kept[sample, units] += 1
    return computed, kept


@pytest.mark.parametrize("nested", [True, False])
def test_blocks_cover_exactly_the_kept_units(nested):
    gated = dynprune.wrap(tiny_model("bert", layers=4), GateConfig(ffn_slice_size=16))
    masks = random_masks(gated, 11, 0.5, seed=4, nested=nested, skip_layers=True).canonical()
    plans = plan_forward(masks.head, masks.ffn, masks.layer)
    for i, p in enumerate(plans):
        assert p.n_kept == int(masks.layer[:, i].sum())
        for kind, m in ((p.attention, masks.head[:, i]), (p.ffn, masks.ffn[:, i])):
            computed, kept = _coverage(kind, m.shape[1], 11)
            assert np.array_equal(kept, m.numpy().astype(int))  # each kept unit exactly once
            assert computed.max() <= 1
            assert kind.computed_units == computed.sum() >= m.sum()
            assert kind.computed_units == int(m.sum())  # exact blocks: no wasted work
            if nested:  # views only
                assert all(isinstance(b.units, slice) and b.units.start == 0 for b in kind.blocks)
            assert sorted(kind.rows.tolist()) == masks.layer[:, i].nonzero().flatten().tolist()


def test_batch_of_one_plan_is_trivial():
    gated = dynprune.wrap(tiny_model("bert", layers=3), GateConfig(ffn_slice_size=16))
    masks = random_masks(gated, 1, 0.5, seed=2, skip_layers=False).canonical()
    for p in plan_forward(masks.head, masks.ffn, masks.layer):
        assert p.attention.order is None and p.ffn.order is None and p.ffn_from_attention is None
        assert p.attention.n_blocks <= 1 and p.ffn.n_blocks <= 1


class _WeightCopies(TorchDispatchMode):
    """Records ops other than matmuls that read a weight's storage (copies, gathers)."""

    MATMULS = frozenset({"addmm", "mm", "bmm", "linear", "matmul", "t", "transpose", "view", "slice", "select",
               "_unsafe_view", "reshape", "expand", "detach", "alias", "as_strided", "unsqueeze"})  # fmt: skip

    def __init__(self, storages):
        super().__init__()
        self.storages, self.bad = storages, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.MATMULS:
            for a in list(args) + list((kwargs or {}).values()):
                if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.storages:
                    self.bad.append(name)
        return func(*args, **(kwargs or {}))


def test_nested_gathered_forward_copies_no_weights():
    gated = dynprune.wrap(tiny_model("bert", layers=3), GateConfig(ffn_slice_size=16))
    batch = tiny_batch(batch=6, seq=12)
    masks = random_masks(gated, 6, 0.5, seed=3, nested=True, skip_layers=True)
    with torch.no_grad():
        gated(**batch, masks=masks)  # packs Q/K/V once
        storages = set()
        for lp in gated.parts.parts:
            for lin in (lp.q, lp.k, lp.v, lp.o, lp.up, lp.down):
                storages.add(lin.weight.untyped_storage().data_ptr())
            storages.add(lp.layer._dynprune.qkv.get()[0].untyped_storage().data_ptr())
        with _WeightCopies(storages) as mode:
            gated(**batch, masks=masks)
    assert mode.bad == []
