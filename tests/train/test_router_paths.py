"""The static control and the dynamic router train along one code path.

The ablation ladder (docs/training.md, Finding) asks that the dynamic router with its
input path disabled match the static control; here it must match it exactly: same
losses step by step (soft and hard phases, the pipeline's parameter groups), same
masks and logits in evaluation (where the dynamic router takes the host route). The
one intended difference, the FLOPs of the router's own input layer (charged to every
budget; 0.01 % of dense at MiniLM sizes, but large in a tiny model), is set equal.
"""

from __future__ import annotations

import pytest
import torch
from dynprune.train.config import DistillConfig, GateSection, RegularizerConfig
from dynprune.train.data import Collator
from dynprune.train.evaluation import collect
from dynprune.train.objectives import GatedObjective
from dynprune.train.trainer import StageSettings, param_groups

import dynprune
from dynprune.router import Router
from tests.helpers import tiny_batch, tiny_model

GATE = GateSection(ffn_slice_size=32, router_hidden=16, temperature=1.0, temperature_end=0.2, hard_from=0.5)


def _train(router: str, steps: int = 12, input_off: bool = False):
    with pytest.MonkeyPatch.context() as m:
        if input_off:  # charge the static router's FLOPs (the input layer's own cost is a stated difference)
            static_cost = Router(64, 3, 4, 4, GATE.gate_config(router="static")).flops_per_sample()
            m.setattr(Router, "flops_per_sample", lambda self: static_cost)
        gated = dynprune.wrap(tiny_model(seed=3), GATE.gate_config(router=router))
    if input_off:
        with torch.no_grad():
            gated.router.inp.weight.zero_()
        gated.router.inp.weight.requires_grad_(False)
    torch.manual_seed(7)  # the same noise (dropout, Gumbel) from here on, whatever the init drew
    settings = StageSettings(name="gated", epochs=1.0, lr=1e-3, batch_size=8, router_lr=1e-2)
    opt = torch.optim.AdamW(param_groups(gated, settings), lr=settings.lr)
    obj = GatedObjective(
        gated, GATE, RegularizerConfig(), DistillConfig(task_weight=1.0, logits_weight=0.0), 0
    )
    gated.train()
    losses = []
    for step in range(steps):
        batch = tiny_batch(batch=8, seq=12, seed=step % 6, padded=True)
        batch["labels"] = torch.arange(8) % 2
        obj.begin_step(step, steps)
        loss, _ = obj.loss(gated, batch, step, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        obj.after_step(lambda t: t)
        losses.append(loss.item())
    return gated, losses


def _eval_batches():
    out = []
    for seed in range(3):
        b = tiny_batch(batch=8, seq=12, seed=10 + seed, padded=True)
        out.append({**b, "labels": torch.arange(8) % 2, "index": torch.arange(8) + 8 * seed})
    return out


def test_dynamic_router_without_its_input_is_the_static_control():
    static, static_losses = _train("static")
    dynamic, dynamic_losses = _train("dynamic", input_off=True)
    assert static_losses == dynamic_losses  # bit for bit: no other difference on the training path
    for name, p in static.model.named_parameters():
        torch.testing.assert_close(dict(dynamic.model.named_parameters())[name], p, rtol=0, atol=0)
    loader = _eval_batches()
    for budget in (0.3, 0.6):
        a = collect(static, loader, budget=budget, keep_masks=True)
        b = collect(dynamic, loader, budget=budget, keep_masks=True)  # host route on CPU
        for kind in ("head", "ffn", "layer"):
            assert (getattr(a, kind) == getattr(b, kind)).all(), kind
        assert (a.preds == b.preds).all()
        torch.testing.assert_close(torch.from_numpy(b.probs), torch.from_numpy(a.probs), rtol=1e-5, atol=1e-6)


def test_the_input_path_is_what_differs():
    """With its input on, the dynamic router's training diverges from the static one."""
    _, static_losses = _train("static", steps=3)
    _, dynamic_losses = _train("dynamic", steps=3)
    assert static_losses != dynamic_losses


def test_collator_batches_feed_both_routers():
    """Sanity for the helpers above: the evaluation batches are what the pipeline's collator makes."""
    ex = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 1, "index": 0}]
    batch = Collator(0)(ex)
    assert set(_eval_batches()[0]) >= set(batch) - {"teacher_logits"}
