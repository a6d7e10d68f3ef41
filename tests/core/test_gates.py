"""Gate estimators and the hard choice under a budget."""

import math

import pytest
import torch

import dynprune
from dynprune import GateConfig
from dynprune.gates import GateScores, add_noise, nested_logits, relaxed, select_under_budget
from dynprune.state import Relaxation
from tests.helpers import tiny_batch, tiny_model


def test_nested_logits_are_non_increasing_and_open_at_zero():
    raw = torch.randn(7, 3, 12) * 3
    logits = nested_logits(raw, 4.0)
    assert bool((logits[..., 1:] <= logits[..., :-1]).all())
    open_logits = nested_logits(torch.zeros(1, 1, 12), 4.0)
    assert bool((torch.sigmoid(open_logits) > 0.97).all())


def test_noise_keeps_nested_logits_nested_and_relaxation_is_in_unit_interval():
    torch.manual_seed(0)  # unseeded, a logit + noise can saturate sigmoid to exactly 1.0 in float32
    logits = nested_logits(torch.randn(50, 2, 8), 1.0)
    noisy = add_noise(GateScores(logits, logits.clone(), torch.zeros(50, 2)), nested=True)
    assert bool((noisy.head[..., 1:] <= noisy.head[..., :-1]).all())
    soft = relaxed(noisy, temperature=0.5)
    assert bool(((soft.head > 0) & (soft.head < 1)).all())
    sharper = relaxed(noisy, temperature=0.05)
    assert (sharper.head - 0.5).abs().mean() > (soft.head - 0.5).abs().mean()


def test_greedy_choice_keeps_prefixes_for_nested_logits():
    gated = dynprune.wrap(tiny_model("bert", layers=3), GateConfig(ffn_slice_size=16))
    fm = gated.flops
    scores = GateScores(
        nested_logits(torch.randn(20, 3, 4) * 2, 1.0),
        nested_logits(torch.randn(20, 3, 8) * 2, 1.0),
        torch.randn(20, 3) + 1,
    )
    seq = 15
    available = torch.linspace(0.1, 0.9, 20).double() * fm.dense(seq) - fm.fixed(seq)
    masks = select_under_budget(scores, available, fm, seq)
    for m in (masks.head, masks.ffn):
        # a prefix: once a unit is dropped, every later unit of that layer is dropped
        assert bool((m[..., 1:] <= m[..., :-1]).all())
    used = fm.gated_units(masks.head.double(), masks.ffn.double(), masks.layer.double(), seq)
    assert bool((used <= available + 1e-6).all())
    assert bool((masks.head[~masks.layer] == 0).all()) and bool((masks.ffn[~masks.layer] == 0).all())


def test_straight_through_gates_are_hard_forward_and_pass_gradients():
    gated = dynprune.wrap(tiny_model("bert"), GateConfig(ffn_slice_size=32))
    gated.relaxation = Relaxation(hard=True)
    gated.train()
    batch = tiny_batch(batch=4)
    out = gated(**batch, budget=0.4)
    info = gated.last
    values = torch.cat([info.gates.head.flatten(), info.gates.ffn.flatten(), info.gates.layer.flatten()])
    assert bool(((values == 0) | (values == 1)).all())
    assert bool((info.flops_ratio <= 0.4 + 1e-9).all())
    out.logits.sum().backward()
    grad = gated.router.out.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_soft_gates_in_training_pass_task_gradients_to_the_router():
    gated = dynprune.wrap(tiny_model("bert"), GateConfig(ffn_slice_size=32))
    gated.train()
    out = gated(**tiny_batch(batch=4), budget=0.5)
    assert not gated.last.gates.hard
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 0, 1])).backward()
    assert gated.router.inp.weight.grad.abs().sum() > 0


def test_static_router_ignores_the_input_and_random_router_differs_per_sample():
    static = dynprune.wrap(tiny_model("bert", seed=1), GateConfig(ffn_slice_size=32, router="static"))
    with torch.no_grad():
        static.router.out.weight.normal_(0, 2.0)
        static(**tiny_batch(batch=5), budget=0.5)
    masks = static.last.masks
    assert all(torch.equal(masks.head[0], masks.head[i]) for i in range(5))
    rnd = dynprune.wrap(tiny_model("bert", seed=2), GateConfig(ffn_slice_size=32, router="random"))
    with torch.no_grad():
        rnd(**tiny_batch(batch=5), budget=0.5)
    assert len({tuple(r.flatten().tolist()) for r in rnd.last.masks.head}) > 1
    assert rnd.flops.router == 0


def test_budget_beyond_the_kept_layers_is_spent_on_dropped_layers():
    """Layers the router drops come back (best units first) when the kept layers cannot hold the
    budget: executed FLOPs then reach the budget instead of stopping at the kept layers' size."""
    gated = dynprune.wrap(tiny_model("bert", layers=4), GateConfig(ffn_slice_size=16))
    fm, seq = gated.flops, 15
    torch.manual_seed(0)
    head, ffn = torch.randn(3, 4, 4), torch.randn(3, 4, 8)
    layer = torch.tensor([[2.0, -1.0, -1.0, 2.0], [2.0, -3.0, 2.0, 2.0], [-1.0, -1.0, -1.0, -1.0]])
    scores = GateScores(nested_logits(head, 1.0), nested_logits(ffn, 1.0), layer)
    available = torch.full((3,), 0.8).double() * fm.dense(seq) - fm.fixed(seq)
    masks = select_under_budget(scores, available, fm, seq)
    used = fm.gated_units(masks.head.double(), masks.ffn.double(), masks.layer.double(), seq)
    unit = max(fm.head_cost(seq), fm.slice_cost(seq))
    assert bool((used <= available + 1e-6).all())
    assert bool((used > available - 2 * unit).all())  # the budget is spent (to within two units)
    # kept layers are filled before a dropped one gets anything
    for b in range(2):
        kept = layer[b] > 0
        assert bool(masks.head[b, kept].all()) and bool(masks.ffn[b, kept].all())
    for m in (masks.head, masks.ffn):  # refilled layers keep prefixes too
        assert bool((m[..., 1:] <= m[..., :-1]).all())
    # a budget the kept layers can hold leaves dropped layers dropped
    small = torch.full((3,), 0.3).double() * fm.dense(seq) - fm.fixed(seq)
    masks = select_under_budget(scores, small, fm, seq)
    assert not bool(masks.layer[0, 1:3].any())


def test_logit_ranking_rounds_the_soft_gates_where_per_flop_ranking_prefers_cheap_units():
    """Saturated logits (every unit ~certain to be kept, as a learned router's are early in
    training): ranking per FLOP then takes every cheaper unit kind first, whatever the logits
    say; ranking by logit keeps the units with the highest logits, which is what rounding the
    soft gates (keep probability sigmoid(logit), cost already in the Lagrangian) asks."""
    gated = dynprune.wrap(tiny_model("bert", layers=2), GateConfig(ffn_slice_size=16, layers=False))
    fm, seq = gated.flops, 15
    cheap, dear = sorted([("head", fm.head_cost(seq)), ("ffn", fm.slice_cost(seq))], key=lambda kc: kc[1])
    n = {"head": fm.n_heads, "ffn": fm.n_slices}
    logits = {cheap[0]: torch.full((1, 2, n[cheap[0]]), 6.0), dear[0]: torch.full((1, 2, n[dear[0]]), 9.0)}
    scores = GateScores(logits["head"], logits["ffn"], None)
    # room for every unit of the dearer kind and nothing else
    available = torch.tensor([2 * n[dear[0]] * dear[1]], dtype=torch.float64)
    by_logit = select_under_budget(scores, available, fm, seq, ranking="logit")
    by_flop = select_under_budget(scores, available, fm, seq)
    kept = lambda m, kind: int(getattr(m, kind).sum())  # noqa: E731
    assert kept(by_logit, dear[0]) == 2 * n[dear[0]] and kept(by_logit, cheap[0]) == 0
    assert kept(by_flop, cheap[0]) == 2 * n[cheap[0]]  # every cheap unit first: the logits ignored
    assert kept(by_flop, dear[0]) < 2 * n[dear[0]]
    with pytest.raises(ValueError, match="unit_ranking"):
        GateConfig(unit_ranking="cheapest")


def test_gates_saved_before_unit_ranking_keep_ranking_per_flop(tmp_path):
    """New gates rank by logit (the default) and say so in gates.json; gates saved before the
    option existed were trained ranking per FLOP and load that way."""
    import json

    gated = dynprune.wrap(tiny_model("bert", layers=2), GateConfig(ffn_slice_size=16))
    assert gated.gate_config.unit_ranking == "logit"
    dynprune.save_gates(gated, tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "gates.json").read_text())
    assert meta["gate_config"]["unit_ranking"] == "logit"
    assert (
        dynprune.load_gates(tiny_model("bert", layers=2), tmp_path / "g").gate_config.unit_ranking == "logit"
    )
    del meta["gate_config"]["unit_ranking"]
    (tmp_path / "g" / "gates.json").write_text(json.dumps(meta))
    old = dynprune.load_gates(tiny_model("bert", layers=2), tmp_path / "g")
    assert old.gate_config.unit_ranking == "per_flop"


def test_training_free_router_ranks_per_flop():
    assert GateConfig.griffin().unit_ranking == "per_flop"
    with pytest.raises(ValueError, match="per FLOP"):
        GateConfig(router="griffin", layers=False, nested=False, unit_ranking="logit")


@pytest.mark.parametrize("per_flop", [False, True])
def test_fill_continues_past_a_unit_too_dear_for_what_is_left(per_flop):
    """Greedy order cheap₀, dear₀, cheap₁ with room for two cheap units: dear₀ does not fit, and
    cheap₁ (which does) is still taken — the fill does not stop at the first unit that fails."""
    gated = dynprune.wrap(tiny_model("bert", layers=1), GateConfig(ffn_slice_size=16, layers=False))
    fm, seq = gated.flops, 15
    costs = {"head": fm.head_cost(seq), "ffn": fm.slice_cost(seq)}
    cheap, dear = sorted(costs, key=costs.get)
    n = {"head": fm.n_heads, "ffn": fm.n_slices}
    logits = {cheap: torch.full((1, 1, n[cheap]), -30.0), dear: torch.full((1, 1, n[dear]), -30.0)}
    logits[cheap][0, 0, :2] = torch.tensor([9.0, 7.0])
    logits[dear][0, 0, 0] = 8.0
    if per_flop:  # the same order by log σ(logit) − log cost: dear₀ between the two cheap units
        logits[cheap][0, 0, :2] = torch.tensor([0.0, -2.0])
        ls = lambda x: float(torch.nn.functional.logsigmoid(torch.tensor(x)))  # noqa: E731
        target = (ls(0.0) + ls(-2.0)) / 2 - math.log(costs[cheap])
        logits[dear][0, 0, 0] = float(torch.logit(torch.tensor(math.exp(target + math.log(costs[dear])))))
    scores = GateScores(logits["head"], logits["ffn"], None)
    available = torch.tensor([2 * costs[cheap] * (1 + 1e-9)], dtype=torch.float64)
    assert bool(torch.isfinite(logits[dear]).all())
    masks = select_under_budget(scores, available, fm, seq, ranking="per_flop" if per_flop else "logit")
    assert int(getattr(masks, cheap).sum()) == 2 and int(getattr(masks, dear).sum()) == 0
