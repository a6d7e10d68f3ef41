"""The ONNX Runtime engine (dynprune.exec) equals the PyTorch gathered path (the reference).

Tolerance (fp32): atol 1e-5 on logits; the engines differ in kernels and summation order only.
"""

import pytest
import torch

pytest.importorskip("onnxruntime")

import dynprune
from dynprune import GateConfig
from dynprune.exec import FastEncoder, current_engine, engine_override, reference_path
from tests.helpers import ENCODER_TYPES, minilm_gated, random_masks, tiny_batch, tiny_decoder, tiny_model

ATOL = 1e-5


def _both(gated, batch, **kw):
    outs = []
    for backend in ("torch", "onnxruntime"):
        with gated.running(backend=backend), torch.inference_mode():
            outs.append(gated(**batch, **kw).logits)
            outs.append(gated.last)
    return outs


def _shared(masks, batch):
    return dynprune.UnitMasks(
        masks.head[:1].expand(batch, -1, -1).clone(),
        masks.ffn[:1].expand(batch, -1, -1).clone(),
        masks.layer[:1].expand(batch, -1).clone(),
    )


@pytest.fixture(params=ENCODER_TYPES)
def gated(request):
    """A tiny gated encoder whose engine runs every batch (no ``max_tokens`` hand-off to PyTorch)."""
    model = dynprune.wrap(tiny_model(request.param, layers=4), GateConfig(ffn_slice_size=16)).eval()
    with engine_override(model, FastEncoder(model, max_tokens=None)):
        yield model


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("mode", ["shared", "different"])
def test_forced_masks_equal_reference(gated, mode, padded):
    batch = tiny_batch(batch=7, seq=19, padded=padded)
    masks = random_masks(gated, 7, 0.5, seed=3, nested=True, skip_layers=True)
    if mode == "shared":
        masks = _shared(masks, 7)
    ref, _, fast, _ = _both(gated, batch, masks=masks)
    assert current_engine(gated) is not None, "the ORT engine did not run"
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("budget", [1.0, 0.6, 0.3])
def test_router_budgets_equal_reference(gated, budget):
    batch = tiny_batch(batch=5, seq=13)
    ref, ref_info, fast, fast_info = _both(gated, batch, budget=budget)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(fast_info.flops, ref_info.flops)


@pytest.mark.parametrize("keep", [0.0, 1.0])
def test_empty_and_full_keep_sets(gated, keep):
    batch = tiny_batch(batch=1, seq=11, padded=False)
    masks = random_masks(gated, 1, keep, seed=1, skip_layers=False)
    ref, _, fast, _ = _both(gated, batch, masks=masks)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)


def test_router_layer_prefix_runs_dense():
    gated = dynprune.wrap(tiny_model("bert", layers=4), GateConfig(ffn_slice_size=16, router_layer=1)).eval()
    batch = tiny_batch(batch=4, seq=9)
    ref, ref_info, fast, fast_info = _both(gated, batch, budget=0.5)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)
    assert torch.equal(fast_info.masks.head, ref_info.masks.head)


def test_weights_changed_rebuilds_sessions(gated):
    batch = tiny_batch(batch=2, seq=7)
    masks = random_masks(gated, 2, 0.5, seed=2, nested=True)
    _both(gated, batch, masks=masks)
    with torch.no_grad():
        gated.parts.parts[0].up.weight.mul_(1.5)
    ref, _, fast, _ = _both(gated, batch, masks=masks)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)


def test_training_mode_does_not_use_engine():
    gated = dynprune.wrap(tiny_model("bert", layers=2), GateConfig(ffn_slice_size=16)).train()
    batch = tiny_batch(batch=2, seq=7)
    gated(**batch, budget=0.5)
    assert "_fast_encoder" not in gated.__dict__


def _without_onnxruntime(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )


def test_auto_backend_runs_engine_on_cpu_eval():
    gated = dynprune.wrap(tiny_model("bert", layers=2), GateConfig(ffn_slice_size=16)).eval()
    batch = tiny_batch(batch=2, seq=7)
    with torch.inference_mode():
        fast = gated(**batch, budget=0.5).logits
        with reference_path(gated):
            ref = gated(**batch, budget=0.5).logits
    assert current_engine(gated) is not None
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)


def test_auto_backend_without_extra_warns_and_runs_torch(monkeypatch):
    _without_onnxruntime(monkeypatch)
    gated = dynprune.wrap(tiny_model("bert", layers=2), GateConfig(ffn_slice_size=16)).eval()
    with pytest.warns(UserWarning, match=r"dynprune\[onnx\]"), torch.inference_mode():
        gated(**tiny_batch(batch=2, seq=7), budget=0.5)
    assert gated.__dict__["_fast_encoder"] == "onnxruntime is not installed (pip install 'dynprune[onnx]')"


def test_auto_backend_leaves_unsupported_models_to_torch():
    """A decoder (pre-LN) is not built by the engine: auto runs the PyTorch path, silently."""
    gated = dynprune.wrap(tiny_decoder("llama", layers=2), GateConfig(ffn_slice_size=16)).eval()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            gated(**tiny_batch(batch=2, seq=7), budget=0.5)
    assert current_engine(gated) is None and "the ORT engine supports" in gated.__dict__["_fast_encoder"]


def test_hidden_states_requests_run_torch_path(gated):
    batch = tiny_batch(batch=2, seq=7)
    with torch.inference_mode():
        out = gated(**batch, budget=0.5, output_hidden_states=True)
    assert out.hidden_states is not None and len(out.hidden_states) == 5


def test_explicit_backend_without_extra_is_an_error(monkeypatch):
    _without_onnxruntime(monkeypatch)
    gated = dynprune.wrap(tiny_model("bert", layers=2), GateConfig(ffn_slice_size=16, backend="onnxruntime"))
    with pytest.raises(RuntimeError, match=r"dynprune\[onnx\]"), torch.inference_mode():
        gated.eval()(**tiny_batch(batch=1, seq=5), budget=0.5)


def test_one_session_runs_every_count_vector(gated):
    """Different count vectors (and per-sample masks) run on the one session, built once."""
    engine = None
    for seed in range(3):
        batch = tiny_batch(batch=3, seq=9, padded=seed == 1)
        masks = random_masks(gated, 3, 0.4 + 0.2 * seed, seed=seed, nested=True, skip_layers=True)
        ref, _, fast, _ = _both(gated, batch, masks=masks)
        torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)
        session = current_engine(gated).layers._session
        assert engine is None or session is engine, "the session was rebuilt for another count vector"
        engine = session


def test_many_distinct_count_vectors_go_to_torch_path(gated):
    """More distinct per-sample count vectors than ``max_groups``: the batch runs the PyTorch path
    (per-layer blocks); at most that many: one ORT call per group. Both equal the reference."""
    batch = tiny_batch(batch=8, seq=9, padded=True)
    masks = random_masks(gated, 8, 0.5, seed=4, nested=True, skip_layers=True)
    engine = None
    for max_groups, fallback in ((1, True), (8, False)):
        engine = FastEncoder(gated, max_groups=max_groups, max_tokens=None)
        with engine_override(gated, engine), torch.inference_mode():
            fast = gated(**batch, masks=masks).logits
        with reference_path(gated), torch.inference_mode():
            ref = gated(**batch, masks=masks).logits
        torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)
        assert engine.fallbacks == int(fallback)


def test_torch_threads_are_restored(gated):
    """The engine runs PyTorch single-threaded around the ORT call and restores the count after,
    also on the fallback path and on error."""
    torch.set_num_threads(2)
    batch = tiny_batch(batch=8, seq=9)
    masks = random_masks(gated, 8, 0.5, seed=4, nested=True, skip_layers=True)
    engine = FastEncoder(gated, max_groups=1, max_tokens=None)
    seen = []
    real = engine.layers.forward
    engine.layers.forward = lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k)
    with engine_override(gated, engine), torch.inference_mode():
        gated(**batch, masks=masks)  # many count vectors: falls back to the PyTorch path
        gated(**tiny_batch(batch=2, seq=9), budget=0.5)
        with pytest.raises(ValueError):
            gated(**batch, budget=float("nan"))
    assert seen == [1, 1] and torch.get_num_threads() == 2


def test_large_batches_go_to_torch_path():
    """More tokens than ``max_tokens`` (default 128): the PyTorch path runs the batch; equal outputs.
    (A static router: one count vector per batch, so only the batch's size decides.)"""
    gated = dynprune.wrap(tiny_model("bert", layers=3), GateConfig(ffn_slice_size=16, router="static")).eval()
    small, large = tiny_batch(batch=2, seq=9), tiny_batch(batch=7, seq=19, padded=True)
    with torch.inference_mode():
        for batch, fell_back in ((small, 0), (large, 1)):
            fast = gated(**batch, budget=0.5).logits
            assert current_engine(gated).fallbacks == fell_back
            with reference_path(gated):
                torch.testing.assert_close(fast, gated(**batch, budget=0.5).logits, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="max_tokens"):
        FastEncoder(gated, max_tokens=0)


def test_engine_bytes_counts_every_leaf():
    """(n + 1) / 2 copies of each layer's attention and FFN weights (fp32), gated layers only."""
    gated = dynprune.wrap(tiny_model("bert", layers=3), GateConfig(ffn_slice_size=16))
    hidden, heads, ffn, slices = 64, 4, 128, 8
    per_layer = 4 * (4 * hidden * hidden * (heads + 1) / 2 + 2 * hidden * ffn * (slices + 1) / 2)
    assert dynprune.exec.engine_bytes(gated) == int(3 * per_layer)


def test_auto_skips_an_engine_too_large(monkeypatch):
    monkeypatch.setattr(dynprune.exec, "AUTO_MAX_ENGINE_BYTES", 1000)
    gated = dynprune.wrap(tiny_model("bert", layers=2), GateConfig(ffn_slice_size=16)).eval()
    with torch.inference_mode():
        gated(**tiny_batch(batch=1, seq=5), budget=0.5)
        assert current_engine(gated) is None and "GiB of per-count weights" in gated.__dict__["_fast_encoder"]
        with gated.running(backend="onnxruntime"):  # insisting builds it anyway
            gated.__dict__.pop("_fast_encoder")
            gated(**tiny_batch(batch=1, seq=5), budget=0.5)
        assert current_engine(gated) is not None


@pytest.mark.real
def test_minilm_engine_equals_reference(minilm_dir):
    """The packaged MiniLM: the engine equals the PyTorch path, router-chosen masks at three budgets
    and per-sample masks with padding (one ORT call per sample: ``max_groups`` allows it)."""
    gated, inputs = minilm_gated(minilm_dir, batch=3, padded_from=1)
    ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    masks = random_masks(gated, 3, 0.5, seed=2, nested=True, skip_layers=True)
    runs = [dict(budget=b) for b in (0.25, 0.5, 1.0)] + [dict(masks=masks)]
    engine = FastEncoder(gated, max_groups=3)
    with torch.inference_mode(), engine_override(gated, engine):
        for kw in runs:
            for rows in (slice(0, 1), slice(0, 3)):  # batch 1, and a padded per-sample batch
                batch = {"input_ids": ids[rows], "attention_mask": attention_mask[rows]}
                call = dict(kw)
                if "masks" in kw:
                    m = kw["masks"]
                    call["masks"] = dynprune.UnitMasks(m.head[rows], m.ffn[rows], m.layer[rows])
                fast = gated(**batch, **call).logits
                with reference_path(gated):
                    ref = gated(**batch, **call).logits
                torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)
        assert current_engine(gated) is engine and engine.fallbacks == 0


@pytest.mark.parametrize(
    "options, message",
    [(dict(threads=0), "threads must be >= 1"), (dict(threads=-2), "threads must be >= 1"),
     (dict(spinning="sometimes"), "spinning must be one of"), (dict(max_tokens=0), "max_tokens")],
)  # fmt: skip
def test_bad_engine_options_are_refused_at_construction(options, message):
    gated = dynprune.wrap(tiny_model("bert", layers=2), GateConfig(ffn_slice_size=16)).eval()
    with pytest.raises(ValueError, match=message):
        FastEncoder(gated, **options)


@pytest.mark.parametrize("heads", [5, 12])
def test_every_count_runs_exactly_the_sliced_layers(heads):
    """The If tree at every (heads, slices) count, for an odd and an even number of units, equals the
    sliced layers of exactly those units (no If), skipped layers included."""
    import numpy as np
    import onnxruntime as ort

    from dynprune.exec.onnx_pieces import gated_layers_model, sliced_layers_model

    model = tiny_model("bert", layers=2, heads=heads, hidden=12 * heads, ffn=24 * heads)
    gated = dynprune.wrap(model, GateConfig(ffn_slice_size=24)).eval()
    layers = FastEncoder(gated).layers
    weights = layers.weights(layers.layers)
    tree = ort.InferenceSession(gated_layers_model(weights, 24, True).SerializeToString())
    x = np.random.default_rng(0).standard_normal((1, 6, 12 * heads)).astype(np.float32)
    mask = np.ones((1, 6), np.int32)
    for h in range(heads + 1):
        for s in range(heads + 1):
            counts = [(1, h, s), (int((h + s) % 3 > 0), s, h)]
            feed = {"x": x, "mask": mask}
            for j, (keep, hj, sj) in enumerate(counts):
                feed |= {
                    f"l{j}_keep": np.array(bool(keep)),
                    f"l{j}_heads": np.array(hj),
                    f"l{j}_slices": np.array(sj),
                }
            sliced = ort.InferenceSession(sliced_layers_model(weights, 24, counts).SerializeToString())
            np.testing.assert_allclose(
                tree.run(None, feed)[0],
                sliced.run(None, {"x": x, "mask": mask})[0],
                atol=1e-5,
                err_msg=str(counts),
            )
