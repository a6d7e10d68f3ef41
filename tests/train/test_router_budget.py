"""Every learned router reads the budget in its hidden layer (``Router.budget_inp``): it follows
per-example budgets closely, saves/loads like any router, and every inference route agrees."""

from __future__ import annotations

import pytest
import torch

import dynprune
from dynprune.config import GateConfig
from dynprune.flops import FlopsModel
from dynprune.gates import fill_ungated, probabilities
from dynprune.router import Router
from tests.helpers import tiny_batch, tiny_model

MINILM = FlopsModel(
    n_layers=6,
    dense_prefix_layers=0,
    n_heads=12,
    head_dim=32,
    hidden=384,
    ffn_dim=1536,
    slice_size=128,
    ffn_matmuls=2,
    task_per_token=0,
    task_pooled=2 * 384 * 384 + 2 * 384 * 2,
)


def _budget_tracking_error(router_kind: str, steps: int = 200) -> float:
    """Train only a router (MiniLM sizes, random pooled inputs) so that expected FLOPs = budget."""
    torch.manual_seed(0)
    router = Router(384, 6, 12, 12, GateConfig(router=router_kind))
    opt = torch.optim.Adam(router.parameters(), lr=1e-3)
    bank = torch.randn(256, 4, 384)
    seq = 30
    errors = []
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,))
        b = 0.2 + 0.6 * torch.rand(32, dtype=torch.float64)
        p = fill_ungated(probabilities(router(bank[idx], None, b)), 32, 6, 12, 12, like=bank)
        ratio = (MINILM.fixed(seq) + MINILM.gated_units(p.head, p.ffn, p.layer, seq)) / MINILM.dense(seq)
        gap = ratio - b
        opt.zero_grad()
        (gap**2).mean().backward()
        opt.step()
        errors.append(float(gap.detach().abs().mean()))
    return sum(errors[-50:]) / 50


@pytest.mark.parametrize("router_kind", ["dynamic", "static"])
def test_routers_track_per_example_budgets(router_kind):
    error = _budget_tracking_error(router_kind)
    assert error < 0.05, error


def test_router_saves_loads_and_counts_flops(tmp_path):
    model = tiny_model()
    on = dynprune.wrap(model, GateConfig(ffn_slice_size=32, router_hidden=16))
    n_out = 3 * 4 + 3 * 4 + 3
    assert on.router.flops_per_sample() == 2 * (64 * 16 + 2 * 16 + (16 + 2) * n_out)
    on.eval()
    batch = tiny_batch()
    with torch.no_grad():
        on.router.budget_inp.weight.normal_()
        a = on(**batch, budget=0.5).logits
    dynprune.save_gates(on, tmp_path / "gates")
    base = dynprune.unwrap(on)
    loaded = dynprune.load_gates(base, tmp_path / "gates").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch, budget=0.5).logits, a)


def test_every_inference_route_reads_the_budget_in_the_hidden_layer():
    """Eval mode without autograd may take a faster routing path: it must agree with the general one."""
    torch.manual_seed(0)
    gated = dynprune.wrap(tiny_model(), GateConfig(ffn_slice_size=32, router_hidden=16)).eval()
    with torch.no_grad():
        gated.router.budget_inp.weight.normal_(std=3.0)
        gated.router.out.weight.normal_(std=1.0)
    batch = tiny_batch(batch=6)
    budget = torch.tensor([0.3, 0.4, 0.5, 0.6, 0.7, 0.8], dtype=torch.float64)
    with torch.no_grad():
        fast = gated(**batch, budget=budget)
        fast_masks = gated.last.masks
    # the general routing path (autograd on) + masked layers
    with gated.running(execution="masked"), torch.enable_grad():
        slow = gated(**batch, budget=budget)
        slow_masks = gated.last.masks
    for kind in ("head", "ffn", "layer"):
        assert torch.equal(getattr(fast_masks, kind), getattr(slow_masks, kind)), kind
    torch.testing.assert_close(fast.logits, slow.logits.detach(), rtol=1e-4, atol=1e-5)
