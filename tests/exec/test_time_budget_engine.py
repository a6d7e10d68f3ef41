"""A millisecond budget (TimeBudget) on the batch-1 whole-forward session equals the PyTorch
gathered path: same units, outputs to atol 1e-5, for dynamic and static routers (whose repeated
counts run on sliced sessions); calls the session cannot price exactly go to the usual path."""

import pytest
import torch

pytest.importorskip("onnxruntime")

from dynprune.eval.timing import runtime_env

import dynprune
from dynprune import GateConfig, TimeBudget
from dynprune.cost_model import CostTable, SeqCosts, model_signature
from dynprune.exec import current_engine, reference_path
from tests.helpers import tiny_batch, tiny_model


def _gated(router: str, layer_ms: float = 0.05):
    gated = dynprune.wrap(tiny_model("bert", layers=3), GateConfig(ffn_slice_size=16, router=router)).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in gated.router.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    points = (SeqCosts(4, 1.0, layer_ms, 0.02, 0.03), SeqCosts(32, 1.5, 2 * layer_ms, 0.06, 0.08))
    machine = {"cpu": runtime_env()["cpu"], "threads": str(torch.get_num_threads())}
    gated.cost_table = CostTable(model_signature(gated), points, machine)
    return gated


def _whole_calls(gated):
    engine = current_engine(gated)
    return 0 if engine is None or engine._whole is None else engine._whole.calls


@pytest.mark.parametrize("router", ["dynamic", "static"])
def test_ms_budget_on_the_whole_session_equals_reference(router):
    gated = _gated(router)
    ran_whole = 0
    for seed, ms in enumerate((1.3, 1.6, 2.2)):
        for seq in (5, 17):
            batch = tiny_batch(batch=1, seq=seq, seed=seed, padded=False)
            for _ in range(3):  # a static router's counts met again run on a sliced session
                before = _whole_calls(gated)
                with torch.inference_mode():
                    fast = gated(**batch, budget=TimeBudget(ms)).logits
                fast_info = gated.last
                ran_whole += _whole_calls(gated) - before
                with torch.inference_mode(), reference_path(gated):
                    ref = gated(**batch, budget=TimeBudget(ms)).logits
                ref_info = gated.last
                torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
                torch.testing.assert_close(fast_info.flops, ref_info.flops)
                if ref_info.masks is not None:  # None: the budget holds the dense forward
                    assert bool((gated.cost_table.predict(ref_info.masks, seq) <= ms * (1 + 1e-9)).all())
    assert ran_whole > 0, "the whole-forward session never ran a ms budget"
    if router == "static":
        assert current_engine(gated)._whole.sliced_calls > 0


def test_layers_whose_overheads_do_not_fit_take_the_usual_path():
    gated = _gated("dynamic", layer_ms=0.4)  # three layers' overheads: 1.2 ms
    batch = tiny_batch(batch=1, seq=8, seed=0, padded=False)
    with torch.inference_mode():
        fast = gated(**batch, budget=TimeBudget(2.0)).logits  # 1.0 ms of fixed: 1.0 ms left
    assert not bool(gated.last.masks.layer.all())  # the usual path's selection dropped a layer
    with torch.inference_mode(), reference_path(gated):
        ref = gated(**batch, budget=TimeBudget(2.0)).logits
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


def test_a_static_routers_rejected_answer_is_remembered(monkeypatch):
    from dynprune.cost_model import WholeFeed

    gated = _gated("static")
    batch = tiny_batch(batch=1, seq=8, seed=0, padded=False)
    monkeypatch.setattr(WholeFeed, "accepts", lambda self, counts: False)  # always the usual path
    for expected_calls in (1, 1, 1):  # the session runs once; then the usual path straight away
        with torch.inference_mode():
            fast = gated(**batch, budget=TimeBudget(1.6)).logits
        assert _whole_calls(gated) == expected_calls
    with torch.inference_mode(), reference_path(gated):
        ref = gated(**batch, budget=TimeBudget(1.6)).logits
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
