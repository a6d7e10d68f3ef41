"""The gathered path (really skips work) equals the masked path (multiplies by gates)."""

import dataclasses

import pytest
import torch

import dynprune
from dynprune import GateConfig
from tests.core.test_budget import _diverse_router
from tests.helpers import ENCODER_TYPES, random_masks, tiny_batch, tiny_model

ATOL = 1e-5  # fp32; documented in docs/architecture.md


def _run(gated, batch, execution, **kw):
    with gated.running(execution=execution), torch.no_grad():
        out = gated(**batch, **kw).logits
    return out, gated.last


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
@pytest.mark.parametrize("nested", [True, False])
def test_router_chosen_gates_same_on_both_paths(model_type, nested):
    cfg = GateConfig(ffn_slice_size=32, nested=nested)
    gated = _diverse_router(dynprune.wrap(tiny_model(model_type, layers=4), cfg), seed=3)
    batch = tiny_batch(batch=6, seq=19)
    budgets = torch.tensor([0.25, 0.4, 0.55, 0.7, 0.9, 1.0])
    masked, info_m = _run(gated, batch, "masked", budget=budgets)
    gathered, info_g = _run(gated, batch, "gathered", budget=budgets)
    torch.testing.assert_close(gathered, masked, atol=ATOL, rtol=0)
    for a, b in zip(
        (info_m.masks.head, info_m.masks.ffn, info_m.masks.layer),
        (info_g.masks.head, info_g.masks.ffn, info_g.masks.layer),
    ):
        assert torch.equal(a, b)
    # samples really got different masks
    heads = info_g.masks.head.reshape(6, -1)
    assert len({tuple(r.tolist()) for r in heads}) > 1


@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
def test_explicit_masks_including_empty_and_skipped_layers(keep):
    gated = dynprune.wrap(tiny_model("bert", layers=3), GateConfig(ffn_slice_size=32))
    batch = tiny_batch(batch=5)
    masks = random_masks(gated, 5, keep, seed=7, nested=False, skip_layers=True)
    masked, _ = _run(gated, batch, "masked", masks=masks)
    gathered, info = _run(gated, batch, "gathered", masks=masks)
    torch.testing.assert_close(gathered, masked, atol=ATOL, rtol=0)
    assert info.masks is not None


def test_all_layers_skipped_passes_embeddings_through():
    gated = dynprune.wrap(tiny_model("bert", layers=2), GateConfig(ffn_slice_size=32))
    batch = tiny_batch(batch=3)
    masks = random_masks(gated, 3, 1.0, seed=0)
    masks.layer[:] = False
    gathered, info = _run(gated, batch, "gathered", masks=masks)
    masked, _ = _run(gated, batch, "masked", masks=masks)
    torch.testing.assert_close(gathered, masked, atol=ATOL, rtol=0)
    assert float(info.flops.max()) == gated.flops.fixed(batch["input_ids"].shape[1], with_router=False)


@pytest.mark.real
def test_minilm_paths_agree_with_per_sample_budgets(minilm_dir, minilm_tokenizer):
    from transformers import AutoModelForSequenceClassification

    from dynprune.assets import rotten_tomatoes_split

    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()
    gated = _diverse_router(dynprune.wrap(model), seed=1)
    texts = [t for t, _ in rotten_tomatoes_split()["test"][:8]]
    batch = dict(minilm_tokenizer(texts, padding=True, return_tensors="pt"))
    budgets = torch.tensor([0.25, 0.5, 0.75, 1.0, 0.3, 0.6, 0.9, 0.45])
    masked, _ = _run(gated, batch, "masked", budget=budgets)
    gathered, info = _run(gated, batch, "gathered", budget=budgets)
    torch.testing.assert_close(gathered, masked, atol=ATOL, rtol=0)
    assert bool((info.flops_ratio <= budgets.double() + 1e-9).all())


def _ran_hf_query(gated, batch) -> bool:
    """Whether a gated forward called HF's own query projection of the first layer: the masked
    path runs the HF layer, the gathered path projects Q/K/V from the packed weights instead."""
    calls = []
    query = gated.model.bert.encoder.layer[0].attention.self.query
    handle = query.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            gated(**batch, budget=0.5)
    finally:
        handle.remove()
    return bool(calls)


def test_running_chooses_the_path_for_the_block_only_and_never_changes_the_config():
    gated = dynprune.wrap(tiny_model("bert"), GateConfig(ffn_slice_size=32)).eval()
    config = gated.gate_config
    before = dataclasses.asdict(config)
    batch = tiny_batch(batch=2)
    assert not _ran_hf_query(gated, batch)  # eval mode, execution="auto": gathered
    with gated.running(execution="masked"):
        assert _ran_hf_query(gated, batch)
        with gated.running(backend="torch"):  # nested: keeps the outer execution
            assert _ran_hf_query(gated, batch)
        assert gated.gate_config is config and dataclasses.asdict(config) == before
    assert not _ran_hf_query(gated, batch)
    with pytest.raises(RuntimeError, match="inside"), gated.running(execution="masked"):
        raise RuntimeError("inside")
    assert not _ran_hf_query(gated, batch)
    assert gated.gate_config is config and dataclasses.asdict(config) == before
    with pytest.raises(ValueError, match="execution"), gated.running(execution="fast"):
        pass


def test_running_backend_is_scoped_and_leaves_the_config_object_alone():
    gated = dynprune.wrap(tiny_model("bert"), GateConfig(ffn_slice_size=32, backend="onnxruntime")).eval()
    config = gated.gate_config
    with gated.running(backend="torch"):
        assert gated.backend_choice == "torch" and gated.gate_config is config
    assert gated.gate_config is config and config.backend == "onnxruntime"
    assert gated.backend_choice == "onnxruntime"
    with pytest.raises(ValueError, match="backend"), gated.running(backend="cuda"):
        pass
