"""Gated objective on tiny models: the Lagrangian drives expected FLOPs to the target;
schedules, losses, Taylor importance and evaluation behave as documented."""

from __future__ import annotations

import copy

import pytest
import torch
from dynprune.train.config import DistillConfig, GateSection, RegularizerConfig
from dynprune.train.data import Collator
from dynprune.train.evaluation import collect, evaluate, summarize
from dynprune.train.importance import taylor_orders
from dynprune.train.losses import Lagrangian, logits_distillation
from dynprune.train.objectives import GatedObjective

import dynprune
from tests.helpers import VOCAB, tiny_batch, tiny_model


def _examples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(6, 24, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": i % 2, "index": i})
    return out


def _gate(**kw) -> GateSection:
    base = dict(ffn_slice_size=32, router_hidden=16, temperature=0.5, temperature_end=0.5, hard_from=1.0)
    return GateSection(**{**base, **kw})


def test_lagrangian_drives_expected_flops_to_the_target():
    """Gates open at init (expected ratio ~1); distillation from the unpruned model resists
    pruning; the Lagrangian still lands the expected FLOPs ratio on the target."""
    torch.manual_seed(0)
    model = tiny_model("bert", layers=3, hidden=64, ffn=128)
    teacher = copy.deepcopy(model).eval()
    gate = _gate(budget_min=0.4, budget_max=0.4)
    gated = dynprune.wrap(model, gate.gate_config())
    gated.train()
    obj = GatedObjective(
        gated,
        gate,
        RegularizerConfig(lambda_lr=0.01, target_warmup=0.3),
        DistillConfig(task_weight=0.0, logits_weight=1.0, temperature=1.0),
        seed=0,
        teacher=teacher,
    )
    router = {id(p) for p in gated.router.parameters()}
    opt = torch.optim.Adam(
        [
            {"params": [p for p in gated.parameters() if id(p) not in router], "lr": 1e-4},
            {"params": list(gated.router.parameters()), "lr": 1e-3},
        ]
    )
    ratios = []
    steps = 200
    for step in range(steps):
        batch = tiny_batch(batch=8, seq=12, seed=step % 20)
        batch["labels"] = torch.zeros(8, dtype=torch.long)
        obj.begin_step(step, steps)
        loss, logs = obj.loss(gated, batch, step, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        obj.after_step(lambda t: t)
        ratios.append(float(logs["expected_ratio"]))
    assert ratios[0] > 0.9
    final = sum(ratios[-20:]) / 20
    assert abs(final - 0.4) < 0.03, ratios[::20]
    assert obj.lagrangian.l2 > 10.0  # the multipliers moved (ascent on gap^2 only ever raises l2)


def test_lagrangian_multipliers_ascend_on_the_constraint():
    lag = Lagrangian(lr=0.1)
    for gap in (0.5, 0.5):
        lag.penalty(torch.tensor([gap, gap]))
    lag.step()
    assert lag.l1 == pytest.approx(0.05) and lag.l2 == pytest.approx(0.025)
    lag.penalty(torch.tensor([-1.0]))
    lag.step(lambda g: g * 0)  # the reduced gradient is what counts (all processes agree)
    assert lag.l1 == pytest.approx(0.05)
    state = lag.state_dict()
    other = Lagrangian(lr=0.1)
    other.load_state_dict(state)
    assert (other.l1, other.l2) == (lag.l1, lag.l2)


def test_schedules_anneal_then_harden():
    gated = dynprune.wrap(tiny_model(), _gate().gate_config())
    gate = _gate(temperature=1.0, temperature_end=0.1, hard_from=0.5)
    obj = GatedObjective(gated, gate, RegularizerConfig(target_warmup=0.2), DistillConfig(), seed=0)
    t0, h0, r0 = obj.schedule(0, 100)
    t1, h1, r1 = obj.schedule(25, 100)
    t2, h2, _r2 = obj.schedule(60, 100)
    assert (t0, h0, r0) == (1.0, False, 0.0)
    assert t1 == pytest.approx(0.1**0.5) and not h1 and r1 == 1.0
    assert t2 == pytest.approx(0.1) and h2
    obj.begin_step(60, 100)
    assert gated.relaxation.hard and gated.relaxation.temperature == pytest.approx(0.1)
    assert gated.gate_config == _gate().gate_config()  # the config is not a control channel
    b = obj.sample_budgets(1000, step=3, micro=0)
    assert b.min() >= gate.budget_min and b.max() <= gate.budget_max
    assert torch.equal(b, obj.sample_budgets(1000, step=3, micro=0))
    assert not torch.equal(b, obj.sample_budgets(1000, step=4, micro=0))
    assert float((b < 0.5).double().mean()) > 0.55  # log-uniform: more mass at low budgets
    obj.gate = _gate(budget_sampling="uniform")
    u = obj.sample_budgets(1000, step=3, micro=0)
    assert abs(float((u < 0.5).double().mean()) - 0.5) < 0.06


def test_hard_training_forward_runs_the_served_selection():
    """Straight-through hard gates: executed FLOPs within the per-example budget, as at inference."""
    torch.manual_seed(0)
    gated = dynprune.wrap(tiny_model(layers=3, hidden=64, ffn=128), _gate().gate_config())
    gate = _gate(hard_from=0.0)
    obj = GatedObjective(
        gated, gate, RegularizerConfig(), DistillConfig(task_weight=1.0, logits_weight=0.0), seed=1
    )
    gated.train()
    obj.begin_step(0, 10)
    batch = tiny_batch(batch=6, seq=20)
    batch["labels"] = torch.zeros(6, dtype=torch.long)
    loss, _logs = obj.loss(gated, batch, 0, 0)
    loss.backward()
    budgets = obj.sample_budgets(6, 0, 0)
    assert gated.last.masks is not None
    assert bool((gated.last.flops_ratio <= budgets + 1e-9).all())
    assert gated.router.out.weight.grad is not None and gated.router.out.weight.grad.abs().sum() > 0


def test_hidden_state_distillation_runs_the_teacher_online():
    torch.manual_seed(0)
    model = tiny_model(layers=2, hidden=64, ffn=128)
    teacher = copy.deepcopy(model).eval()
    gated = dynprune.wrap(model, _gate().gate_config())
    gated.train()
    distill = DistillConfig(task_weight=0.0, logits_weight=1.0, hidden_weight=1.0)
    obj = GatedObjective(gated, _gate(), RegularizerConfig(), distill, seed=0, teacher=teacher)
    batch = tiny_batch(batch=4, seq=10)
    batch["labels"] = torch.zeros(4, dtype=torch.long)
    obj.begin_step(0, 10)
    _loss, logs = obj.loss(gated, batch, 0, 0)
    assert logs["loss_hidden"] >= 0 and "loss_kd" in logs
    with pytest.raises(ValueError, match="teacher"):
        GatedObjective(gated, _gate(), RegularizerConfig(), distill, seed=0)


def test_distillation_is_zero_for_identical_logits():
    logits = torch.randn(4, 3)
    assert float(logits_distillation(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(logits_distillation(logits, -logits, 2.0)) > 0


def test_taylor_importance_ranks_a_dead_unit_last():
    model = tiny_model("bert", layers=2, hidden=64, ffn=128)
    parts = dynprune.arch.resolve(model)
    with torch.no_grad():  # head 1 of layer 0 and neuron 5 of layer 1 contribute nothing
        parts.parts[0].o.weight[:, 16:32] = 0
        parts.parts[1].down.weight[:, 5] = 0
    examples = _examples(64)
    head_perm, ffn_perm = taylor_orders(model, examples, Collator(0), n_batches=4, batch_size=16)
    assert head_perm.shape == (2, 4) and ffn_perm.shape == (2, 128)
    assert sorted(head_perm[0].tolist()) == [0, 1, 2, 3]
    assert head_perm[0, -1] == 1 and ffn_perm[1, -1] == 5
    gated = dynprune.wrap(model, _gate().gate_config(), orders=(head_perm, ffn_perm))
    dense = tiny_model("bert", layers=2, hidden=64, ffn=128)
    batch = tiny_batch()
    with torch.no_grad():  # reordering units does not change the function
        parts_d = dynprune.arch.resolve(dense)
        parts_d.parts[0].o.weight[:, 16:32] = 0
        parts_d.parts[1].down.weight[:, 5] = 0
        torch.testing.assert_close(gated(**batch).logits, dense(**batch).logits, rtol=1e-5, atol=1e-5)


def test_evaluate_dense_and_gated():
    model = tiny_model(layers=3, hidden=64, ffn=128)
    examples = _examples(40)
    loader = [Collator(0)(examples[i : i + 8]) for i in range(0, 40, 8)]
    dense = evaluate(model, loader)
    assert dense["n"] == 40 and dense["flops_ratio_mean"] == 1.0 and 0 <= dense["accuracy"] <= 1
    gated = dynprune.wrap(model, _gate().gate_config())
    full = evaluate(gated, loader, budget=1.0)
    assert full["accuracy"] == dense["accuracy"] and full["loss"] == pytest.approx(dense["loss"], rel=1e-5)
    rec = collect(gated, loader, budget=0.5, keep_masks=True)
    s = summarize(rec)
    assert s["flops_ratio_max"] <= 0.5 and s["flops_ratio_mean"] > 0.4
    assert rec.head is not None and rec.head.shape == (40, 3, 4)
    with pytest.raises(ValueError, match="needs a GatedModel"):
        evaluate(model, loader, budget=0.5)
    bad = [dict(b, labels=b["labels"] + 5) for b in loader]
    with pytest.raises(ValueError, match="never trained on"):
        evaluate(gated, bad, budget=0.5)
