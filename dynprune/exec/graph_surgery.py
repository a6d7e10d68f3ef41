"""ONNX graph surgery for the whole-forward graph (:mod:`dynprune.exec.whole_graph`): the exported
front's placeholder node ``dynprune::GatedLayers(hidden, mask, counts)`` replaced by a layers graph
of :mod:`dynprune.exec.onnx_pieces` (inputs ``x``, ``mask`` [and per-layer counts], output ``y``),
and the graph cut down to the outputs a session needs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PLACEHOLDER = "GatedLayers"
DOMAIN = "dynprune"


def splice_layers(
    front: onnx.ModelProto, layers: onnx.ModelProto, n_layers: int, layer_gates: bool, counted: bool = True
) -> onnx.ModelProto:
    """``front`` with its placeholder node replaced by the layers graph ``layers`` (inputs ``x``,
    ``mask`` and, when ``counted``, ``l{j}_heads`` / ``l{j}_slices`` / ``l{j}_keep``, fed from the
    placeholder's counts; output ``y``). The counts of the batch's first sample drive every sample:
    callers run batches whose samples share one count vector (batch 1)."""
    nodes = list(front.graph.node)
    at = [i for i, n in enumerate(nodes) if n.domain == DOMAIN and n.op_type == PLACEHOLDER]
    if len(at) != 1:
        raise ValueError(f"the exported front has {len(at)} {PLACEHOLDER} nodes, expected 1")
    place = nodes[at[0]]
    hidden, mask, counts = place.input
    flat = "dynprune_counts_flat"
    consts: list[onnx.NodeProto] = []

    def _const(name: str, value: np.ndarray) -> str:
        consts.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        return name

    bridge = [
        helper.make_node("Identity", [hidden], ["x"]),
        helper.make_node("Cast", [mask], ["mask"], to=TensorProto.INT32),
    ]
    if counted:
        bridge.append(
            helper.make_node(
                "Gather",
                [counts, _const("dynprune_row0", np.array(0, dtype=np.int64))],
                ["dynprune_counts0"],
                axis=0,
            )
        )
        bridge.append(
            helper.make_node("Reshape", ["dynprune_counts0", _const("dynprune_flat", np.array([-1]))], [flat])
        )
    for j in range(n_layers if counted else 0):
        for k, name in enumerate(("keep", "heads", "slices")):
            if name == "keep" and not layer_gates:
                continue
            index = _const(f"dynprune_at_{j}_{k}", np.array(3 * j + k, dtype=np.int64))
            target = f"l{j}_{name}"
            picked = f"{target}_i64" if name == "keep" else target
            bridge.append(helper.make_node("Gather", [flat, index], [picked], axis=0))
            if name == "keep":
                bridge.append(helper.make_node("Cast", [picked], [target], to=TensorProto.BOOL))
    tail = [helper.make_node("Identity", ["y"], [place.output[0]])]
    merged = [*nodes[: at[0]], *consts, *bridge, *layers.graph.node, *tail, *nodes[at[0] + 1 :]]
    _check_names(front, layers)
    graph = helper.make_graph(
        merged,
        "dynprune_gated_forward",
        list(front.graph.input),
        list(front.graph.output),
        [*front.graph.initializer, *layers.graph.initializer],
    )
    opsets = {o.domain: o.version for o in layers.opset_import}
    opsets.update({o.domain: o.version for o in front.opset_import if o.domain != DOMAIN})
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()], producer_name="dynprune"
    )
    model.ir_version = front.ir_version
    return model


def _names(graph: onnx.GraphProto) -> set[str]:
    out = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    for node in graph.node:
        out.update(node.output)
    return out


def _check_names(front: onnx.ModelProto, layers: onnx.ModelProto) -> None:
    clash = (_names(front.graph) & _names(layers.graph)) - {"x", "mask"}
    if clash:
        raise ValueError(
            f"tensor names used by both the exported front and the layers graph: {sorted(clash)[:5]}"
        )


def keep_only(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """``model`` reduced to what computes ``outputs``: other nodes, graph inputs and initializers are
    dropped (ONNX Runtime would ask for every graph input). Nodes with subgraphs count the names
    their subgraphs read from the enclosing graph."""
    graph = model.graph
    needed = set(outputs)
    kept = []
    for node in reversed(graph.node):
        if not needed.intersection(node.output):
            continue
        kept.append(node)
        needed.update(node.input)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                needed.update(_outer_reads(attr.g))
    kept.reverse()
    new = helper.make_graph(
        kept,
        graph.name,
        [i for i in graph.input if i.name in needed],
        [o for o in graph.output if o.name in outputs],
        [t for t in graph.initializer if t.name in needed],
    )
    out = helper.make_model(new, opset_imports=list(model.opset_import), producer_name=model.producer_name)
    out.ir_version = model.ir_version
    return out


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    made = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    reads: set[str] = set()
    for node in graph.node:
        reads.update(i for i in node.input if i and i not in made)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                reads.update(_outer_reads(attr.g) - made)
        made.update(node.output)
    return reads
