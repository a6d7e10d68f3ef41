"""scripts/bench_if_tree.py on a tiny BERT: the variants it times compute what they claim."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

import dynprune
from tests.helpers import load_script, tiny_model

bench = load_script("bench_if_tree")


def _gated():
    torch.manual_seed(0)
    model = tiny_model("bert", heads=4, hidden=64, ffn=128)
    return dynprune.wrap(model, dynprune.GateConfig(ffn_slice_size=32)).eval()


def test_every_variant_is_timed_and_the_table_says_what_was_run():
    gated = _gated()
    t = bench.measure(gated, seq=9, budget=0.5, vectors=3, threads=1, rounds=1, calls=2)
    for key in ("sliced_one_vector", "if_tree_one_vector", "if_tree_switching", "if_tree_each_repeated",
                "front_routed", "front_fed"):  # fmt: skip
        assert t[key] > 0, key
    assert t["routing"] == pytest.approx(t["front_routed"] - t["front_fed"])
    text = bench.table(t, 9, 0.5, 3, 1)
    assert "cycling through the 3 vectors" in text and "1 threads" in text


def test_count_vectors_keep_the_totals_and_the_range():
    rng = np.random.default_rng(0)
    vectors = bench.count_vectors(n_layers=6, units=12, per_layer=6, k=8, rng=rng)
    assert len({tuple(v) for v in vectors}) > 1  # they differ (what the switching variant needs)
    for v in vectors:
        heads, slices = zip(*v, strict=True)
        assert sum(heads) == sum(slices) == 36 and all(0 <= c <= 12 for c in heads + slices)


def test_the_fed_front_has_no_routing_nodes_and_the_same_output():
    gated = _gated()
    inputs = {
        "input_ids": torch.randint(3, 100, (1, 7)),
        "attention_mask": torch.ones(1, 7, dtype=torch.long),
    }
    with torch.no_grad():
        gated(**inputs, budget=0.5)
    whole = dynprune.exec.engine_for(gated, torch.device("cpu")).whole()
    routed, fed = (bench.front_only(whole.front(), fed=f) for f in (False, True))
    ops = lambda m: {n.op_type for n in m.graph.node}  # noqa: E731
    assert "TopK" in ops(routed) and "TopK" not in ops(fed)  # the selection's sort is gone
    assert len(fed.graph.node) < len(routed.graph.node) / 3
    s_routed, s_fed = (ort.InferenceSession(m.SerializeToString()) for m in (routed, fed))
    tokens = whole.tokens(inputs, 7)
    feed = whole.feed(tokens, 0.5, 0.5 * gated.flops.dense(7), 7)
    out, counts = s_routed.run(
        None, {k: v for k, v in feed.items() if k in {i.name for i in s_routed.get_inputs()}}
    )
    fed_feed = {i.name: tokens[i.name] for i in s_fed.get_inputs() if i.name in tokens}
    np.testing.assert_array_equal(s_fed.run(None, {**fed_feed, "given_counts": counts})[0], out)
