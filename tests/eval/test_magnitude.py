"""Unstructured magnitude pruning: sparsity level, permanence, dense FLOPs, sparse export round-trip."""

import pytest
import torch
from dynprune.eval.baselines.magnitude import (
    magnitude_prune,
    make_permanent,
    nonzero_flops_ratio,
    prunable_linears,
    sparsity,
)
from dynprune.eval.sparse_io import load_sparse, save_sparse, weights_bytes
from dynprune.eval.structure import static_flops_model
from torch.nn.utils import prune

from tests.helpers import tiny_batch, tiny_model


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9])
def test_global_l1_reaches_the_sparsity_and_keeps_the_largest_weights(keep):
    model = tiny_model("bert")
    weights = torch.cat([lin.weight.detach().abs().flatten() for lin in prunable_linears(model)])
    magnitude_prune(model, keep)
    assert sparsity(model) == pytest.approx(1 - keep, abs=1e-4)
    # global: the threshold is shared across layers (every kept |w| >= every pruned |w|)
    kept = torch.cat([lin.weight.detach().abs().flatten() for lin in prunable_linears(model)])
    survivors = weights[kept != 0]
    pruned = weights[kept == 0]
    assert float(survivors.min()) >= float(pruned.max())
    # layers end up with different sparsities (global, not per layer)
    per_layer = {round(float((lin.weight == 0).float().mean()), 3) for lin in prunable_linears(model)}
    assert len(per_layer) > 1


def test_masks_survive_fine_tuning_and_become_permanent():
    model = tiny_model("bert").train()
    magnitude_prune(model, 0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = tiny_batch(batch=4)
    for _ in range(2):
        out = model(**batch, labels=torch.tensor([0, 1, 0, 1]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert sparsity(model) == pytest.approx(0.7, abs=1e-4)
    make_permanent(model)
    assert not any(prune.is_pruned(m) for m in prunable_linears(model))
    assert all(not hasattr(m, "weight_orig") for m in prunable_linears(model))
    assert sparsity(model) == pytest.approx(0.7, abs=1e-4)


def test_dense_hardware_executes_dense_flops_but_nonzero_flops_fall():
    model = tiny_model("bert")
    fm = static_flops_model(model)
    magnitude_prune(model, 0.25)
    make_permanent(model)
    ratio = nonzero_flops_ratio(model, fm, 32)
    # the matmul share of the zeros is removed; attention scores stay
    assert 0.25 < ratio < 0.45


def test_sparse_export_roundtrip_equal_predictions_and_smaller(tmp_path):
    model = tiny_model("bert", hidden=64, ffn=256)
    magnitude_prune(model, 0.2)
    make_permanent(model)
    batch = tiny_batch(batch=4)
    with torch.no_grad():
        want = model(**batch).logits
    sparse_dir, dense_dir = tmp_path / "sparse", tmp_path / "dense"
    save_sparse(model, sparse_dir)
    model.save_pretrained(dense_dir)
    loaded = load_sparse(sparse_dir)
    with torch.no_grad():
        got = loaded(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got_state = loaded.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, got_state[name]), name
    assert weights_bytes(sparse_dir) < 0.6 * weights_bytes(dense_dir)


def test_load_sparse_rejects_other_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sparse_model\.safetensors"):
        load_sparse(tmp_path)
