"""The whole gated forward as one ONNX Runtime call (dynprune.exec.whole_graph) equals the PyTorch
gathered path at batch 1: outputs (atol 1e-5), the chosen units and the FLOPs; calls it does not run
go to the usual path."""

import contextlib

import pytest
import torch

pytest.importorskip("onnxruntime")

import dynprune
from dynprune import GateConfig
from dynprune.budget import MeanBudget, ThresholdRoute
from dynprune.exec import FastEncoder, current_engine, engine_override, reference_path
from tests.helpers import ENCODER_TYPES, minilm_gated, random_masks, tiny_batch, tiny_model

ATOL = 1e-5


def _gated(model_type="bert", router="dynamic", **cfg):
    model = tiny_model(model_type, layers=3)
    gated = dynprune.wrap(model, GateConfig(ffn_slice_size=16, router=router, **cfg)).eval()
    with torch.no_grad():  # a router whose choice differs per input and budget
        g = torch.Generator().manual_seed(5)
        for p in gated.router.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return gated


def _run(gated, batch, **kw):
    with torch.inference_mode():
        out = gated(**batch, **kw)
    return out, gated.last


def _calls(gated):
    engine = current_engine(gated)
    return 0 if engine is None or engine._whole is None else engine._whole.calls


def _assert_same(gated, batch, **kw):
    before = _calls(gated)
    fast, fast_info = _run(gated, batch, **kw)
    assert _calls(gated) == before + 1, "the whole-forward session did not run"
    with reference_path(gated):
        ref, ref_info = _run(gated, batch, **kw)
    torch.testing.assert_close(fast[0], ref[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(fast_info.flops, ref_info.flops)
    if ref_info.masks is None:
        assert fast_info.masks is None
    else:
        for kind in ("head", "ffn", "layer"):
            assert torch.equal(getattr(fast_info.masks, kind), getattr(ref_info.masks, kind)), kind


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
@pytest.mark.parametrize("router", ["dynamic", "static"])
def test_batch_one_equals_reference(model_type, router):
    gated = _gated(model_type, router)
    for seed, budget in enumerate((0.3, 0.6, 1.0)):
        for seq in (5, 17):  # one session for every length
            _assert_same(gated, tiny_batch(batch=1, seq=seq, seed=seed, padded=False), budget=budget)


def test_logit_ranking_is_exported_too():
    """GateConfig.unit_ranking='logit' in the exported selection: equal to the reference, and the
    choice differs from per-FLOP ranking's for some input (else the test could not fail)."""
    by_logit, by_flop = _gated(unit_ranking="logit"), _gated(unit_ranking="per_flop")
    differ = False
    for seed, budget in enumerate((0.3, 0.45, 0.6, 0.8)):
        batch = tiny_batch(batch=1, seq=9, seed=seed, padded=False)
        _assert_same(by_logit, batch, budget=budget)
        with reference_path(by_flop):
            _, flop_info = _run(by_flop, batch, budget=budget)
        differ |= not torch.equal(by_logit.last.masks.counts(), flop_info.masks.counts())
    assert differ


def test_padding_token_types_and_tuples():
    gated = _gated("bert")
    batch = tiny_batch(batch=1, seq=12, padded=False)
    batch["attention_mask"][0, 8:] = 0  # a padded single sample
    _assert_same(gated, batch, budget=0.4)
    _assert_same(gated, {**batch, "token_type_ids": torch.ones_like(batch["input_ids"])}, budget=0.4)
    _assert_same(gated, {**batch, "return_dict": False}, budget=0.4)
    _assert_same(gated, {"input_ids": batch["input_ids"]}, budget=0.4)  # no mask: every token counts


def test_counts_follow_the_router_input():
    """A dynamic router's units differ between inputs on the one session (counts are computed in it)."""
    gated = _gated("bert")
    seen = set()
    for seed in range(6):
        _assert_same(gated, tiny_batch(batch=1, seq=15, seed=seed, padded=False), budget=0.5)
        seen.add(tuple(gated.last.masks.counts().flatten().tolist()))
    assert len(seen) > 1


@pytest.mark.parametrize(
    "call",
    [
        dict(batch=2),
        dict(kw={"output_hidden_states": True}),
        dict(kw={"labels": torch.tensor([1])}),
        dict(kw={"masks": "random"}),
        dict(kw={"budget": ThresholdRoute(target=0.5, threshold=0.0)}),
    ],
    ids=["batch2", "hidden_states", "labels", "masks", "threshold"],
)
def test_calls_it_does_not_run_take_the_usual_path(call):
    gated = _gated("bert")
    batch = tiny_batch(batch=call.get("batch", 1), seq=9, padded=False)
    kw = dict(call.get("kw", {}))
    if kw.get("masks") == "random":
        kw["masks"] = random_masks(gated, 1, 0.5, seed=1, nested=True)
    kw.setdefault("budget", 0.5) if "masks" not in kw else None
    with torch.inference_mode():
        gated(**batch, **kw)
    assert _calls(gated) == 0


@pytest.mark.parametrize("cfg", [dict(router="random"), dict(router_layer=1)], ids=["random", "router_layer"])
def test_models_it_does_not_build_take_the_usual_path(cfg):
    """(The random router draws new logits at every call, and the router reading layer 1's output
    routes inside the engine's encoder: both keep the encoder-swap path.)"""
    gated = _gated("bert", **cfg)
    _run(gated, tiny_batch(batch=1, seq=9, padded=False), budget=0.5)
    assert current_engine(gated) is not None and _calls(gated) == 0


def test_training_mode_never_builds_it():
    gated = _gated("bert").train()
    gated(**tiny_batch(batch=1, seq=7, padded=False), budget=0.5)
    assert current_engine(gated) is None
    assert gated.training, "building the graph must not change the model's mode"


def test_eval_mode_is_kept_after_the_build():
    gated = _gated("bert")
    _assert_same(gated, tiny_batch(batch=1, seq=7, padded=False), budget=0.5)
    assert not gated.training and not gated.model.training


def test_new_weights_rebuild_the_session():
    gated = _gated("bert")
    batch = tiny_batch(batch=1, seq=11, padded=False)
    _assert_same(gated, batch, budget=0.5)
    first = current_engine(gated)._whole._session
    with torch.no_grad():
        gated.router.out.bias.add_(torch.linspace(-3, 3, gated.router.out.bias.numel()))
        gated.parts.parts[1].up.weight.mul_(1.5)
    _assert_same(gated, batch, budget=0.5)
    assert current_engine(gated)._whole._session is not first


def test_budget_below_the_minimum_is_the_same_error():
    gated = _gated("bert")
    batch = tiny_batch(batch=1, seq=7, padded=False)
    _run(gated, batch, budget=0.5)
    with pytest.raises(ValueError, match="below the smallest"):
        _run(gated, batch, budget=1e-4)
    with reference_path(gated), pytest.raises(ValueError, match="below the smallest"):
        _run(gated, batch, budget=1e-4)


def test_spendable_of_a_float_cap_is_the_tensor_answer():
    from dynprune.routing import spendable

    gated = _gated("bert")
    for cap in (0.3, 0.5, 1.0):
        assert spendable(gated, cap, 9) == pytest.approx(float(spendable(gated, torch.tensor([cap]), 9)[0]))
    errors = []
    for cap in (1e-4, torch.tensor([1e-4])):
        with pytest.raises(ValueError, match="below the smallest") as err:
            spendable(gated, cap, 9)
        errors.append(str(err.value))
    assert errors[0] == errors[1]


def test_last_is_built_on_its_first_read_not_in_the_forward():
    """The engine's batch-1 forward leaves the counts; GatedModel.last is built from them when read
    (its torch work slowed the next ORT call, results/cpu_bench/ENGINES.md), equal to the reference."""
    gated = _gated("bert")
    batch = tiny_batch(batch=1, seq=9, padded=False)
    with torch.inference_mode():
        gated(**batch, budget=0.4)
    assert callable(gated._last), "the forward built GatedModel.last itself"
    info = gated.last
    assert gated.last is info and not callable(gated._last)
    with reference_path(gated):
        _, ref = _run(gated, batch, budget=0.4)
    torch.testing.assert_close(info.flops, ref.flops)
    for kind in ("head", "ffn", "layer"):
        assert torch.equal(getattr(info.masks, kind), getattr(ref.masks, kind)), kind
    gated.last = None  # a plain value replaces a pending one
    assert gated.last is None


def test_mean_budget_without_calibration_is_refused_before_the_engine():
    gated = _gated("bert")
    with pytest.raises(ValueError, match="calibrat"):
        _run(gated, tiny_batch(batch=1, seq=7, padded=False), budget=MeanBudget(0.5))


@pytest.mark.real
def test_minilm_whole_forward_equals_reference(minilm_dir):
    gated, inputs = minilm_gated(minilm_dir, batch=2, padded_from=1)
    with engine_override(gated, FastEncoder(gated)):
        for row in (0, 1):  # unpadded, padded
            batch = {k: v[row : row + 1] for k, v in inputs.items()}
            for budget in (0.25, 0.5, 1.0):
                _assert_same(gated, batch, budget=budget)


def test_static_router_runs_sliced_sessions_for_counts_met_again():
    """A static router's counts depend on (budget, length) only: remembered from the If-tree session,
    a count vector met a second time runs on its own sliced session — equal outputs, units, FLOPs."""
    gated = _gated("bert", "static")
    batch = tiny_batch(batch=1, seq=13, padded=False)
    for _ in range(4):
        _assert_same(gated, batch, budget=0.5)
    whole = current_engine(gated)._whole
    assert whole.sliced_calls == 2 and len(whole._sliced) == 1  # forwards 3 and 4
    other = tiny_batch(batch=1, seq=13, seed=9, padded=False)  # same length: the same counts
    _assert_same(gated, other, budget=0.5)
    assert whole.sliced_calls == 3


@contextlib.contextmanager
def _static_engine_with_one_sliced_session():
    """(gated, its WholeForward allowed one sliced session, a batch-1 input) under the engine."""
    gated = _gated("bert", "static")
    engine = FastEncoder(gated)
    with engine_override(gated, engine):
        whole = engine.whole()
        whole.max_sliced = 1
        yield gated, whole, tiny_batch(batch=1, seq=9, padded=False)


def test_sliced_sessions_are_bounded_and_dropped_with_new_weights():
    with _static_engine_with_one_sliced_session() as (gated, whole, batch):
        for budget in (0.4, 0.4, 0.4, 0.7, 0.7, 0.7, 0.4, 0.4):
            _assert_same(gated, batch, budget=budget)
        assert len(whole._sliced) == 1
        with torch.no_grad():
            gated.router.out.bias.add_(0.5)
        _assert_same(gated, batch, budget=0.4)
        assert len(whole._sliced) == 0 and len(whole._static_counts) == 1  # rebuilt: one forward since


def test_sliced_sessions_are_not_rebuilt_per_call_when_count_vectors_outnumber_them():
    """Traffic alternating between more count vectors than sessions (mixed budgets at batch 1) keeps
    the sessions it has (the rest runs on the If-tree session); a vector met far more often than the
    least used session's takes its place."""
    with _static_engine_with_one_sliced_session() as (gated, whole, batch):
        for _ in range(6):
            for budget in (0.4, 0.7):
                _assert_same(gated, batch, budget=budget)
        assert whole.sliced_builds == 1 and whole.sliced_calls == 4  # 0.4's forwards 3 to 6
        for _ in range(7):  # 0.7 met 5 + 6 times > 2 x 0.4's 5 (the first forward routes)
            _assert_same(gated, batch, budget=0.7)
        assert whole.sliced_builds == 2 and len(whole._sliced) == 1


def test_dynamic_router_never_uses_sliced_sessions():
    gated = _gated("bert", "dynamic")
    batch = tiny_batch(batch=1, seq=9, padded=False)
    for _ in range(4):
        _assert_same(gated, batch, budget=0.5)
    assert current_engine(gated)._whole.sliced_calls == 0


def test_routing_timers_run_the_same_forward_with_and_without_routing():
    from dynprune.exec.whole_session import routing_timers

    gated = _gated("roberta", "dynamic")
    batch = tiny_batch(batch=1, seq=11, padded=False)
    _assert_same(gated, batch, budget=0.5)
    timers = routing_timers(current_engine(gated)._whole, batch, 0.5)
    routed, counts = timers["routed"]()
    fed = timers["fed"]()[0]
    np_close = torch.testing.assert_close
    np_close(torch.from_numpy(fed), torch.from_numpy(routed), atol=1e-6, rtol=0)
    assert tuple(counts.shape) == (1, 3, 3)
