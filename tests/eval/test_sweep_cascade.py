"""static_cascade_ft's runner: two physically pruned models as one cascade (no sweep needed)."""

import pytest
import torch
from dynprune.eval.runners import StructureRunner
from dynprune.eval.structure import Structure, static_flops_model
from dynprune.eval.sweep_cascade import ExportCascadeRunner

from dynprune.governor import MeanGovernor
from tests.helpers import tiny_batch, tiny_model


def _runners():
    torch.manual_seed(0)
    dense = tiny_model("bert", layers=2, num_labels=3).eval()
    fm = static_flops_model(dense)
    full = Structure.full(fm.n_layers, fm.n_heads, fm.ffn_dim)
    low = StructureRunner(tiny_model("bert", layers=2, num_labels=3).eval(), full, fm, "low")
    high = StructureRunner(dense, full, fm, "high")
    return low, high, fm


def _batch(seed=0):
    b = tiny_batch(batch=6, seq=9, seed=seed)
    b["labels"] = torch.arange(6) % 3
    return b


@torch.inference_mode()
def test_the_confidence_decides_which_inputs_the_second_model_answers_and_both_passes_count():
    low, high, _ = _runners()
    batch = _batch()
    lo_logits, hi_logits = low(batch), high(batch)
    one = float(low.last_flops[0])
    conf = lo_logits.softmax(-1).amax(-1)
    c = float(conf.median())  # about half the inputs re-run
    runner = ExportCascadeRunner(low, high, c, None)
    out = runner(batch)
    rerun = conf < c
    assert 0 < int(rerun.sum()) < 6
    torch.testing.assert_close(out[rerun], hi_logits[rerun])  # the re-run inputs: the high model's answer
    torch.testing.assert_close(out[~rerun], lo_logits[~rerun])  # the rest keep the low model's
    expected = torch.where(rerun, 2 * one, one).double()
    torch.testing.assert_close(runner.last_flops, expected)
    assert runner.rerun[0].tolist() == rerun.tolist()
    none = ExportCascadeRunner(low, high, 0.0, None)
    torch.testing.assert_close(none(batch), lo_logits)
    assert none.rerun[0].sum() == 0
    every = ExportCascadeRunner(low, high, 2.0, None)
    torch.testing.assert_close(every(batch), hi_logits)
    assert torch.equal(every.last_flops, torch.full((6,), 2 * one, dtype=torch.float64))


@torch.inference_mode()
def test_a_governed_cascade_tells_its_governor_what_each_batch_spent_until_evaluation_ends():
    low, high, fm = _runners()
    dense = fm.dense(9)
    seen = []

    def solve(aim):  # any monotone curve: confidence in [0, 1] for the aims in the bounds
        return min(max(aim, 0.0), 1.0), aim

    gov = MeanGovernor(0.9, solve, (0.0, 2.0), prior=1)
    runner = ExportCascadeRunner(low, high, 0.5, gov)
    for s in range(4):
        knob = gov.knob
        runner(_batch(s))
        conf = low(_batch(s)).softmax(-1).amax(-1)
        assert runner.rerun[-1].tolist() == (conf < knob).tolist()  # it ran at the governor's knob
        seen.append(runner.last_flops / dense)
    assert gov.seen == 24
    assert gov.mean_spent == pytest.approx(float(torch.cat(seen).mean()))
    runner.end_evaluation()
    frozen = gov.knob
    runner(_batch(9))
    assert gov.knob == frozen and gov.seen == 24 and len(runner.rerun) == 4


def test_a_static_gates_export_at_budget_one_is_the_static_controls_whole_backbone(tiny_run, tmp_path):
    """A cascade's second pass may be dense (budget 1): its export keeps every unit (a dense forward
    records no masks to freeze)."""
    from dynprune.eval import sweep as sweep_mod
    from dynprune.eval.sweep_context import TrainingRun, build_context
    from dynprune.eval.sweep_methods import load_static_export
    from dynprune.eval.sweep_static_gates import static_gates_export

    cfg, _ = sweep_mod.parse_args(
        [f"--training_dir={tiny_run}", f"--output_dir={tmp_path / 'out'}", f"--work_dir={tmp_path / 'w'}",
         "--evaluation.max_examples=8", "--timing.bs1_inputs=0", "--timing.bs16_batches=0", "--finetune.steps=1"]
    )  # fmt: skip
    ctx = build_context(cfg, TrainingRun.open(tiny_run))
    model, structure = load_static_export(static_gates_export(ctx, 1.0, 0))
    assert structure.flops(ctx.fm, 16) == pytest.approx(ctx.fm.dense(16))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ctx.dense.parameters())
