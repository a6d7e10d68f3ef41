"""Save/load only what dynprune adds (safetensors + JSON), onto a fresh base model."""

import json

import pytest
import torch

import dynprune
from dynprune import GateConfig
from tests.core.test_budget import _diverse_router
from tests.helpers import tiny_batch, tiny_model


def test_gates_round_trip_onto_a_fresh_base_model(tmp_path):
    cfg = GateConfig(ffn_slice_size=32, router_hidden=24)
    gated = _diverse_router(dynprune.wrap(tiny_model("roberta", seed=4), cfg), seed=9)
    batch = tiny_batch(batch=4)
    with torch.no_grad():
        want = gated(**batch, budget=0.5).logits
    masks_before = gated.last.masks
    dynprune.save_gates(gated, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gates.json", "gates.safetensors"]
    assert json.loads((tmp_path / "gates.json").read_text())["gate_config"]["router_hidden"] == 24
    loaded = dynprune.load_gates(tiny_model("roberta", seed=4), tmp_path)
    assert loaded.gate_config == cfg
    with torch.no_grad():
        got = loaded(**batch, budget=0.5).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert torch.equal(loaded.last.masks.head, masks_before.head)


def _legacy(tmp_path, gated, router: str) -> None:
    """Rewrite saved gates into the form older versions wrote (same function)."""
    from safetensors.torch import load_file, save_file

    meta = json.loads((tmp_path / "gates.json").read_text())
    meta["gate_config"].update(temperature=0.5, hard=False, budget_to_hidden=router == "dynamic")
    (tmp_path / "gates.json").write_text(json.dumps(meta))
    t = load_file(str(tmp_path / "gates.safetensors"))
    if router == "static":  # the static router's hidden layer was called inp_static
        for part in ("weight", "bias"):
            t[f"router.inp_static.{part}"] = t.pop(f"router.budget_inp.{part}")
    else:  # the dynamic router's input layer had a bias (part of the hidden layer's bias now)
        t["router.inp.bias"] = 0.25 * t["router.budget_inp.bias"]
        t["router.budget_inp.bias"] = 0.75 * t["router.budget_inp.bias"]
    save_file(t, str(tmp_path / "gates.safetensors"))


def _legacy_without_budget_hidden(tmp_path) -> None:
    """A dynamic router saved before the budget entered its hidden layer (budget_to_hidden off)."""
    from safetensors.torch import load_file, save_file

    meta = json.loads((tmp_path / "gates.json").read_text())
    meta["gate_config"].update(temperature=0.5, hard=False, budget_to_hidden=False)
    (tmp_path / "gates.json").write_text(json.dumps(meta))
    t = load_file(str(tmp_path / "gates.safetensors"))
    t["router.inp.bias"] = t.pop("router.budget_inp.bias")
    del t["router.budget_inp.weight"]
    save_file(t, str(tmp_path / "gates.safetensors"))


@pytest.mark.parametrize("router", ["dynamic", "static", "dynamic_no_budget_hidden"])
def test_gates_saved_by_older_versions_load_as_the_same_function(tmp_path, router):
    cfg = GateConfig(ffn_slice_size=32, router_hidden=24, router=router.split("_")[0])
    gated = _diverse_router(dynprune.wrap(tiny_model("bert", seed=4), cfg), seed=9)
    if router == "dynamic_no_budget_hidden":
        with torch.no_grad():
            gated.router.budget_inp.weight.zero_()  # what that router computed
    batch = tiny_batch(batch=4)
    with torch.no_grad():
        want = gated(**batch, budget=0.4).logits
    dynprune.save_gates(gated, tmp_path)
    if router == "dynamic_no_budget_hidden":
        _legacy_without_budget_hidden(tmp_path)
    else:
        _legacy(tmp_path, gated, router)
    loaded = dynprune.load_gates(tiny_model("bert", seed=4), tmp_path)
    assert loaded.gate_config == cfg
    with torch.no_grad():
        got = loaded(**batch, budget=0.4).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(loaded.last.masks.head, gated.last.masks.head)


def test_loading_onto_another_architecture_or_size_is_a_clear_error(tmp_path):
    gated = dynprune.wrap(tiny_model("bert"), GateConfig(ffn_slice_size=32))
    dynprune.save_gates(gated, tmp_path)
    with pytest.raises(dynprune.IncompatibleGatesError, match="model_type"):
        dynprune.load_gates(tiny_model("distilbert"), tmp_path)
    with pytest.raises(dynprune.IncompatibleGatesError, match="n_heads"):
        dynprune.load_gates(tiny_model("bert", heads=8), tmp_path)
    with pytest.raises(FileNotFoundError, match="no saved gates"):
        dynprune.load_gates(tiny_model("bert"), tmp_path / "nothing")


def test_whole_gated_model_round_trip(tmp_path):
    gated = _diverse_router(
        dynprune.wrap(tiny_model("distilbert", seed=6), GateConfig(ffn_slice_size=32)), seed=2
    )
    with torch.no_grad():
        gated.model.classifier.weight.mul_(3.0)  # "fine-tuned" base weights must be saved too
    batch = tiny_batch(batch=3)
    with torch.no_grad():
        want = gated(**batch, budget=0.6).logits
    dynprune.save_gated_model(gated, tmp_path / "model")
    assert not list(tmp_path.glob(".model.tmp-*"))
    loaded, tokenizer = dynprune.load_gated_model(tmp_path / "model")
    assert tokenizer is None and not loaded.training
    with torch.no_grad():
        got = loaded(**batch, budget=0.6).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with pytest.raises(FileNotFoundError, match="not a saved gated model"):
        dynprune.load_gated_model(tmp_path)
