"""Mean budgets: parsing and validation, threshold selection (general and host path equal),
calibration on a tiny synthetic set (mean within 2 % of the target), caps per sample,
the cascade's FLOPs accounting, calibration saved/loaded, and the errors that say what to do."""

from __future__ import annotations

import pytest
import torch

import dynprune
from dynprune import GateConfig, MeanBudget, parse_budget
from dynprune.budget import ThresholdRoute
from dynprune.calibration import CalibrationEntry, CascadePolicy, ThresholdPolicy
from dynprune.calibration_fit import fit
from dynprune.state import GateState
from tests.helpers import tiny_batch, tiny_model


def _diverse(gated, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gated.router.out.weight.copy_(torch.randn(gated.router.out.weight.shape, generator=g) * scale)
        gated.router.out.bias.copy_(torch.randn(gated.router.out.bias.shape, generator=g))
    return gated.eval()


def _gated(mode="mean", seed=0, **kw):
    cfg = GateConfig(ffn_slice_size=16, budget_mode=mode, **kw)
    return _diverse(dynprune.wrap(tiny_model("bert", layers=4, seed=seed), cfg), seed)


def _batches(n=4, batch=16, seed=0):
    out = []
    for s in range(n):
        b = tiny_batch(batch=batch, seq=12 + 3 * s, seed=seed * 10 + s, padded=True)
        b["labels"] = torch.randint(0, 2, (batch,), generator=torch.Generator().manual_seed(s))
        b["index"] = torch.arange(s * batch, (s + 1) * batch)
        out.append(b)
    return out


def _inputs(b):
    return {k: b[k] for k in ("input_ids", "attention_mask")}


def _ratios(gated, batches, budget):
    out = []
    with torch.no_grad():
        for b in batches:
            gated(**_inputs(b), budget=budget)
            out.append(gated.last.flops_ratio)
    return torch.cat(out)


# -- parsing and validation -------------------------------------------------------------------------
def test_parse_budget_forms():
    assert parse_budget("0.5") == 0.5 and parse_budget(0.25) == 0.25
    assert parse_budget("mean:0.25") == MeanBudget(0.25)
    assert parse_budget(" MEAN:0.25,cap:0.6 ") == MeanBudget(0.25, 0.6)
    assert MeanBudget(0.25, 0.6).spec == "mean:0.25,cap:0.6" and str(MeanBudget(0.5)) == "mean:0.5"
    assert parse_budget(MeanBudget(0.3, 0.9).spec) == MeanBudget(0.3, 0.9)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("mean:0", r"MeanBudget.target must be a fraction of dense FLOPs in \(0, 1\]"),
        ("mean:1.5", r"MeanBudget.target must be a fraction"),
        ("mean:0.25,cap:0", r"MeanBudget.cap must be a fraction"),
        ("mean:0.5,cap:0.3", r"must be >= the mean target"),
        ("mean:abc", "mean must be a number"),
        ("mean:0.2,cup:0.5", "must look like 'mean:0.25'"),
        ("cap:0.5", "neither a number"),
        ("fast", "neither a number"),
        ("1.2", r"in \(0, 1\]"),
    ],
)
def test_bad_budgets_say_what_is_wrong(text, match):
    with pytest.raises(ValueError, match=match):
        parse_budget(text)


def test_mean_budget_is_frozen_and_validated_directly():
    with pytest.raises(ValueError, match="target"):
        MeanBudget(float("nan"))
    b = MeanBudget(0.25)
    with pytest.raises(AttributeError):
        b.target = 0.5  # type: ignore[misc]


# -- selection -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw", [{}, {"nested": False}, {"layers": False}, {"heads": False}, {"ffn": False}], ids=str
)
@pytest.mark.parametrize("cap", [None, 0.45])
def test_threshold_route_keeps_only_units_above_it_under_the_cap(kw, cap):
    gated = _gated(**kw)
    b = _batches(1, batch=9)[0]
    threshold = 1.5
    with torch.no_grad():
        gated(**_inputs(b), budget=ThresholdRoute(0.4, threshold=threshold, cap=cap))
    info = gated.last
    s, m = info.scores, info.masks
    layer = m.layer[..., None]  # (B, L, 1): units of skipped layers do not count
    for kind in ("head", "ffn"):
        logits = getattr(s, kind)
        if logits is None:
            continue
        kept, eligible = getattr(m, kind) & layer, (logits > threshold) & layer
        assert not bool((kept & ~eligible).any())  # nothing at or below the threshold is kept
        if cap is None:  # no cap: every eligible unit of a kept layer is kept
            assert torch.equal(kept, eligible)
    if s.layer is not None and cap is None:
        assert torch.equal(m.layer, s.layer > threshold)
    if cap is not None:
        assert bool((info.flops <= cap * info.dense_flops * (1 + 1e-9)).all())


def test_threshold_keeps_exactly_the_units_above_it_and_inputs_differ():
    gated = _gated(heads=True, layers=False)
    b = _batches(1)[0]
    with torch.no_grad():
        gated(**_inputs(b), budget=ThresholdRoute(0.5, threshold=2.0))
    info = gated.last
    assert torch.equal(info.masks.head, info.scores.head > 2.0)
    assert torch.equal(info.masks.ffn, info.scores.ffn > 2.0)
    assert info.flops_ratio.std() > 0  # different inputs, different compute


# -- calibration ------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_threshold_calibration_hits_the_mean_within_two_percent(target):
    gated = _gated()
    batches = _batches(6)
    budget = MeanBudget(target)
    gated.calibration.add(fit(gated, batches, budget))
    r = _ratios(gated, batches, budget)
    assert abs(float(r.mean()) - target) <= 0.02 * target
    assert float(r.max()) > target > float(r.min())  # a mean, not a cap


def test_cap_is_respected_per_sample_with_a_mean_target():
    gated = _gated()
    batches = _batches(6)
    free, capped = MeanBudget(0.4), MeanBudget(0.4, cap=0.45)
    for b in (free, capped):
        gated.calibration.add(fit(gated, batches, b))
    assert float(_ratios(gated, batches, free).max()) > 0.45  # without the cap some inputs spend more
    r = _ratios(gated, batches, capped)
    assert float(r.max()) <= 0.45 * (1 + 1e-9)
    assert abs(float(r.mean()) - 0.4) <= 0.02 * 0.4


def test_cascade_counts_both_passes_and_hits_the_mean():
    gated = _gated(mode="cap")
    batches = _batches(6)
    budget = MeanBudget(0.4)
    entry = fit(gated, batches, budget, trained=(0.2, 0.9))
    assert isinstance(entry.policy, CascadePolicy)
    gated.calibration.add(entry)
    r = _ratios(gated, batches, budget)
    assert abs(float(r.mean()) - 0.4) <= 0.02 * 0.4
    pol = entry.policy
    b = batches[0]
    with torch.no_grad():
        out = gated(**_inputs(b), budget=budget)
        info = gated.last
        lo_out = gated(**_inputs(b), budget=pol.low)
        lo = gated.last.flops.clone()
        hi_out = gated(**_inputs(b), budget=pol.high)
        hi = gated.last.flops.clone()
    rerun = lo_out.logits.softmax(-1).amax(-1) < pol.confidence
    torch.testing.assert_close(info.flops, lo + torch.where(rerun, hi, torch.zeros_like(hi)))
    assert torch.equal(info.passes, 1 + rerun.long())
    torch.testing.assert_close(out.logits, torch.where(rerun[:, None], hi_out.logits, lo_out.logits))


def test_cascade_fits_sharing_a_pass_cache_equal_separate_fits():
    from dynprune.calibration_fit import cascade_candidates

    gated = _gated(mode="cap")
    batches = _batches(4)
    cache: dict = {}
    targets = (0.3, 0.5)
    shared = [fit(gated, batches, MeanBudget(t), trained=(0.2, 0.9), passes=cache) for t in targets]
    alone = [fit(gated, batches, MeanBudget(t), trained=(0.2, 0.9)) for t in targets]
    assert [e.policy for e in shared] == [e.policy for e in alone]
    assert [e.fitted for e in shared] == [e.fitted for e in alone]
    wanted = set()
    for t in targets:
        lows, highs = cascade_candidates(MeanBudget(t), (0.2, 0.9))
        wanted |= set(lows) | set(highs)
    assert set(cache) == wanted  # every candidate budget ran once, for both targets


def test_cascade_with_a_cap_keeps_both_passes_under_it():
    gated = _gated(mode="cap")
    batches = _batches(4)
    budget = MeanBudget(0.4, cap=0.8)
    entry = fit(gated, batches, budget, trained=(0.2, 0.9))
    assert entry.policy.low + entry.policy.high <= 0.8 + 1e-9
    gated.calibration.add(entry)
    assert float(_ratios(gated, batches, budget).max()) <= 0.8 * (1 + 1e-9)


def test_calibration_saved_and_loaded_with_the_gates(tmp_path):
    gated = _gated()
    gated.calibration.add(CalibrationEntry(MeanBudget(0.25), ThresholdPolicy(1.25), {"n": 3}))
    gated.calibration.add(CalibrationEntry(MeanBudget(0.5, 0.7), CascadePolicy(0.3, 0.6, 0.8), {}))
    dynprune.save_gates(gated, tmp_path / "g")
    loaded = dynprune.load_gates(tiny_model("bert", layers=4), tmp_path / "g")
    assert loaded.calibration == gated.calibration
    assert loaded.calibration.lookup(MeanBudget(0.5, 0.7)).policy == CascadePolicy(0.3, 0.6, 0.8)
    (tmp_path / "g" / "calibration.json").write_text('{"format": 1, "entries": {"mean:0.3": {}}}')
    with pytest.raises(ValueError, match=r"not a valid calibration.*dynprune calibrate"):
        dynprune.load_gates(tiny_model("bert", layers=4), tmp_path / "g")


def test_missing_calibration_says_how_to_make_one():
    gated = _gated()
    b = _batches(1)[0]
    with pytest.raises(
        dynprune.MissingCalibrationError, match=r"dynprune calibrate --checkpoint DIR --target 0.3 --cap 0.5"
    ):
        gated(**_inputs(b), budget=MeanBudget(0.3, 0.5))


def test_threshold_policy_on_a_cap_trained_checkpoint_is_refused():
    gated = _gated(mode="cap")
    gated.calibration.add(CalibrationEntry(MeanBudget(0.3), ThresholdPolicy(0.0)))
    with pytest.raises(dynprune.BudgetModeError, match="budget_mode=mean"):
        gated(**_inputs(_batches(1)[0]), budget=MeanBudget(0.3))


def test_mean_budget_one_is_dense():
    gated = _gated()
    b = _batches(1)[0]
    with torch.no_grad():
        gated(**_inputs(b), budget=MeanBudget(1.0))
    assert gated.last.masks is None and bool((gated.last.flops_ratio == 1).all())


def test_state_defaults_keep_cap_semantics():
    s = GateState()
    caps = torch.tensor([0.5, 1.0], dtype=torch.float64)
    s.begin(caps, None, None, gathered=False, backend="torch")
    assert s.router_budget is caps and s.threshold is None


@pytest.mark.parametrize("mode", ["mean", "cap"])
def test_mean_budgets_give_the_same_outputs_on_the_masked_and_gathered_paths(mode):
    from dynprune.train.evaluation import collect

    gated = _gated(mode=mode)
    batches = _batches(3)
    budget = MeanBudget(0.4)
    gated.calibration.add(fit(gated, batches, budget, trained=(0.2, 0.9)))
    gathered = collect(gated, batches, budget=budget, execution="gathered", keep_masks=True)
    masked = collect(gated, batches, budget=budget, execution="masked", keep_masks=True)
    assert (gathered.flops == masked.flops).all() and (gathered.head == masked.head).all()
    assert abs(gathered.probs - masked.probs).max() < 1e-5
    assert gathered.budget == "mean:0.4"
