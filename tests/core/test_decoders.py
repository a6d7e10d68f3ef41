"""Gated causal LMs (Llama, Qwen2, Mistral, GPT-2): gathered forward, KV cache policy, generate."""

import pytest
import torch

import dynprune
from dynprune import GateConfig, UnitMasks
from dynprune.kv_cache import GatedKVCache
from tests.helpers import DECODER_TYPES, VOCAB, left_padded, random_masks, tiny_decoder

CFG = GateConfig(ffn_slice_size=32)


def _prompts(seed: int, lengths=(9, 5, 7)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def _no_dropout_train(gated) -> None:
    gated.train()
    for m in gated.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_gates_open_forward_equals_unwrapped(model_type):
    model = tiny_decoder(model_type)
    batch = left_padded(_prompts(0))
    with torch.no_grad():
        ref = model(**batch).logits
        gated = dynprune.wrap(model, CFG)
        dense = gated(**batch, budget=1.0).logits  # no router: HF's forward untouched
        full = UnitMasks.full(3, gated.n_gated, gated.parts.n_heads, gated.n_slices)
        gathered = gated(**batch, masks=full).logits  # the gathered path at full width
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(dense[valid], ref[valid], rtol=1e-5, atol=1e-5)  # units reordered
    torch.testing.assert_close(gathered[valid], ref[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", DECODER_TYPES)
@pytest.mark.parametrize("nested", [True, False])
def test_gathered_equals_masked_path(model_type, nested):
    gated = dynprune.wrap(tiny_decoder(model_type, layers=4), CFG)
    batch = left_padded(_prompts(1, (8, 8, 3, 6)))
    masks = random_masks(gated, 4, 0.5, seed=3, nested=nested, skip_layers=True)
    with torch.no_grad():
        gathered = gated(**batch, masks=masks).logits
        _no_dropout_train(gated)
        masked = gated(**batch, masks=masks).logits
    valid = batch["attention_mask"].bool()
    assert not bool(masks.layer.all()) and not bool(masks.head.all())
    torch.testing.assert_close(gathered[valid], masked[valid], rtol=1e-5, atol=1e-5)


def test_gqa_head_unit_is_a_kv_group():
    gated = dynprune.wrap(tiny_decoder("llama"), CFG)
    assert gated.parts.n_heads == 2 and gated.parts.heads_per_unit == 2  # 4 query heads, 2 KV heads
    fm, t, h, d = gated.flops, 10, 64, 16
    # Q + O of 2 query heads, K + V of one KV head; attention of 2 heads
    assert fm.head_cost(t) == 2 * t * h * d * (2 + 2 + 1 + 1) + 4 * t * t * d * 2


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_greedy_generation_with_gates_open_is_token_identical(model_type):
    model = tiny_decoder(model_type)
    batch = left_padded(_prompts(2))
    ref = model.generate(**batch, max_new_tokens=8, do_sample=False)
    gated = dynprune.wrap(model, CFG)
    full = UnitMasks.full(3, gated.n_gated, gated.parts.n_heads, gated.n_slices)
    assert torch.equal(gated.generate(**batch, max_new_tokens=8, do_sample=False), ref)  # budget 1.0
    assert torch.equal(gated.generate(**batch, max_new_tokens=8, do_sample=False, masks=full), ref)


def _no_cache_greedy(gated, ids, masks, n_new):
    """Greedy decoding by re-running the whole sequence each step with the same held masks."""
    out = ids
    for _ in range(n_new):
        with torch.no_grad():
            logits = gated(out, masks=masks, use_cache=False).logits
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_cached_generation_equals_recomputation_under_held_gates(model_type):
    gated = dynprune.wrap(tiny_decoder(model_type, layers=4), CFG)
    ids = _prompts(4, (7,))[0][None]
    masks = random_masks(gated, 1, 0.5, seed=5, nested=True, skip_layers=True)
    got = gated.generate(ids, masks=masks, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, _no_cache_greedy(gated, ids, masks, 6))


def test_cache_stores_only_kept_kv_groups_of_kept_layers():
    gated = dynprune.wrap(tiny_decoder("llama", layers=4), CFG)
    batch = left_padded(_prompts(6))
    masks = random_masks(gated, 3, 0.5, seed=8, nested=True, skip_layers=True).canonical()
    cache = gated.new_cache()
    with torch.no_grad():
        gated(**batch, masks=masks, cache=cache, use_cache=True)
    seq, d = batch["input_ids"].shape[1], gated.parts.head_dim
    want = 2 * int(masks.head.sum()) * seq * d * 4  # K and V, fp32, kept (sample, layer, group)
    assert cache.nbytes() == want
    for layer in range(gated.n_gated):
        if not bool(masks.layer[:, layer].any()):
            assert cache.gated_layer(layer).blocks == {}
    dense = 2 * 4 * 3 * gated.parts.n_heads * seq * d * 4
    assert cache.nbytes() < dense and cache.get_seq_length() == seq


@pytest.mark.parametrize("model_type", DECODER_TYPES)
def test_batched_left_padded_generation_with_different_gates_per_sequence(model_type):
    # decode steps run O / FFN down by unit runs across the rows' budgets (gathered_*.py)
    gated = dynprune.wrap(tiny_decoder(model_type, layers=4), CFG)
    prompts = _prompts(9)
    masks = random_masks(gated, 3, 0.5, seed=10, nested=True, skip_layers=True)
    assert not torch.equal(masks.head[0], masks.head[1])
    batched = gated.generate(**left_padded(prompts), masks=masks, max_new_tokens=6, do_sample=False)
    width = batched.shape[1] - 6
    for row, p in enumerate(prompts):
        one = UnitMasks(masks.head[row : row + 1], masks.ffn[row : row + 1], masks.layer[row : row + 1])
        alone = gated.generate(p[None], masks=one, max_new_tokens=6, do_sample=False)
        assert torch.equal(batched[row, width - len(p) :], alone[0])


def test_router_chosen_gates_are_held_and_budgets_honoured_in_generate():
    gated = dynprune.wrap(tiny_decoder("qwen2", layers=4), CFG).eval()
    batch = left_padded(_prompts(11))
    budgets = torch.tensor([0.5, 0.7, 1.0])
    out = gated.generate(**batch, budget=budgets, max_new_tokens=5, do_sample=True, top_k=5)
    info = gated.last
    assert out.shape == (3, batch["input_ids"].shape[1] + 5)
    assert bool((info.flops_ratio <= budgets + 1e-9).all())
    assert info.masks is not None and bool(info.masks.head[2].all())  # budget 1.0: dense row


def test_generate_goes_through_the_gates_and_forward_like_passthrough_is_refused():
    gated = dynprune.wrap(tiny_decoder("llama"), CFG)
    assert type(gated).generate is dynprune.GatedModel.generate
    for name in ("_sample", "prepare_inputs_for_generation", "greedy_search"):
        if hasattr(gated.model, name):
            with pytest.raises(AttributeError, match="without gates"):
                getattr(gated, name)
    assert gated.config is gated.model.config  # plain attributes still pass through


def test_plain_forward_with_use_cache_returns_a_gated_cache_that_holds_the_gates():
    gated = dynprune.wrap(tiny_decoder("gpt2"), CFG)
    ids = _prompts(12, (6,))[0][None]
    masks = random_masks(gated, 1, 0.5, seed=13, nested=True)
    with torch.no_grad():
        out = gated(ids, masks=masks, use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, GatedKVCache) and cache.decision is not None
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = gated(nxt, cache=cache, use_cache=True).logits  # no masks: the held ones apply
        full = gated(torch.cat([ids, nxt], 1), masks=masks, use_cache=False).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(max_new_tokens=10_000), "exceeds the model's context"),
        (dict(max_new_tokens=3, num_beams=2), "beam search"),
        (dict(max_new_tokens=3, budget=1.5), "budget must be a fraction"),
        (dict(max_new_tokens=3, budget=0.0), "budget must be a fraction"),
    ],
)
def test_generate_bad_input_is_refused_before_generating(kwargs, match):
    gated = dynprune.wrap(tiny_decoder("llama"), CFG)
    with pytest.raises(ValueError, match=match):
        gated.generate(torch.tensor([[5, 6, 7]]), **kwargs)


def test_generate_refuses_empty_and_too_long_prompts_and_foreign_caches():
    from transformers import DynamicCache

    gated = dynprune.wrap(tiny_decoder("llama"), CFG)
    with pytest.raises(ValueError, match="empty prompt"):
        gated.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="longer than the model's context"):
        gated.generate(torch.ones(1, 97, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"fresh dynprune\.GatedKVCache"):
        gated.generate(torch.tensor([[5, 6]]), max_new_tokens=2, budget=0.5, cache=DynamicCache())
    with pytest.raises(TypeError, match=r"needs a dynprune\.GatedKVCache"):
        gated(torch.tensor([[5, 6]]), budget=0.5, cache=DynamicCache())
    gated.train()
    with pytest.raises(ValueError, match=r"gated\.eval\(\)"):
        gated.generate(torch.tensor([[5, 6]]), max_new_tokens=2, budget=0.5)


def test_gates_saved_for_another_model_are_refused(tmp_path):
    gated = dynprune.wrap(tiny_decoder("llama"), CFG)
    dynprune.save_gates(gated, tmp_path / "g")
    with pytest.raises(dynprune.IncompatibleGatesError, match="different model"):
        dynprune.load_gates(tiny_decoder("gpt2"), tmp_path / "g")


@pytest.mark.real
def test_smollm2_greedy_identity_with_gates_open_and_a_smaller_cache_at_budget(smollm2):
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(
        ["In the beginning God created", "And the earth was"], return_tensors="pt", padding=True
    )
    ref = model.generate(**batch, max_new_tokens=6, do_sample=False)
    gated = dynprune.wrap(model, GateConfig(ffn_slice_size=128))
    try:
        assert gated.parts.n_heads == 3 and gated.parts.heads_per_unit == 3  # 9 query heads, 3 KV groups
        full = UnitMasks.full(2, gated.n_gated, gated.parts.n_heads, gated.n_slices)
        assert torch.equal(gated.generate(**batch, max_new_tokens=6, do_sample=False, masks=full), ref)
        masks = random_masks(gated, 2, 0.6, seed=1, nested=True, skip_layers=True)
        cache = gated.new_cache()
        out = gated.generate(**batch, max_new_tokens=6, do_sample=False, masks=masks, cache=cache)
        assert out.shape == ref.shape
        seq, d = out.shape[1] - 1, gated.parts.head_dim  # the last token's K/V is never computed
        dense = 2 * 30 * 2 * 3 * seq * d * 4
        assert cache.nbytes() == 2 * int(masks.canonical().head.sum()) * seq * d * 4 < dense
    finally:
        dynprune.unwrap(gated)


def test_dense_prefix_layers_cache_like_hf_and_gated_layers_hold_gates():
    model = tiny_decoder("llama", layers=4)
    ids = _prompts(14, (9,))[0][None]
    ref = model.generate(ids, max_new_tokens=5, do_sample=False)
    gated = dynprune.wrap(model, GateConfig(ffn_slice_size=32, router_layer=1))
    full = UnitMasks.full(1, gated.n_gated, gated.parts.n_heads, gated.n_slices)
    assert torch.equal(gated.generate(ids, masks=full, max_new_tokens=5, do_sample=False), ref)
    masks = random_masks(gated, 1, 0.5, seed=15, nested=True)
    got = gated.generate(ids, masks=masks, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, _no_cache_greedy(gated, ids, masks, 5))


def test_eval_under_autocast_runs_the_gathered_path_in_the_weights_dtype():
    """The evaluation inside a bf16 training run calls the model in eval mode under autocast: the
    gathered path (in-place addmm on fp32 buffers) runs as without autocast."""
    gated = dynprune.wrap(tiny_decoder("llama"), GateConfig(ffn_slice_size=32)).eval()
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        want = gated(input_ids=ids, budget=0.6).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = gated(input_ids=ids, budget=0.6).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
