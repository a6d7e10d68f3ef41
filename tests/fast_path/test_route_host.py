"""Host-side eval routing (dynprune/route_host.py) equals the general torch path."""

import pytest
import torch

import dynprune
from dynprune import GateConfig
from dynprune.state import GateState
from tests.helpers import tiny_batch, tiny_model

CONFIGS = [
    GateConfig(ffn_slice_size=16),
    GateConfig(ffn_slice_size=16, nested=False),
    GateConfig(ffn_slice_size=32, layers=False),
    GateConfig(ffn_slice_size=16, heads=False),
    GateConfig(ffn_slice_size=16, ffn=False, budget_conditioned=False),
    GateConfig(ffn_slice_size=16, router_layer=1),
    GateConfig(ffn_slice_size=16, heads=False, ffn=False),
]


def _routes(gated, batch, budget, monkeypatch):
    """(host ForwardInfo, general ForwardInfo) for the same router input."""
    captured = {}
    original = gated._route

    def capture(hidden, state):
        captured["hidden"] = hidden
        return original(hidden, state)

    gated._route = capture
    with torch.no_grad():
        gated(**batch, budget=budget)
    del gated._route
    hidden = captured["hidden"]
    budgets = dynprune.model.normalize_budget(budget, hidden.shape[0], hidden.device)

    def run():
        state = GateState()
        state.begin(budgets, batch["attention_mask"], None, gathered=True, backend="torch")
        with torch.no_grad():
            return gated._route(hidden, state)

    host = run()
    with monkeypatch.context() as m:
        m.setattr("dynprune.model.route_on_host", lambda *a: None)
        general = run()
    return host, general


def _diverse(gated, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in (gated.router.out, gated.router.budget_inp):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 3.0)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g))
    return gated


@pytest.mark.parametrize(
    "cfg",
    CONFIGS,
    ids=lambda c: f"n{c.nested}h{c.heads}f{c.ffn}l{c.layers}r{c.router_layer}b{c.budget_conditioned}",
)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_host_route_equals_general_route(cfg, padded, seed, monkeypatch):
    gated = _diverse(dynprune.wrap(tiny_model("bert", layers=4, seed=seed), cfg), seed)
    batch = tiny_batch(batch=7, seq=21, seed=seed, padded=padded)
    budgets = torch.tensor([0.3, 0.45, 1.0, 0.6, 0.75, 0.9, 0.5], dtype=torch.float64)
    host, general = _routes(gated, batch, budgets, monkeypatch)
    assert host is not general
    for a, b in zip((host.masks.head, host.masks.ffn, host.masks.layer),
                    (general.masks.head, general.masks.ffn, general.masks.layer)):  # fmt: skip
        assert torch.equal(a, b)
    torch.testing.assert_close(host.flops, general.flops, rtol=1e-12, atol=0)
    for a, b in ((host.gates.head, general.gates.head), (host.gates.ffn, general.gates.ffn),
                 (host.gates.layer, general.gates.layer)):  # fmt: skip
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(host.routed_rows, general.routed_rows)
    for a, b in ((host.scores.head, general.scores.head), (host.scores.ffn, general.scores.ffn),
                 (host.scores.layer, general.scores.layer)):  # fmt: skip
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(host.expected_flops, general.expected_flops, rtol=1e-5, atol=0)


@pytest.mark.parametrize("budget", [1.0, 0.5])
def test_host_route_all_dense_and_all_routed(budget, monkeypatch):
    gated = _diverse(dynprune.wrap(tiny_model("roberta", layers=3), GateConfig(ffn_slice_size=16)), 2)
    host, general = _routes(gated, tiny_batch(batch=4, seq=9), budget, monkeypatch)
    torch.testing.assert_close(host.flops, general.flops, rtol=1e-12, atol=0)
    assert (host.masks is None) == (general.masks is None) == (budget == 1.0)


def test_too_small_budget_still_raises_the_explanation():
    gated = dynprune.wrap(tiny_model("bert", layers=2), GateConfig(ffn_slice_size=16, router_layer=1))
    with pytest.raises(ValueError, match="smallest this gated model can run"), torch.no_grad():
        gated(**tiny_batch(batch=2, seq=8), budget=0.01)


@pytest.mark.parametrize("kinds", ["hfl", "hf", "fl", "hl"])
def test_host_selection_equals_select_under_budget_on_random_and_tied_logits(kinds):
    """Many random cases incl. exact ties (repeated logits) and budgets at unit boundaries."""
    import numpy as np

    from dynprune.gates import GateScores, select_under_budget
    from dynprune.route_host import _layout, select_on_host

    cfg = GateConfig(ffn_slice_size=16, heads="h" in kinds, ffn="f" in kinds, layers="l" in kinds)
    gated = dynprune.wrap(tiny_model("bert", layers=4), cfg)
    fm, seq = gated.flops, 13
    lay = _layout(gated, seq, torch.float32)
    g = torch.Generator().manual_seed(len(kinds))
    for case in range(60):
        n = 1 + case % 5
        tied = case % 2 == 1

        def pick(*shape, tied=tied):
            if tied:  # few values: many exact ties
                return torch.tensor([-2.0, 0.0, 1.5, 3.0])[torch.randint(0, 4, shape, generator=g)]
            return torch.randn(*shape, generator=g) * 3

        head = pick(n, 4, 4) if cfg.heads else None
        ffn = pick(n, 4, gated.n_slices) if cfg.ffn else None
        layer = pick(n, 4) if cfg.layers else None
        budget = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.1
        available = budget * fm.dense(seq) - fm.fixed(seq)
        if not cfg.layers and (available < fm.n_gated_layers * lay.compulsory).any():
            continue
        ref = select_under_budget(GateScores(head, ffn, layer), available, fm, seq)
        units = np.concatenate([t.numpy() for t in (head, ffn) if t is not None], axis=-1)
        take, keep = select_on_host(units, lay, None if layer is None else layer.numpy(), available.numpy())
        assert np.array_equal(keep, ref.layer.numpy())
        m = 0
        for t, want in ((head, ref.head), (ffn, ref.ffn)):
            if t is not None:
                assert np.array_equal(take[..., m : m + t.shape[-1]], want.numpy()), case
                m += t.shape[-1]
