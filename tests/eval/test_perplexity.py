"""Perplexity evaluation of causal LMs: the scored tokens, the bootstrap, the baselines' pieces."""

import math

import numpy as np
import pytest
import torch
from dynprune.eval.baselines import shortgpt, teal
from dynprune.eval.perplexity import ChunkScores, bootstrap, continuation_nll, score_chunks, windows

import dynprune
from dynprune import GateConfig
from tests.helpers import tiny_decoder


def test_perplexity_equals_a_hand_computation_on_a_tiny_model():
    model = tiny_decoder("llama", layers=2)
    ids = torch.randint(3, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    prompt = 5
    with torch.no_grad():
        logits = model(ids).logits  # (3, 12, V)
    total, count = 0.0, 0
    for b in range(3):
        for t in range(prompt + 1, 12):  # targets predicted from continuation positions t - 1 >= prompt
            row = logits[b, t - 1].double()
            total += float(torch.logsumexp(row, 0) - row[ids[b, t]])
            count += 1
    scores = score_chunks(lambda x: model(x).logits[:, prompt:], ids, prompt, batch_size=2)
    assert scores.tokens.tolist() == [6, 6, 6] and count == 18
    assert scores.nll.sum() == pytest.approx(total, rel=1e-9)
    assert scores.perplexity == pytest.approx(math.exp(total / count), rel=1e-9)
    with pytest.raises(ValueError, match="positions"):
        continuation_nll(logits, ids, prompt)  # all positions, not the continuation's


def test_training_free_continuation_through_the_cache_is_scored_like_generation():
    gated = dynprune.wrap(tiny_decoder("qwen2", layers=3), GateConfig.griffin(ffn_slice_size=32)).eval()
    ids = torch.randint(3, 100, (2, 14), generator=torch.Generator().manual_seed(1))
    prompt = 6
    with torch.no_grad():
        cache = gated.new_cache()
        gated(ids[:, :prompt], budget=0.5, cache=cache, use_cache=True)
        teacher_forced = gated(ids[:, prompt:], cache=cache, use_cache=True).logits
        masks = cache.decision.info.masks
        # the same tokens one at a time (what generate does) under the same held decision
        cache2 = gated.new_cache()
        gated(ids[:, :prompt], budget=0.5, cache=cache2, use_cache=True)
        steps = [gated(ids[:, t : t + 1], cache=cache2, use_cache=True).logits for t in range(prompt, 14)]
    assert torch.equal(cache2.decision.info.masks.ffn, masks.ffn) and not bool(masks.ffn.all())
    assert torch.allclose(teacher_forced, torch.cat(steps, dim=1), atol=1e-5)


def test_bootstrap_interval_and_paired_ratio():
    rng = np.random.default_rng(0)
    nll = rng.uniform(200, 400, size=20)
    a = ChunkScores(nll, np.full(20, 100))
    stats = bootstrap(a, a, resamples=500)
    assert stats["ppl_lo"] < a.perplexity < stats["ppl_hi"]
    assert stats["ratio_lo"] == pytest.approx(1.0) and stats["ratio_hi"] == pytest.approx(1.0)
    worse = ChunkScores(nll + 10.0, a.tokens)  # 0.1 nats per token worse on every chunk
    s = bootstrap(worse, a, resamples=500)
    assert s["ratio_lo"] == pytest.approx(math.exp(0.1), rel=1e-9) == s["ratio_hi"]


def test_windows_are_evenly_spaced_and_do_not_overlap():
    stream = torch.arange(1000)
    w = windows(stream, 100, 4)
    assert w[:, 0].tolist() == [0, 300, 600, 900]
    with pytest.raises(ValueError, match="only 10 windows"):
        windows(stream, 100, 11)


def test_teal_thresholds_reach_the_calibrated_sparsity_and_budget():
    gated = dynprune.wrap(tiny_decoder("llama", layers=3), GateConfig.griffin(ffn_slice_size=32)).eval()
    fm = gated.flops
    ids = torch.randint(3, 100, (4, 24), generator=torch.Generator().manual_seed(2))
    sp = teal.ActivationSparsifier(gated.parts)
    with torch.no_grad(), sp.active():
        dense = gated(ids).logits
    s = teal.sparsity_for_budget(fm, 0.6, 24)
    assert teal.flops_ratio(fm, dict.fromkeys(teal.SITES, 1.0 - s), 24) == pytest.approx(0.6)
    sp.calibrate(s)
    with torch.no_grad(), sp.active(start=8):
        sparse = gated(ids).logits
    density = sp.density()
    for site in ("attn_in", "o_in"):  # layer 0's inputs are unchanged by sparsity: close to 1 - s
        assert 0.5 * (1 - s) < density[site] < 1.5 * (1 - s)
    assert torch.equal(sparse[:, :8], dense[:, :8])  # the prompt stays dense
    assert not torch.allclose(sparse[:, 8:], dense[:, 8:])
    with pytest.raises(ValueError, match="cannot be reached"):
        teal.sparsity_for_budget(fm, 0.01, 24)


def test_shortgpt_removes_an_identity_layer_first_and_honours_the_budget():
    model = tiny_decoder("llama", layers=4)
    layer = model.model.layers[2]
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: block influence 0
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    gated = dynprune.wrap(model, GateConfig.griffin(ffn_slice_size=32)).eval()
    ids = torch.randint(3, 100, (3, 16), generator=torch.Generator().manual_seed(3))
    bi = shortgpt.block_influence(gated.model, ids)
    assert int(bi.argmin()) == 2 and float(bi[2]) == pytest.approx(0.0, abs=1e-6)
    fm = gated.flops
    keep = shortgpt.layers_to_keep(bi, fm, 0.8, 16)
    assert not bool(keep[2])
    assert fm.task_head(16) + int(keep.sum()) * fm.layer_cost(16) <= 0.8 * fm.dense(16)
    assert shortgpt.layers_to_keep(bi, fm, 1.0, 16).all()


@pytest.mark.parametrize("budget", [0.4, 0.6, 0.8])
def test_ln_structured_keeps_the_largest_norm_units_of_every_layer_within_the_budget(budget):
    """The sweep's static width baseline: every layer keeps the same number of head units and
    FFN slices, the largest by weight norm (a zeroed unit is never kept while another is
    dropped), and the executed FLOPs fit the budget to within one unit per layer."""
    from dynprune.eval.perplexity_sweep import PerplexityConfig, _method

    model = tiny_decoder("llama", layers=3)
    with torch.no_grad():  # layer 1's first KV group and first FFN neurons weigh nothing
        attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
        group = attn.o_proj.weight.shape[1] // (attn.config.num_key_value_heads)
        attn.v_proj.weight[: attn.head_dim].zero_()
        attn.o_proj.weight[:, :group].zero_()
        mlp.down_proj.weight[:, :32].zero_()
        mlp.up_proj.weight[:32].zero_()
    gated = dynprune.wrap(model, GateConfig.griffin(ffn_slice_size=32)).eval()
    fm, seq = gated.flops, 16
    cfg = PerplexityConfig(seq_len=seq, prompt_len=8, chunks=1, calibration_chunks=1)
    ids = torch.randint(3, 100, (2, seq), generator=torch.Generator().manual_seed(1))
    scorer, flops, notes = _method("ln_structured", budget, gated, cfg, ids, {})
    with torch.no_grad():
        assert scorer(ids).shape[1] == seq - cfg.prompt_len
    counts = gated.last.masks.counts()  # (B, L, 3)
    assert bool((counts == counts[:1, :1]).all())  # the same in every layer and sample
    heads, slices = int(counts[0, 0, 1]), int(counts[0, 0, 2])
    assert slices < fm.n_slices
    used = flops() * fm.dense(seq)
    assert used <= budget * fm.dense(seq) * (1 + 1e-9)
    assert used > budget * fm.dense(seq) - fm.n_layers * (fm.head_cost(seq) + fm.slice_cost(seq))
    # the zeroed units are dropped: layer 1's kept units are all non-zero in the original weights
    kept_groups = set(gated.head_perm[1][:heads].tolist())
    kept_neurons = set(gated.ffn_perm[1][: slices * 32].tolist())
    assert not kept_neurons & set(range(32))
    assert heads == fm.n_heads or 0 not in kept_groups
    assert f"{heads}/{fm.n_heads} head units" in notes
