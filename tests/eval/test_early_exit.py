"""Early exit: exits really skip layers, FLOPs as counted by FlopCounterMode, calibration, training."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dynprune.eval.baselines.early_exit import (
    EarlyExitModel,
    EarlyExitObjective,
    EarlyExitRunner,
    calibrate_threshold,
    exit_costs,
    exits_at,
    load_early_exit,
    save_early_exit,
    threshold_governor,
)
from dynprune.eval.structure import static_flops_model
from dynprune.train.losses import logits_distillation
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers import tiny_batch, tiny_model


def _counted(fn) -> int:
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_last_exit_is_the_model_itself(model_type):
    model = tiny_model(model_type, layers=3)
    batch = tiny_batch(batch=4, seq=13)
    with torch.no_grad():
        want = model(**batch).logits
    ee = EarlyExitModel(model).eval()
    fm = static_flops_model(model)
    res = ee.infer(batch, threshold=float("inf"), fm=fm)  # nobody is confident enough: all run 3 layers
    torch.testing.assert_close(res.logits, want, rtol=1e-5, atol=1e-5)
    assert res.exit_layer.tolist() == [3, 3, 3, 3]
    assert res.flops.tolist() == pytest.approx([3 * (fm.layer_cost(13) + fm.task_head(13))] * 4)
    torch.testing.assert_close(ee(**batch).exit_logits[-1], want, rtol=1e-5, atol=1e-5)


def _confidences(ee, batch):
    return ee.exit_profile(batch).numpy()  # (L, B)


def test_exits_skip_layers_and_flops_match_the_flop_counter():
    model = tiny_model("bert", layers=4, num_labels=3)
    ee = EarlyExitModel(model).eval()
    fm = static_flops_model(model)
    batch = tiny_batch(batch=6, seq=11, padded=False)
    conf = _confidences(ee, batch)
    threshold = float(np.median(conf[:-1]))  # some rows leave early, some do not
    expect = exits_at(conf, threshold)
    assert len(set(expect.tolist())) > 1

    rows_per_layer = []
    hooks = [
        layer.register_forward_hook(lambda m, a, o: rows_per_layer.append(a[0].shape[0]))
        for layer in ee.parts.layers
    ]
    res = ee.infer(batch, threshold, fm)
    for h in hooks:
        h.remove()
    assert res.exit_layer.tolist() == expect.tolist()
    # layer k runs only on the rows that had not exited before it
    assert rows_per_layer == [int((expect >= k + 1).sum()) for k in range(len(rows_per_layer))]
    assert len(rows_per_layer) == int(expect.max())
    cost = exit_costs(fm, 11, 4)
    assert res.flops.numpy() == pytest.approx(cost[expect - 1])
    assert _counted(lambda: ee.infer(batch, threshold, fm)) == pytest.approx(float(res.flops.sum()), rel=1e-6)
    # and each row's logits are those of its own exit in the all-exits pass
    full = ee(**batch).exit_logits
    for i, k in enumerate(expect):
        torch.testing.assert_close(res.logits[i], full[k - 1, i], rtol=1e-5, atol=1e-5)


def test_padded_rows_keep_their_masks_when_the_batch_shrinks():
    model = tiny_model("bert", layers=3)
    ee = EarlyExitModel(model).eval()
    fm = static_flops_model(model)
    batch = tiny_batch(batch=5, seq=17, padded=True)
    conf = _confidences(ee, batch)
    threshold = float(np.median(conf[:-1]))
    res = ee.infer(batch, threshold, fm)
    full = ee(**batch).exit_logits
    for i, k in enumerate(res.exit_layer.tolist()):
        torch.testing.assert_close(res.logits[i], full[k - 1, i], rtol=1e-5, atol=1e-5)


def test_calibration_hits_the_target_mean_from_below():
    rng = np.random.default_rng(0)
    n_exits, n = 6, 2000
    conf = np.sort(rng.uniform(0.5, 1.0, size=(n_exits, n)), axis=0)  # later exits more confident
    ratios = np.repeat((np.arange(1, n_exits + 1) / n_exits)[:, None], n, axis=1)
    for target in (0.25, 0.5, 0.75):
        t, mean = calibrate_threshold(conf, ratios, target)
        assert mean <= target + 1e-12
        assert mean == pytest.approx(target, abs=0.01)  # fine-grained: many samples
        exits = exits_at(conf, t)
        assert ratios[exits - 1, np.arange(n)].mean() == pytest.approx(mean)
    with pytest.raises(ValueError, match="cannot reach"):
        calibrate_threshold(conf, ratios, 0.1)  # below the first exit's cost
    with pytest.raises(ValueError, match="mean FLOPs ratio"):
        calibrate_threshold(conf, ratios, 0.0)


def test_calibrated_on_validation_lands_near_the_target_on_test():
    model = tiny_model("bert", layers=6, num_labels=4, seed=3)
    ee = EarlyExitModel(model).eval()
    fm = static_flops_model(model)
    val = [tiny_batch(batch=16, seq=15, seed=s, padded=False) for s in range(20)]
    test = [tiny_batch(batch=16, seq=15, seed=100 + s, padded=False) for s in range(20)]
    conf = np.concatenate([_confidences(ee, b) for b in val], axis=1)
    ratios = np.repeat((exit_costs(fm, 15, 6) / fm.dense(15))[:, None], conf.shape[1], axis=1)
    t, val_mean = calibrate_threshold(conf, ratios, 0.5)
    runner = EarlyExitRunner(ee, t, fm)
    got = []
    for b in test:
        runner(b)
        got.append(runner.last_flops / fm.dense(15))
    test_mean = float(torch.cat(got).mean())
    assert val_mean <= 0.5 and test_mean == pytest.approx(0.5, abs=0.1)


def test_a_governed_threshold_lands_the_mean_when_the_inputs_are_less_confident():
    """Calibrated on one set of inputs, served on inputs whose exits are all less confident (they
    leave later): the calibrated threshold overshoots the target; the governed one does not."""
    rng = np.random.default_rng(0)
    n_exits, n = 6, 4000
    ratios_of = lambda m: np.repeat((np.arange(1, n_exits + 1) / n_exits)[:, None], m, axis=1)  # noqa: E731
    conf = np.sort(rng.uniform(0.4, 1.0, size=(n_exits, n)), axis=0)  # later exits more confident
    served = np.clip(np.sort(rng.uniform(0.4, 1.0, size=(n_exits, n)), axis=0) - 0.06, 0, 1)
    target = 0.4
    fixed, _ = calibrate_threshold(conf, ratios_of(n), target)
    gov = threshold_governor(conf, ratios_of(n), target, prior=0)
    assert gov.knob == fixed
    spent_fixed, spent_gov = [], []
    for b in np.array_split(np.arange(n), n // 64):  # batches of 64 served inputs
        spent_fixed.append(ratios_of(len(b))[exits_at(served[:, b], fixed) - 1, np.arange(len(b))])
        spent = ratios_of(len(b))[exits_at(served[:, b], gov.knob) - 1, np.arange(len(b))]
        gov.observe(spent)
        spent_gov.append(spent)
    assert np.concatenate(spent_fixed).mean() > target * 1.05  # outside +-2 %, by far
    assert np.concatenate(spent_gov).mean() == pytest.approx(target, rel=0.02)
    assert gov.knob < fixed and gov.bias > 0  # it exits earlier to make up for it


def test_a_governed_runner_adapts_while_evaluating_and_stops_after():
    model = tiny_model("bert", layers=4, num_labels=3, seed=5)
    ee = EarlyExitModel(model).eval()
    fm = static_flops_model(model)
    calib = [tiny_batch(batch=16, seq=12, seed=s, padded=False) for s in range(6)]
    conf = np.concatenate([_confidences(ee, b) for b in calib], axis=1)
    ratios = np.repeat((exit_costs(fm, 12, 4) / fm.dense(12))[:, None], conf.shape[1], axis=1)
    gov = threshold_governor(conf, ratios, 0.55)
    runner = EarlyExitRunner(ee, gov.knob, fm, governor=gov)
    served = [tiny_batch(batch=16, seq=12, seed=50 + s, padded=False) for s in range(4)]
    knobs, spent = [], []
    for b in served:
        knobs.append(gov.knob)
        runner(b)
        spent.append((runner.last_flops / fm.dense(12)).numpy())
        # the runner ran at the knob the governor held, and told it what that spent
        assert runner.last_exits.numpy().tolist() == exits_at(_confidences(ee, b), knobs[-1]).tolist()
    assert gov.seen == 64 and len(runner.exit_log) == 4
    assert gov.mean_spent == pytest.approx(float(np.concatenate(spent).mean()))
    assert len(set(knobs)) > 1  # it moved between batches
    runner.end_evaluation()
    frozen = gov.knob
    runner(served[0])
    assert gov.knob == frozen and gov.seen == 64
    assert len(runner.exit_log) == 4  # timing calls after the evaluation are not logged


def test_objective_trains_every_exit_and_the_model_roundtrips(tmp_path):
    from dynprune.train.config import DistillConfig

    torch.manual_seed(0)
    model = tiny_model("bert", layers=3)
    ee = EarlyExitModel(model).eval()  # no dropout for the weights check
    batch = {**tiny_batch(batch=8, seq=9, padded=False), "labels": torch.tensor([0, 1] * 4)}
    batch["teacher_logits"] = torch.randn(8, 2)
    objective = EarlyExitObjective(DistillConfig(task_weight=0.3, logits_weight=0.7, temperature=2.0))
    opt = torch.optim.AdamW(ee.parameters(), lr=3e-3)
    with torch.no_grad():  # PABEE weights k / sum(k) over the per-exit dense losses
        exits = ee(**{k: batch[k] for k in ("input_ids", "attention_mask")}).exit_logits
        want = sum(
            (k + 1) / 6 * (0.3 * F.cross_entropy(exits[k], batch["labels"])
                           + 0.7 * logits_distillation(exits[k], batch["teacher_logits"], 2.0))
            for k in range(3)
        )  # fmt: skip
        assert float(objective.loss(ee, batch, 0, 0)[0]) == pytest.approx(float(want), rel=1e-5)
    ee.train()
    losses = []
    for step in range(25):
        loss, _ = objective.loss(ee, batch, step, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step == 0:  # every exit head gets a gradient
            assert all(h.classifier.weight.grad is not None for h in ee.heads)
    assert losses[-1] < 0.75 * losses[0]
    ee.eval()
    save_early_exit(ee, tmp_path / "ee", {"steps": 25})
    again, info = load_early_exit(tiny_model("bert", layers=3, seed=9), tmp_path / "ee")
    b = tiny_batch(batch=3, seq=9)
    torch.testing.assert_close(again(**b).exit_logits, ee(**b).exit_logits)
    assert info == {"steps": 25}


def test_unsupported_family_is_refused():
    with pytest.raises(ValueError, match="early_exit supports"):
        EarlyExitModel(tiny_model("distilbert"))


def test_exit_heads_train_at_the_added_parameters_rate():
    """Exits 1..L-1 are new modules: the optimiser gives them the router's LR (no decay), the
    backbone and the model's own head (the last exit) keep the backbone's."""
    from dynprune.train.trainer import StageSettings, param_groups

    ee = EarlyExitModel(tiny_model("bert", layers=3))
    settings = StageSettings(name="finetune", epochs=1, lr=5e-5, batch_size=8, router_lr=1e-3)
    groups = param_groups(ee, settings)
    new = [g for g in groups if g["lr"] == 1e-3]
    assert len(new) == 1 and new[0]["weight_decay"] == 0.0
    new_ids = {id(p) for p in new[0]["params"]}
    assert new_ids == {id(p) for h in ee.heads[:-1] for p in h.parameters()}
    assert not new_ids & {id(p) for p in ee.heads[-1].parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(ee.parameters()))


def test_intermediate_exits_read_the_mean_of_the_real_tokens():
    """Exits 1..L-1 pool the real tokens (padding does not move them); the last exit is the model's
    own CLS head."""
    ee = EarlyExitModel(tiny_model("bert", layers=3)).eval()
    ids = torch.randint(5, 90, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 5)], dim=1).long()
    with torch.no_grad():
        plain = ee(input_ids=ids, attention_mask=torch.ones_like(ids)).exit_logits
        pad = ee(input_ids=padded, attention_mask=mask).exit_logits
        hidden, attn = ee._embed({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        first = ee._layer(0, hidden, attn)  # (1, 9, H)
        head = ee.heads[0]
        want = head.classifier(head.pooler(first.mean(1, keepdim=True)))  # the pooler reads position 0
    torch.testing.assert_close(pad, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain[0], want, atol=1e-5, rtol=0)
    assert not ee.heads[-1].mean_pool


def _pruned_tiny():
    """A tiny BERT physically pruned to uneven layers, one of them removed, and its structure."""
    from dynprune.eval.physical import physically_prune
    from dynprune.eval.structure import Structure

    model = tiny_model("bert", layers=4, num_labels=3)
    fm = static_flops_model(model)
    ffn = fm.ffn_dim
    structure = Structure.from_indices(
        heads=[[0, 1], [], [1], [0, 1]],
        neurons=[list(range(ffn // 2)), [], list(range(0, ffn, 3)), list(range(5))],
        layers=[True, False, True, True],
    )
    pruned = physically_prune(model, structure.heads, structure.neurons, structure.layers)
    return pruned, structure, fm


def test_exits_on_a_pruned_model_cost_its_kept_units():
    pruned, structure, fm = _pruned_tiny()
    ee = EarlyExitModel(pruned, structure).eval()
    assert ee.n_exits == 3  # one exit per kept layer
    batch = tiny_batch(batch=6, seq=11, padded=False)
    with torch.no_grad():
        want = pruned(**batch).logits
    res = ee.infer(batch, float("inf"), fm)  # every row runs the whole pruned model
    torch.testing.assert_close(res.logits, want, rtol=1e-5, atol=1e-5)
    # the last exit costs what the pruned model costs, plus the two earlier exit heads
    assert res.flops[0].item() == pytest.approx(structure.flops(fm, 11) + 2 * fm.task_head(11))
    conf = _confidences(ee, batch)
    threshold = float(np.median(conf[:-1]))
    expect = exits_at(conf, threshold)
    assert len(set(expect.tolist())) > 1
    res = ee.infer(batch, threshold, fm)
    assert res.flops.numpy() == pytest.approx(ee.exit_costs(fm, 11)[expect - 1])
    assert _counted(lambda: ee.infer(batch, threshold, fm)) == pytest.approx(float(res.flops.sum()), rel=1e-6)


def test_a_structure_that_does_not_fit_the_model_is_refused():
    _, structure, _ = _pruned_tiny()
    with pytest.raises(ValueError, match="keeps 3 layers, the model has 4"):
        EarlyExitModel(tiny_model("bert", layers=4, num_labels=3), structure)
