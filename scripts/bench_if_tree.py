"""Where a dynamic router's batch-1 time goes on the CPU engine, measured side by side in one process.

The engine's If-tree session (dynprune.exec.onnx_pieces.gated_layers_model) runs any kept counts;
a physically sliced model runs one count vector. Three gaps between them, each timed as a paired
ratio (interleaved blocks, medians):

1. **If nodes**: the If-tree layers vs the sliced layers, the same count vector over and over.
2. **Switching count vectors**: the If tree cycling through K count vectors (each of the same total
   units, so the same FLOPs) vs each of those vectors repeated: what a router whose counts change
   from call to call pays over one whose counts repeat.
3. **Routing**: the exported front (embeddings, router, selection, head; the layers replaced by
   an identity) vs the same front given the counts (no routing nodes).

    python scripts/bench_if_tree.py [--seq 32] [--budget 0.5] [--vectors 8] [--out results/cpu_bench/if_tree.md]

MiniLM with an untrained dynamic router (the graphs do not depend on the router's weights);
2 threads; no environment variables. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from dynprune.eval.report import machine_description
from dynprune.eval.timing import time_blocks
from transformers import AutoModelForSequenceClassification

import dynprune
from dynprune.assets import minilm_path
from dynprune.exec import engine_for
from dynprune.exec.graph_surgery import keep_only
from dynprune.exec.onnx_pieces import sliced_layers_model
from dynprune.exec.ort_engine import SessionFactory
from dynprune.routing import spendable


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    """An ORT session with the engine's thread settings, ORT's default spinning (time_blocks pauses)."""
    return SessionFactory(threads, spinning="on")(model)


def interleaved(variants: dict, rounds: int, calls: int) -> dict[str, float]:
    """Median ms per call of each variant, a list of (session, feed) taken in turn, one per call
    (eval.timing.time_blocks: interleaved blocks of ``calls`` calls, ``rounds`` rounds)."""

    def cycle(runs: list) -> Any:
        turn = itertools.cycle(runs)

        def call() -> Any:
            session, feed = next(turn)
            return session.run(None, feed)

        return call

    stats = time_blocks({k: cycle(v) for k, v in variants.items()}, warmup=5, repeats=rounds, block=calls,
                        pause_s=0.02, inference=False)  # fmt: skip
    return {k: v.median_ms for k, v in stats.items()}


def layer_feed(x: np.ndarray, counts: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    feed = {"x": x, "mask": np.ones(x.shape[:2], np.int32)}
    for j, (h, s) in enumerate(counts):
        feed[f"l{j}_heads"], feed[f"l{j}_slices"] = np.array(h, np.int64), np.array(s, np.int64)
        feed[f"l{j}_keep"] = np.array(True)
    return feed


def count_vectors(n_layers: int, units: int, per_layer: int, k: int, rng: np.random.Generator) -> list:
    """``k`` count vectors with ``per_layer`` heads and slices per layer on average (±2), every vector
    with the same totals."""
    out = []
    for _ in range(k):
        vec = []
        for _kind in range(2):
            c = np.clip(per_layer + rng.integers(-2, 3, n_layers), 0, units)
            c[-1] = np.clip(c[-1] + per_layer * n_layers - c.sum(), 0, units)
            vec.append(c)
        out.append(list(zip(vec[0].tolist(), vec[1].tolist(), strict=True)))
    return out


def front_only(front: onnx.ModelProto, fed: bool) -> onnx.ModelProto:
    """The exported front with the layers' placeholder replaced by an identity; ``fed``: the counts
    come from a graph input instead of the routing nodes (which are then pruned away)."""
    m = onnx.ModelProto()
    m.CopyFrom(front)
    place = next(n for n in m.graph.node if n.op_type == "GatedLayers")
    counts = "given_counts" if fed else place.input[2]
    if fed:
        m.graph.input.append(
            onnx.helper.make_tensor_value_info("given_counts", onnx.TensorProto.INT64, [1, None, 3])
        )
    at = list(m.graph.node).index(place)
    del m.graph.node[at]
    m.graph.node.insert(at, onnx.helper.make_node("Identity", [place.input[0]], [place.output[0]]))
    m.graph.node.insert(at + 1, onnx.helper.make_node("Identity", [counts], ["counts_out"]))
    m.graph.output.append(onnx.helper.make_tensor_value_info("counts_out", onnx.TensorProto.INT64, None))
    keep = [o for o in m.opset_import if o.domain != "dynprune"]
    del m.opset_import[:]
    m.opset_import.extend(keep)
    return keep_only(m, ["output", "counts_out"])


def measure(
    gated: dynprune.GatedModel,
    seq: int,
    budget: float,
    vectors: int = 8,
    threads: int = 2,
    rounds: int = 11,
    calls: int = 40,
) -> dict[str, float]:
    """Median ms per call of every variant (see the module docstring) for ``gated`` (eval mode, batch 1,
    ``seq`` tokens); raises AssertionError if the If tree and the sliced layers disagree."""
    inputs = {
        "input_ids": torch.randint(3, 100, (1, seq)),
        "attention_mask": torch.ones(1, seq, dtype=torch.long),
        "token_type_ids": torch.zeros(1, seq, dtype=torch.long),
    }
    with torch.no_grad():
        gated(**inputs, budget=budget)
    engine = engine_for(gated, torch.device("cpu"))
    if engine is None:
        raise SystemExit(
            "this model does not run on the CPU engine (pip install 'dynprune[onnx]'; BERT-family encoders)"
        )
    whole = engine.whole()
    layers = whole.layers
    n_layers, units = len(layers.layers), layers.n_heads
    if layers.n_slices != units:
        raise SystemExit(
            f"the count vectors assume as many FFN slices as heads ({layers.n_slices} vs {units})"
        )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, seq, layers.weights(layers.layers)[0].hidden)).astype(np.float32)
    chosen = count_vectors(n_layers, units, max(1, round(budget * units)), vectors, rng)

    tree = session(layers.gated_graph(), threads)
    one = chosen[0]
    sliced = session(
        sliced_layers_model(layers.weights(layers.layers), layers.slice_size, [(1, h, s) for h, s in one]),
        threads,
    )
    sliced_feed = {"x": x, "mask": np.ones((1, seq), np.int32)}
    gap = np.abs(tree.run(None, layer_feed(x, one))[0] - sliced.run(None, sliced_feed)[0]).max()
    assert gap < 1e-4, f"the If tree and the sliced layers disagree by {gap}"
    feeds = [layer_feed(x, v) for v in chosen]
    t = interleaved(
        {
            "if_tree_one_vector": [(tree, feeds[0])],
            "sliced_one_vector": [(sliced, sliced_feed)],
            "if_tree_switching": [(tree, f) for f in feeds],
            **{f"vector{i}": [(tree, f)] for i, f in enumerate(feeds)},  # each in a block of its own
        },
        rounds,
        calls,
    )
    t["if_tree_each_repeated"] = float(np.mean([t.pop(f"vector{i}") for i in range(len(feeds))]))

    tokens = whole.tokens(inputs, seq)
    available = float(spendable(gated, torch.tensor([budget], dtype=torch.float64), seq)[0])
    routed = session(front_only(whole.front(), fed=False), threads)
    fed = session(front_only(whole.front(), fed=True), threads)
    names = {i.name for i in routed.get_inputs()}
    routed_feed = {k: v for k, v in whole.feed(tokens, budget, available, seq).items() if k in names}
    routed_out, counts = routed.run(None, routed_feed)
    fed_feed = {i.name: tokens[i.name] for i in fed.get_inputs() if i.name in tokens}
    fed_feed["given_counts"] = counts
    assert np.array_equal(fed.run(None, fed_feed)[0], routed_out), "the fed front computes something else"
    t.update(
        interleaved(
            {"front_routed": [(routed, routed_feed)], "front_fed": [(fed, fed_feed)]}, rounds, calls * 5
        )
    )
    t["routing"] = t["front_routed"] - t["front_fed"]
    return t


def table(t: dict[str, float], seq: int, budget: float, vectors: int, threads: int) -> str:
    lines = [
        f"# If tree vs sliced layers, switching count vectors, routing (MiniLM, 1 x {seq}, budget {budget})",
        "",
        f"Machine: {machine_description()}; ORT {threads} threads, onnxruntime {ort.__version__}, torch {torch.__version__}; "
        f"`python scripts/bench_if_tree.py --seq {seq} --budget {budget} --vectors {vectors}` (interleaved "
        "blocks, medians).",
        "",
        "| what | ms per call | ratio |",
        "|---|---|---|",
        f"| sliced layers, one count vector | {t['sliced_one_vector']:.3f} | 1.00 |",
        f"| If-tree layers, the same vector | {t['if_tree_one_vector']:.3f} | "
        f"{t['if_tree_one_vector'] / t['sliced_one_vector']:.2f} × sliced |",
        f"| If-tree layers, {vectors} vectors (same FLOPs), each in blocks of its own (mean) | "
        f"{t['if_tree_each_repeated']:.3f} | 1.00 |",
        f"| If-tree layers, cycling through the {vectors} vectors | {t['if_tree_switching']:.3f} | "
        f"{t['if_tree_switching'] / t['if_tree_each_repeated']:.2f} × repeated |",
        f"| front (embeddings, router, selection, head), routed | {t['front_routed']:.3f} | |",
        f"| front given the counts (no routing nodes) | {t['front_fed']:.3f} | |",
        f"| routing alone (difference) | {t['routing']:.3f} | {t['routing'] / t['if_tree_switching']:.1%} of the "
        "switching layers |",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--vectors", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.seq < 1 or args.vectors < 2 or args.threads < 1 or not 0 < args.budget <= 1:
        raise SystemExit("--seq >= 1, --vectors >= 2, --threads >= 1 and 0 < --budget <= 1")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
    gated = dynprune.wrap(model, dynprune.GateConfig()).eval()
    text = table(
        measure(gated, args.seq, args.budget, args.vectors, args.threads),
        args.seq,
        args.budget,
        args.vectors,
        args.threads,
    )
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
