"""The measured cost model behind millisecond budgets (dynprune/cost_model.py): fit, table,
selection priced in ms, TimeBudget, and the errors. Synthetic timings only: no timing here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dynprune
from dynprune.budget import TimeBudget, budget_spec, parse_budget
from dynprune.cost_model import (
    CostTable,
    IncompatibleCostTableError,
    LayerTiming,
    MissingCostTableError,
    SeqCosts,
    fit_fixed,
    fit_layers,
    model_signature,
)
from dynprune.gates import GateScores, nested_logits, select_under_budget
from tests.helpers import tiny_batch, tiny_model

SIG = {
    "model_type": "bert",
    "n_layers": 3,
    "n_heads": 4,
    "head_dim": 16,
    "hidden": 64,
    "ffn_dim": 128,
    "ffn_slice_size": 32,
    "router_layer": 0,
}


def table(
    head: float = 0.03, slc: float = 0.05, layer: float = 0.1, fixed: float = 1.0, **model
) -> CostTable:
    points = (SeqCosts(8, fixed, layer, head, slc), SeqCosts(32, 2 * fixed, 2 * layer, 4 * head, 4 * slc))
    return CostTable({**SIG, **model}, points, {"cpu": "test cpu", "threads": "2"})


# -- fit ---------------------------------------------------------------------------------------------
def synthetic(base=0.2, layer=0.3, head=0.05, slc=0.08, noise=0.0, seed=0) -> list[LayerTiming]:
    rng = np.random.default_rng(seed)
    out = [LayerTiming(0, 0, 0, base)]
    for kept in (3, 6):
        for h in (0, 4, 8, 12):
            for s in (0, 6, 12):
                ms = base + layer * kept + head * kept * h + slc * kept * s
                out.append(LayerTiming(kept, kept * h, kept * s, ms * (1 + noise * rng.standard_normal())))
    return out


def test_fit_recovers_coefficients_exactly():
    base, layer, head, slc, rmse = fit_layers(synthetic())
    assert (base, layer, head, slc) == pytest.approx((0.2, 0.3, 0.05, 0.08), rel=1e-9)
    assert rmse == pytest.approx(0.0, abs=1e-9)


def test_fit_on_noisy_timings_is_close():
    _, _, head, slc, rmse = fit_layers(synthetic(noise=0.03, seed=1))
    assert head == pytest.approx(0.05, rel=0.1) and slc == pytest.approx(0.08, rel=0.1)
    assert rmse > 0


def test_fit_refuses_what_it_cannot_determine():
    with pytest.raises(ValueError, match="at least 4"):
        fit_layers(synthetic()[:3])
    same_ratio = [LayerTiming(6, 6 * h, 6 * h, 1.0 + h) for h in range(5)] + [LayerTiming(0, 0, 0, 0.1)]
    with pytest.raises(ValueError, match="do not separate"):
        fit_layers(same_ratio)
    flat = [LayerTiming(t.kept_layers, t.heads, t.slices, 1.0) for t in synthetic()]
    with pytest.raises(ValueError, match="did not grow"):
        fit_layers(flat)


def test_fit_fixed_is_the_median_residual_and_refuses_mismatch():
    assert fit_fixed([5.0, 6.0, 9.0], [3.0, 4.0, 4.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        fit_fixed([1.0], [])


# -- the table ---------------------------------------------------------------------------------------
def test_table_interpolates_holds_and_extrapolates():
    t = table()
    assert t.head_cost(8) == pytest.approx(0.03) and t.head_cost(32) == pytest.approx(0.12)
    assert t.head_cost(20) == pytest.approx(0.075)  # halfway
    assert t.head_cost(2) == pytest.approx(0.03)  # held below the shortest
    assert t.head_cost(56) == pytest.approx(0.21)  # the last segment extended
    assert t.fixed(20) == pytest.approx(1.5) and t.layer_overhead(20) == pytest.approx(0.15)
    assert (t.n_gated_layers, t.n_heads, t.n_slices) == (3, 4, 4)
    assert t.dense(8) == pytest.approx(1.0 + 3 * (0.1 + 4 * 0.03 + 4 * 0.05))


def test_table_predicts_masks():
    t = table()
    m = dynprune.UnitMasks.full(2, 3, 4, 4)
    m.layer[1, 0] = False
    m.head[0, 1, 2:] = False
    pred = t.predict(m.canonical(), 8)
    assert pred[0] == pytest.approx(t.dense(8) - 2 * 0.03)
    assert pred[1] == pytest.approx(t.dense(8) - (0.1 + 4 * 0.03 + 4 * 0.05))


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: SeqCosts(0, 1.0, 0.1, 0.1, 0.1), "seq"),
        (lambda: SeqCosts(8, math.nan, 0.1, 0.1, 0.1), "fixed_ms"),
        (lambda: SeqCosts(8, 1.0, -0.1, 0.1, 0.1), "layer_ms"),
        (lambda: SeqCosts(8, 1.0, 0.1, 0.0, 0.1), "head_ms"),
        (lambda: SeqCosts(8, 1.0, 0.1, 0.1, math.inf), "slice_ms"),
        (lambda: CostTable(SIG, ()), "non-empty"),
        (lambda: CostTable({"n_layers": 3}, (SeqCosts(8, 1, 0, 1, 1),)), "lacks"),
        (lambda: CostTable(SIG, (SeqCosts(8, 1, 0, 1, 1), SeqCosts(8, 1, 0, 1, 1))), "increasing"),
        (lambda: CostTable(SIG, (SeqCosts(8, 1, 0, 1, 1),), batch=16), "batch"),
        (lambda: LayerTiming(-1, 0, 0, 1.0), "kept_layers"),
        (lambda: LayerTiming(1, 0, 0, math.nan), "ms"),
    ],
)
def test_bad_tables_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_json_round_trip_and_foreign_files(tmp_path):
    t = table()
    path = t.save(tmp_path)
    assert path.name == "cost_table.json"
    assert CostTable.load(tmp_path) == t
    (tmp_path / "other.json").write_text('{"kind": "something else", "format": 1}')
    with pytest.raises(ValueError, match="not a dynprune cost table"):
        CostTable.load(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text('{"kind": "dynprune-cost-table", "format": 1}')
    with pytest.raises(ValueError, match="not a readable"):
        CostTable.load(tmp_path / "broken.json")


# -- selection priced in ms (the one select_under_budget) --------------------------------------------
def scores(batch=4, layers=3, heads=4, slices=4, seed=0, layer_logit=None) -> GateScores:
    g = torch.Generator().manual_seed(seed)
    head = nested_logits(torch.randn(batch, layers, heads, generator=g), 1.0)
    ffn = nested_logits(torch.randn(batch, layers, slices, generator=g), 1.0)
    layer = torch.randn(batch, layers, generator=g).abs() + 0.5 if layer_logit is None else layer_logit
    return GateScores(head, ffn, layer)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ms", [0.2, 0.5, 1.0, 2.0])
def test_selection_stays_within_the_ms_budget_by_the_tables_prediction(seed, ms):
    t, seq = table(), 20
    s = scores(seed=seed)
    avail = torch.full((4,), ms, dtype=torch.float64)
    m = select_under_budget(s, avail, t, seq, overhead=t.layer_overhead(seq))
    spent = t.predict(m, seq) - t.fixed(seq)
    assert bool((spent <= avail * (1 + 1e-9)).all())
    # and it fills the budget to within one unit (every layer kept here: all logits > 0)
    if ms < 3 * t.layer_overhead(seq):
        return
    assert bool((avail - spent < t.slice_cost(seq) + 1e-9).all() | (m.head.all() & m.ffn.all()))


def test_selection_prefers_the_cheaper_unit_per_benefit():
    equal = torch.full((1, 3, 4), 2.0)
    s = GateScores(equal.clone(), equal.clone(), torch.ones(1, 3))
    avail = torch.tensor([1.2], dtype=torch.float64)
    cheap_slices = table(head=0.1, slc=0.05, layer=0.0)
    m = select_under_budget(s, avail, cheap_slices, 8)
    assert int(m.ffn.sum()) == 12 and int(m.head.sum()) == 6  # every slice first (0.6 ms), then heads
    cheap_heads = table(head=0.05, slc=0.1, layer=0.0)
    m = select_under_budget(s, avail, cheap_heads, 8)
    assert int(m.head.sum()) == 12 and int(m.ffn.sum()) == 6


def test_layer_overhead_is_compulsory_and_drops_the_lowest_scored_layers():
    t = table(layer=0.4)
    s = scores(batch=1, layer_logit=torch.tensor([[3.0, 1.0, 2.0]]))
    m = select_under_budget(s, torch.tensor([0.9], dtype=torch.float64), t, 8, overhead=0.4)
    assert m.layer.tolist() == [[True, False, True]]  # two overheads fit, the lowest-scored layer goes
    spent = t.predict(m, 8) - t.fixed(8)
    assert float(spent) <= 0.9 + 1e-9


# -- TimeBudget and the user surface ------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, True, "4", None])
def test_time_budget_validates(bad):
    with pytest.raises(ValueError, match="milliseconds"):
        TimeBudget(bad)


def test_parse_time_budget():
    assert parse_budget("ms:4") == TimeBudget(4.0)
    assert parse_budget(" MS:2.5 ") == TimeBudget(2.5)
    assert budget_spec(TimeBudget(4)) == "ms:4"
    for bad in ("ms:", "ms:x", "ms:0", "ms:-1", "ms:nan"):
        with pytest.raises(ValueError):
            parse_budget(bad)


def gated_tiny():
    model = tiny_model(layers=3, heads=4, hidden=64, ffn=128)
    return dynprune.wrap(model, dynprune.GateConfig(ffn_slice_size=32)).eval()


@pytest.mark.filterwarnings("ignore:dynprune. this cost table")
def test_forward_under_a_ms_budget_stays_within_it():
    gated = gated_tiny()
    gated.cost_table = table()
    batch = tiny_batch(batch=3, seq=20, padded=False)
    t = gated.cost_table
    for ms in (1.8, 2.5, 3.5):
        with torch.inference_mode(), dynprune.exec.reference_path(gated):
            gated(**batch, budget=TimeBudget(ms))
        info = gated.last
        assert bool((t.predict(info.masks, 20) <= ms * (1 + 1e-9)).all())
        assert bool((info.flops_ratio < 1).all())
    with torch.inference_mode(), dynprune.exec.reference_path(gated):
        gated(**batch, budget=TimeBudget(t.dense(20) + 1))  # more than dense takes: runs dense
    assert bool((gated.last.flops_ratio == 1).all())
    with pytest.raises(ValueError, match="below the smallest"):
        gated(**batch, budget=TimeBudget(0.5 * t.fixed(20)))


@pytest.mark.filterwarnings("ignore:dynprune. this cost table")
def test_ms_budget_without_a_table_or_with_another_models_table_is_refused():
    gated = gated_tiny()
    batch = tiny_batch(batch=1, seq=8)
    with pytest.raises(MissingCostTableError, match="dynprune bench calibrate"):
        gated(**batch, budget=TimeBudget(3.0))
    gated.cost_table = table(n_heads=12)
    with pytest.raises(IncompatibleCostTableError, match="n_heads: table 12 vs model 4"):
        gated(**batch, budget=TimeBudget(3.0))
    gated.cost_table = table()
    gated.train()
    with pytest.raises(ValueError, match="eval mode"):
        gated(**batch, budget=TimeBudget(3.0))


def test_table_saved_and_loaded_with_the_gates(tmp_path):
    gated = gated_tiny()
    assert model_signature(gated) == SIG
    gated.cost_table = table()
    dynprune.save_gates(gated, tmp_path)
    assert (tmp_path / "cost_table.json").is_file()
    loaded = dynprune.load_gates(tiny_model(layers=3, heads=4, hidden=64, ffn=128), tmp_path)
    assert loaded.cost_table == table()
    (tmp_path / "cost_table.json").unlink()
    assert dynprune.load_gates(tiny_model(layers=3, heads=4, hidden=64, ffn=128), tmp_path).cost_table is None


def test_a_table_from_another_machine_warns():
    gated = gated_tiny()
    gated.cost_table = table()  # measured on "test cpu"
    with pytest.warns(UserWarning, match="another CPU") as caught, torch.inference_mode():
        out = gated(**tiny_batch(batch=1, seq=8), budget=TimeBudget(3.0))
    assert out.logits.shape[0] == 1  # the forward still ran, under the table it was given
    assert any("another CPU" in str(w.message) for w in caught)


def test_time_budget_router_input():
    assert parse_budget("ms:4,router:0.25") == TimeBudget(4.0, router=0.25)
    assert budget_spec(TimeBudget(4, router=0.25)) == "ms:4,router:0.25"
    for bad in (0.0, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"TimeBudget\.router"):
            TimeBudget(4.0, router=bad)
    with pytest.raises(ValueError, match=r"ms:4,router:0\.25"):
        parse_budget("ms:4,router:x")


@pytest.mark.filterwarnings("ignore:dynprune. this cost table")
def test_router_input_of_a_time_budget_changes_what_the_router_reads_not_the_bound():
    gated = gated_tiny()
    gated.cost_table = t = table()
    batch = tiny_batch(batch=2, seq=20, padded=False)
    seen = []
    original = gated.router.forward
    gated.router.forward = lambda h, m, b: (seen.append(b.clone()), original(h, m, b))[1]
    with torch.inference_mode(), dynprune.exec.reference_path(gated):
        gated(**batch, budget=TimeBudget(2.5, router=0.3))
        assert bool((t.predict(gated.last.masks, 20) <= 2.5 * (1 + 1e-9)).all())
        gated(**batch, budget=TimeBudget(2.5))
    assert torch.allclose(seen[0].double(), torch.full((2,), 0.3, dtype=torch.float64))
    assert not torch.allclose(seen[1].double(), seen[0].double())


def test_eval_cli_takes_ms_budgets_outside_the_flops_range_check():
    from dynprune.eval.cli import check_budgets

    got = check_budgets(["0.5", "ms:5"], {"gate": {"budget_min": 0.2, "budget_max": 0.8}}, False)
    assert got == [0.5, TimeBudget(5.0)]
