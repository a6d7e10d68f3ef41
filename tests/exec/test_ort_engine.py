"""The ONNX Runtime engine (dynprune.exec) equals the PyTorch gathered path (the reference).

Tolerance (fp32): atol 1e-5 on logits; the engines differ in kernels and summation order only.
"""

import pytest
import torch

pytest.importorskip("onnxruntime")

import dynprune
from dynprune import GateConfig
from tests.helpers import ENCODER_TYPES, random_masks, tiny_batch, tiny_model

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
    return dynprune.wrap(tiny_model(request.param, layers=4), GateConfig(ffn_slice_size=16)).eval()


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("mode", ["shared", "different"])
def test_forced_masks_equal_reference(gated, mode, padded):
    batch = tiny_batch(batch=7, seq=19, padded=padded)
    masks = random_masks(gated, 7, 0.5, seed=3, nested=True, skip_layers=True)
    if mode == "shared":
        masks = _shared(masks, 7)
    ref, _, fast, _ = _both(gated, batch, masks=masks)
    assert gated.__dict__.get("_fast_encoder"), "the ORT engine did not run"
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


def test_training_mode_does_not_use_engine(gated):
    gated.train()
    batch = tiny_batch(batch=2, seq=7)
    gated(**batch, budget=0.5)
    assert "_fast_encoder" not in gated.__dict__


def _without_onnxruntime(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )


def test_auto_backend_runs_torch_path():
    gated = dynprune.wrap(tiny_model("bert", layers=2), GateConfig(ffn_slice_size=16)).eval()
    with torch.inference_mode():
        gated(**tiny_batch(batch=2, seq=7), budget=0.5)
    assert "_fast_encoder" not in gated.__dict__


def test_explicit_backend_without_extra_is_an_error(monkeypatch):
    _without_onnxruntime(monkeypatch)
    gated = dynprune.wrap(tiny_model("bert", layers=2), GateConfig(ffn_slice_size=16, backend="onnxruntime"))
    with pytest.raises(RuntimeError, match=r"dynprune\[onnx\]"), torch.inference_mode():
        gated.eval()(**tiny_batch(batch=1, seq=5), budget=0.5)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_whole_model_session_on_repeated_masks(gated, batch_size):
    batch = tiny_batch(batch=batch_size, seq=9, padded=False)
    masks = _shared(random_masks(gated, batch_size, 0.5, seed=5, nested=True, skip_layers=True), batch_size)
    for _ in range(2):  # the second sighting of the count vector builds the whole-model session
        ref, _, fast, _ = _both(gated, batch, masks=masks)
        torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)
    assert len(gated.__dict__["_fast_encoder"].layers._model_sessions) == 1
