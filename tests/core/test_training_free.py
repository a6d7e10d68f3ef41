"""Training-free gates (GateConfig.griffin): scores from the prompt's activations, dense prefill,
gates held for the generated tokens, budget through the one selection and FLOPs module."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import dynprune
from dynprune import GateConfig
from dynprune.magnitude import SCALE, coverage_logits, unit_energy
from tests.helpers import left_padded, tiny_decoder

CFG = GateConfig.griffin(ffn_slice_size=32, unit_order="none")  # keep unit indices = weight indices


def _counted(fn):
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_griffin_config_is_one_line_and_refuses_knobs_it_cannot_honour():
    cfg = GateConfig.griffin()
    assert (cfg.router, cfg.layers, cfg.nested) == ("griffin", False, False)
    with pytest.raises(ValueError, match="layers=False"):
        GateConfig(router="griffin", nested=False)
    with pytest.raises(ValueError, match="nested=False"):
        GateConfig(router="griffin", layers=False)


def test_unit_energy_normalises_tokens_and_ignores_padding():
    x = torch.zeros(1, 3, 4)  # 2 units of width 2
    x[0, 0] = torch.tensor([3.0, 4.0, 0.0, 0.0])  # token 0: all in unit 0
    x[0, 1] = torch.tensor([0.0, 0.0, 0.0, 10.0])  # token 1: all in unit 1 (its size does not matter)
    x[0, 2] = torch.tensor([100.0, 0.0, 0.0, 0.0])  # padding
    valid = torch.tensor([[True, True, False]])
    energy = unit_energy(x, 2, valid)
    assert torch.allclose(energy, torch.tensor([[1.0, 1.0]]))


def test_logits_order_units_by_the_share_of_their_layer_covered_before_them():
    energy = torch.tensor([[[0.2, 0.5, 0.3], [1 / 3, 1 / 3, 1 / 3]]]) * 10  # (1 sample, 2 layers, 3 units)
    logits = coverage_logits(energy, torch.tensor([10.0]), cost=2.0, max_cost=8.0)
    before = torch.tensor([[[0.8, 0.0, 0.5], [0.0, 1 / 3, 2 / 3]]])
    want = torch.log(torch.tensor(0.25)) - SCALE * before  # log σ(logit) = log(cost / max) − SCALE·c
    assert torch.allclose(torch.nn.functional.logsigmoid(logits.double()), want.double(), atol=1e-5)


def test_gates_follow_activation_magnitudes_on_a_constructed_model():
    model = tiny_decoder("llama", layers=2)
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.mlp.up_proj.weight[64:128] = 0.0  # slices 2, 3 of layer 0: zero activation
        layer.mlp.up_proj.weight[0:32] *= 30.0  # slice 0 dominates
        layer.self_attn.v_proj.weight[16:32] = 0.0  # KV group 1 of layer 0: zero context
    gated = dynprune.wrap(model, CFG).eval()
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gated(ids, budget=0.6)
    decided = gated.last.decided
    assert decided is not None and gated.last.gates is None  # the prompt ran dense
    head, ffn = decided.masks.head[0, 0], decided.masks.ffn[0, 0]
    assert bool(ffn[0]) and not bool(ffn[2]) and not bool(ffn[3])
    assert bool(head[0]) and not bool(head[1])
    scores = decided.scores
    assert float(scores.ffn[0, 0, 0]) > float(scores.ffn[0, 0, 1]) > float(scores.ffn[0, 0, 2])


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_budget_honoured_and_flops_match_the_counter(model_type):
    gated = dynprune.wrap(tiny_decoder(model_type, layers=4), CFG).eval()
    ids = torch.randint(3, 100, (3, 15), generator=torch.Generator().manual_seed(1))
    budgets = torch.tensor([0.45, 0.6, 0.8])
    counted_prefill = _counted(lambda: gated(ids, budget=budgets))
    info = gated.last
    dense = info.dense_flops
    assert counted_prefill == pytest.approx(3 * dense, rel=0.01)  # the prefill is dense, counted so
    assert torch.allclose(info.flops, torch.full((3,), dense, dtype=torch.float64))
    decided = info.decided
    assert bool((decided.flops_ratio <= budgets + 1e-9).all())
    assert bool((decided.flops_ratio >= budgets - 0.1).all())
    assert len({tuple(decided.masks.ffn[r].flatten().tolist()) for r in range(3)}) == 3
    # the chosen gates, run on the gathered path, cost what the FLOPs module says
    counted = _counted(lambda: gated(ids, masks=decided.masks))
    assert counted == pytest.approx(float(decided.flops.sum()), rel=0.01)


def _reference_greedy(gated, ids, masks, n_new):
    """Independent reference: the plain HF model (no cache), prompt positions dense, later positions
    with O-projection / FFN-down inputs multiplied by the held unit masks (hooks written here)."""
    parts = gated.parts
    prompt = ids.shape[1]
    g, d, s = parts.heads_per_unit, parts.head_dim, gated.gate_config.ffn_slice_size

    def hook(mask_row, width):
        def pre(module, args):
            x = args[0].clone()
            keep = mask_row.repeat_interleave(width).to(x.dtype)  # (units * width,)
            x[:, prompt:] = x[:, prompt:] * keep
            return (x,)

        return pre

    handles = []
    for i, lp in enumerate(parts.parts):
        handles.append(lp.o.register_forward_pre_hook(hook(masks.head[0, i], g * d)))
        handles.append(lp.down.register_forward_pre_hook(hook(masks.ffn[0, i], s)))
    seq = ids
    try:
        with torch.no_grad():
            for _ in range(n_new):
                logits = gated.model(seq, use_cache=False).logits
                seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    finally:
        for h in handles:
            h.remove()
    return seq


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_generate_with_the_held_training_free_gates_equals_the_reference(model_type):
    gated = dynprune.wrap(tiny_decoder(model_type, layers=4), CFG).eval()
    ids = torch.randint(3, 100, (1, 11), generator=torch.Generator().manual_seed(2))
    out = gated.generate(ids, budget=0.55, max_new_tokens=6, do_sample=False)
    masks = gated.last.masks  # the decode steps ran under the decision held from the prefill
    assert not bool(masks.ffn.all()) and gated.last.flops_ratio.item() <= 0.55 + 1e-9
    assert torch.equal(out, _reference_greedy(gated, ids, masks, 6))


def test_batched_left_padded_generation_equals_each_prompt_alone():
    gated = dynprune.wrap(tiny_decoder("llama", layers=4), CFG).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 100, (n,), generator=g) for n in (9, 5, 7)]
    budgets = torch.tensor([0.5, 0.7, 1.0])
    batched = gated.generate(**left_padded(prompts), budget=budgets, max_new_tokens=5, do_sample=False)
    width = batched.shape[1] - 5
    for row, p in enumerate(prompts):
        alone = gated.generate(p[None], budget=float(budgets[row]), max_new_tokens=5, do_sample=False)
        assert torch.equal(batched[row, width - len(p) :], alone[0])


def test_the_cache_keeps_only_the_chosen_kv_groups_after_the_dense_prefill():
    gated = dynprune.wrap(tiny_decoder("llama", layers=4), CFG).eval()
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(4))
    cache = gated.new_cache()
    with torch.no_grad():
        gated(ids, budget=0.4, cache=cache, use_cache=True)
    m = cache.decision.info.masks
    assert not bool(m.head.all())
    assert cache.nbytes() == 2 * int(m.head.sum()) * 10 * gated.parts.head_dim * 4  # K and V, fp32
    with pytest.raises(RuntimeError, match="written by the gathered path"):
        cache.gated_layer(0).update(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16))


def test_training_mode_is_refused():
    gated = dynprune.wrap(tiny_decoder("llama"), CFG).train()
    with pytest.raises(ValueError, match="training-free"):
        gated(torch.randint(3, 100, (1, 6)), budget=0.5)
