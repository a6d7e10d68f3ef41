"""The ONNX graph of a model's gated encoder layers for any kept counts (built with onnx.helper).

A gated layer keeps, per sample, a prefix of its (importance-ordered) heads and FFN
slices. The engine (:mod:`dynprune.exec.ort_engine`) runs one graph,
:func:`gated_layers_model`, whose per-layer head / slice counts are int64 scalar inputs:

- per layer and count ``k`` a leaf holds exactly the kept units' weights (copies of the
  prefix rows / columns, so ONNX Runtime pre-packs them like any dense model's):
  attention ``LN1(x + b_O + Attention_k(x) @ W_O[:, :k*d]ᵀ)`` for x (n, T, H) and an int32
  key mask (n, T) (1 = real token; ``k = 0`` gives ``LN1(x + b_O)``), FFN
  ``LN2(h + b_down + act(h @ W_up[:k*s]ᵀ + b_up) @ W_down[:, :k*s]ᵀ)``;
- a balanced tree of ``If`` nodes on the count picks the leaf (only the taken branch runs),
  and an ``If`` on ``l{j}_keep`` skips a whole layer.

So every count vector runs the graph of a physically sliced model, in one ORT call on
one thread pool. Measured on MiniLM (results/cpu_bench/ENGINES.md): 0.85–1.0× the time
of the sliced model's own graph, where weights fed as graph inputs (no pre-packing)
ran at 0.63–0.75× at batch 1. The price is memory: the leaves hold (n_units + 1) / 2
copies of the layers' weights (MiniLM: 277 MB), written to an external-data file.

Attention uses ONNX Runtime's fused ``com.microsoft.Attention`` operator (Q/K/V
in one GEMM, softmax and context in one kernel), LayerNorm the standard
``LayerNormalization`` (opset 17), GELU ``com.microsoft.BiasGelu`` (bias + exact
erf GELU in one op; ``FastGelu`` for the tanh approximation, ``Relu`` for ReLU).
Batch and sequence axes are dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
MS = "com.microsoft"

#: HF ``hidden_act`` names -> how the FFN activation is built (see _activation)
ACTIVATIONS = {"gelu": "BiasGelu", "gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu", "relu": "Relu"}


@dataclass
class LayerWeights:
    """One layer's weights as numpy fp32 (torch layout: Linear weight = (out, in)), units in kept order."""

    q_w: np.ndarray  # (nh*d, H)
    q_b: np.ndarray  # (nh*d,)
    k_w: np.ndarray
    k_b: np.ndarray
    v_w: np.ndarray
    v_b: np.ndarray
    o_w: np.ndarray  # (H, nh*d)
    o_b: np.ndarray  # (H,)
    ln1_w: np.ndarray
    ln1_b: np.ndarray
    ln1_eps: float
    up_w: np.ndarray  # (F, H)
    up_b: np.ndarray  # (F,)
    down_w: np.ndarray  # (H, F)
    down_b: np.ndarray  # (H,)
    ln2_w: np.ndarray
    ln2_b: np.ndarray
    ln2_eps: float
    n_heads: int
    head_dim: int
    act: str  # a key of ACTIVATIONS

    @property
    def hidden(self) -> int:
        return int(self.o_b.shape[0])


class _Graph:
    """Collects the nodes and initializers of one graph (or If branch) of a model being built.

    Op outputs are numbered over the whole model (``counter``, shared with every branch
    built by :meth:`branch`), so names never clash across nested graphs; initializer names
    carry ``prefix``. With ``external`` the initializers' bytes go to that file (ONNX
    external data) instead of the protobuf: a model of several hundred MB is never held
    in memory twice.
    """

    def __init__(
        self, prefix: str = "", counter: list[int] | None = None, external: ExternalData | None = None
    ):
        self.prefix, self.nodes, self.inits = prefix, [], []
        self.counter = counter if counter is not None else [0]
        self.external = external

    def branch(self) -> _Graph:
        return _Graph(self.prefix, self.counter, self.external)

    def init(self, name: str, value: np.ndarray, dtype: type = np.float32) -> str:
        full = f"{self.prefix}{name}"
        array = np.asarray(value, dtype=dtype)
        if self.external is not None and array.size >= 1024:
            self.inits.append(self.external.tensor(full, array))
        else:
            self.inits.append(
                numpy_helper.from_array(np.ascontiguousarray(array) if array.ndim else array, full)
            )
        return full

    def fresh(self, stem: str) -> str:
        self.counter[0] += 1
        return f"{stem}_{self.counter[0]}"

    def op(self, op_type: str, inputs: list[str], domain: str = "", **attrs) -> str:
        out = self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], domain=domain, **attrs))
        return out

    def as_branch(self, out: str, name: str) -> onnx.GraphProto:
        """This builder's nodes as an If branch with the single output ``out``."""
        result = self.fresh(f"{name}_out")
        nodes = [*self.nodes, helper.make_node("Identity", [out], [result])]
        value = helper.make_tensor_value_info(result, TensorProto.FLOAT, None)
        return helper.make_graph(nodes, name, [], [value], self.inits)


class ExternalData:
    """Initializer bytes written to one file beside the model (ONNX external data)."""

    def __init__(self, path: Path) -> None:
        self.path, self._file, self._offset = path, path.open("wb"), 0

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        data = np.ascontiguousarray(array).tobytes()
        pad = -self._offset % 64  # aligned offsets let ONNX Runtime map the file
        self._file.write(b"\0" * pad)
        self._offset += pad
        t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        t.dims.extend(array.shape)
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", self._offset), ("length", len(data))):
            t.external_data.add(key=key, value=str(value))
        self._file.write(data)
        self._offset += len(data)
        return t

    def close(self) -> None:
        self._file.close()


def _layer_norm(g: _Graph, x: str, w: np.ndarray, b: np.ndarray, eps: float, name: str) -> str:
    return g.op(
        "LayerNormalization", [x, g.init(f"{name}_w", w), g.init(f"{name}_b", b)], axis=-1, epsilon=eps
    )


def _attention(g: _Graph, x: str, mask: str, lw: LayerWeights, k: int) -> str:
    """LN1(x + b_O [+ attention of the first k heads]) -> name of the (n, T, H) result."""
    acc_bias = g.init("o_b", lw.o_b)
    if k == 0:
        return _layer_norm(g, g.op("Add", [x, acc_bias]), lw.ln1_w, lw.ln1_b, lw.ln1_eps, "ln1")
    width = k * lw.head_dim
    w_qkv = np.concatenate([lw.q_w[:width], lw.k_w[:width], lw.v_w[:width]], axis=0).T  # (H, 3*k*d)
    b_qkv = np.concatenate([lw.q_b[:width], lw.k_b[:width], lw.v_b[:width]])
    ctx = g.op(
        "Attention",
        [x, g.init("qkv_w", w_qkv), g.init("qkv_b", b_qkv), mask],
        domain=MS,
        num_heads=k,
        qkv_hidden_sizes=[width, width, width],
    )  # (n, T, k*d)
    proj = g.op("MatMul", [ctx, g.init("o_w", lw.o_w[:, :width].T)])  # (n, T, H)
    return g.op(
        "SkipLayerNormalization",
        [proj, x, g.init("ln1_w", lw.ln1_w), g.init("ln1_b", lw.ln1_b), acc_bias],
        domain=MS,
        epsilon=lw.ln1_eps,
    )


def _ffn(g: _Graph, h: str, lw: LayerWeights, cols: int) -> str:
    """LN2(h + b_down [+ FFN of the first ``cols`` intermediate columns])."""
    acc_bias = g.init("down_b", lw.down_b)
    if cols == 0:
        return _layer_norm(g, g.op("Add", [h, acc_bias]), lw.ln2_w, lw.ln2_b, lw.ln2_eps, "ln2")
    up = g.op("MatMul", [h, g.init("up_w", lw.up_w[:cols].T)])  # (n, T, cols)
    b_up = g.init("up_b", lw.up_b[:cols])
    kind = ACTIVATIONS[lw.act]
    if kind == "Relu":
        inter = g.op("Relu", [g.op("Add", [up, b_up])])
    else:
        inter = g.op(kind, [up, b_up], domain=MS)
    down = g.op("MatMul", [inter, g.init("down_w", lw.down_w[:, :cols].T)])  # (n, T, H)
    return g.op(
        "SkipLayerNormalization",
        [down, h, g.init("ln2_w", lw.ln2_w), g.init("ln2_b", lw.ln2_b), acc_bias],
        domain=MS,
        epsilon=lw.ln2_eps,
    )


def _switch(g: _Graph, count: str, lo: int, hi: int, leaf, tag: str) -> str:
    """Emit into ``g`` the value ``leaf(g', k)`` for ``k = count`` (an int64 scalar input) in [lo, hi):
    a balanced tree of ``If`` nodes on ``count < mid``; only the taken branch runs, and every leaf
    holds its own initializers (so ONNX Runtime pre-packs each count's weights)."""
    if hi - lo == 1:
        return leaf(g, lo)
    mid = (lo + hi) // 2
    cond = g.op("Less", [count, g.init(f"{tag}_mid{lo}_{hi}", mid, np.int64)])
    branches = []
    for a, b in ((lo, mid), (mid, hi)):
        sub = g.branch()
        branches.append(sub.as_branch(_switch(sub, count, a, b, leaf, tag), f"{tag}_{a}_{b}"))
    out = g.fresh("switch")
    g.nodes.append(helper.make_node("If", [cond], [out], then_branch=branches[0], else_branch=branches[1]))
    return out


def _gated_layer(g: _Graph, y: str, lw: LayerWeights, j: int, n_slices: int, slice_size: int) -> str:
    """Layer ``j`` with its head count ``l{j}_heads`` and FFN slice count ``l{j}_slices`` (inputs)."""

    def attention(leaf: _Graph, k: int) -> str:
        leaf.prefix = f"l{j}_h{k}_"
        return _attention(leaf, y, "mask", lw, k)

    h = _switch(g, f"l{j}_heads", 0, lw.n_heads + 1, attention, f"l{j}_h")

    def ffn(leaf: _Graph, k: int) -> str:
        leaf.prefix = f"l{j}_f{k}_"
        return _ffn(leaf, h, lw, k * slice_size)

    return _switch(g, f"l{j}_slices", 0, n_slices + 1, ffn, f"l{j}_f")


def gated_layers_model(
    lws: list[LayerWeights], slice_size: int, layer_gates: bool, external: ExternalData | None = None
) -> onnx.ModelProto:
    """One graph running every layer of ``lws`` with any kept counts (the engine's one session).

    Inputs: ``x`` (n, T, H) float, ``mask`` (n, T) int32, and per layer j the int64 scalars
    ``l{j}_heads`` (0..n_heads) and ``l{j}_slices`` (0..n_slices), plus the bool scalar
    ``l{j}_keep`` when ``layer_gates`` (False: the layer passes x through). Every (layer, kind,
    count) is a leaf of an If tree holding exactly the kept units' weights, so any count
    vector runs the graph of a physically sliced model with one ORT call; memory is
    (n_units + 1) / 2 times the layers' weights.
    """
    g = _Graph(external=external)
    hidden = lws[0].hidden
    n_slices = lws[0].up_b.shape[0] // slice_size
    inputs = [_x_input("x", hidden), _mask_input()]
    y = "x"
    for j, lw in enumerate(lws):
        inputs += [_scalar(f"l{j}_heads", TensorProto.INT64), _scalar(f"l{j}_slices", TensorProto.INT64)]
        if not layer_gates:
            y = _gated_layer(g, y, lw, j, n_slices, slice_size)
            continue
        inputs.append(_scalar(f"l{j}_keep", TensorProto.BOOL))
        run = g.branch()
        then_branch = run.as_branch(_gated_layer(run, y, lw, j, n_slices, slice_size), f"l{j}_run")
        skip = g.branch()
        else_branch = skip.as_branch(y, f"l{j}_skip")
        y = g.fresh("layer")
        g.nodes.append(
            helper.make_node("If", [f"l{j}_keep"], [y], then_branch=then_branch, else_branch=else_branch)
        )
    return _model(g, inputs, y, hidden)


def dense_layers_model(lws: list[LayerWeights], slice_size: int) -> onnx.ModelProto:
    """Graph (x, mask) -> every layer of ``lws`` dense (the layers before the router)."""
    full = [(1, lw.n_heads, lw.up_b.shape[0] // slice_size) for lw in lws]
    return sliced_layers_model(lws, slice_size, full)


def sliced_layers_model(
    lws: list[LayerWeights],
    slice_size: int,
    counts: list[tuple[int, int, int]],
    external: ExternalData | None = None,
) -> onnx.ModelProto:
    """Graph (x, mask) -> the layers of ``lws`` with fixed kept counts (keep, heads, slices) per layer:
    a physically sliced model's graph (no If nodes; skipped layers left out)."""
    g = _Graph(external=external)
    y = "x"
    for j, (lw, (keep, heads, slices)) in enumerate(zip(lws, counts, strict=True)):
        if not keep:
            continue
        g.prefix = f"l{j}_"
        h = _attention(g, y, "mask", lw, int(heads))
        y = _ffn(g, h, lw, int(slices) * slice_size)
    return _model(g, [_x_input("x", lws[0].hidden), _mask_input()], y, lws[0].hidden)


def _model(g: _Graph, inputs: list, out: str, hidden: int) -> onnx.ModelProto:
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "t", hidden])
    nodes = [*g.nodes, helper.make_node("Identity", [out], ["y"])]
    graph = helper.make_graph(nodes, "dynprune_layers", inputs, [y], g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="dynprune")


def _x_input(name: str, hidden: int):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", "t", hidden])


def _mask_input():
    return helper.make_tensor_value_info("mask", TensorProto.INT32, ["n", "t"])


def _scalar(name: str, dtype: int):
    return helper.make_tensor_value_info(name, dtype, [])
