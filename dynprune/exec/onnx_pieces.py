"""ONNX graphs of the pieces of a post-LN encoder layer with k kept units (built with onnx.helper).

A gated layer keeps, per sample, a prefix of its (importance-ordered) heads
and FFN slices. For each count ``k`` the engine (:mod:`dynprune.exec.ort_engine`)
runs a small static graph holding only the kept units' weights (copies of the
prefix rows/columns, so ONNX Runtime pre-packs them like any dense model):

- ``attention_piece``: ``y = LN1(x + b_O + Attention_k(x) @ W_O[:, :k*d]ᵀ)`` for x (n, T, H)
  and an int32 key mask (n, T) (1 = real token); ``k = 0`` gives ``LN1(x + b_O)``;
- ``ffn_piece``: ``y = LN2(h + b_down + act(h @ W_up[:k*s]ᵀ + b_up) @ W_down[:, :k*s]ᵀ)``;
- ``layer_piece``: both in one graph (one call instead of two);
- ``model_piece``: every gated layer with its own counts in one graph (one call per forward).

Attention uses ONNX Runtime's fused ``com.microsoft.Attention`` operator (Q/K/V
in one GEMM, softmax and context in one kernel), LayerNorm the standard
``LayerNormalization`` (opset 17), GELU ``com.microsoft.BiasGelu`` (bias + exact
erf GELU in one op; ``FastGelu`` for the tanh approximation, ``Relu`` for ReLU).
Batch and sequence axes are dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """A tiny helper collecting nodes and initializers of one graph."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.nodes, self.inits, self._n = prefix, [], [], 0
        # op outputs are numbered over the whole graph; initializer names carry the layer prefix

    def init(self, name: str, value: np.ndarray) -> str:
        full = f"{self.prefix}{name}"
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), full))
        return full

    def op(self, op_type: str, inputs: list[str], domain: str = "", **attrs) -> str:
        self._n += 1
        out = f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], domain=domain, **attrs))
        return out


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


def _model(g: _Graph, inputs: list, out: str, hidden: int) -> onnx.ModelProto:
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "t", hidden])
    nodes = [*g.nodes, helper.make_node("Identity", [out], ["y"])]
    graph = helper.make_graph(nodes, "piece", inputs, [y], g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="dynprune")


def _x_input(name: str, hidden: int):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", "t", hidden])


def _mask_input():
    return helper.make_tensor_value_info("mask", TensorProto.INT32, ["n", "t"])


def attention_piece(lw: LayerWeights, k: int) -> onnx.ModelProto:
    """Graph (x (n,T,H) float, mask (n,T) int32) -> y = LN1(x + b_O + attention of heads 0:k)."""
    g = _Graph("")
    inputs = [_x_input("x", lw.hidden)] + ([_mask_input()] if k else [])
    return _model(g, inputs, _attention(g, "x", "mask", lw, k), lw.hidden)


def ffn_piece(lw: LayerWeights, k_slices: int, slice_size: int) -> onnx.ModelProto:
    """Graph (x (n,T,H)) -> y = LN2(x + b_down + FFN of slices 0:k)."""
    g = _Graph("")
    return _model(g, [_x_input("x", lw.hidden)], _ffn(g, "x", lw, k_slices * slice_size), lw.hidden)


def layer_piece(lw: LayerWeights, k_heads: int, k_slices: int, slice_size: int) -> onnx.ModelProto:
    """Graph (x, mask) -> the whole layer with heads 0:k_heads and slices 0:k_slices."""
    g = _Graph("")
    inputs = [_x_input("x", lw.hidden)] + ([_mask_input()] if k_heads else [])
    h = _attention(g, "x", "mask", lw, k_heads)
    return _model(g, inputs, _ffn(g, h, lw, k_slices * slice_size), lw.hidden)


def model_piece(
    lws: list[LayerWeights], counts: list[tuple[int, int] | None], slice_size: int
) -> onnx.ModelProto:
    """Graph (x, mask) -> all ``lws`` layers in a row, layer j keeping ``counts[j]`` = (heads, slices)
    or skipped (None): one static graph of the kept units, like a physically sliced model."""
    g = _Graph("")
    y = "x"
    for j, (lw, c) in enumerate(zip(lws, counts)):
        if c is None:
            continue
        g.prefix = f"l{j}_"
        h = _attention(g, y, "mask", lw, c[0])
        y = _ffn(g, h, lw, c[1] * slice_size)
    g.prefix = ""
    uses_mask = any(c is not None and c[0] > 0 for c in counts)
    inputs = [_x_input("x", lws[0].hidden)] + ([_mask_input()] if uses_mask else [])
    return _model(g, inputs, y, lws[0].hidden)
