"""The whole gated forward of an encoder classifier as one ONNX graph (batch 1, cap budgets).

At batch 1 the engine's layers (:mod:`dynprune.exec.ort_engine`) ran about as fast as
a physically sliced model, but the PyTorch ops around them — embeddings, router,
selection, task head and the HF model's Python plumbing — took 1.7–2.5 ms of a
3.5–5.9 ms forward on MiniLM (docs/cpu_engine.md). This module removes them from
the per-call path: one ONNX Runtime call runs

    embeddings -> router -> selection (per-layer kept counts) -> gated layers -> task head

and returns the logits and the counts. It is built from the same code that runs in
PyTorch, not a second copy:

- the HF model's own forward, the router (:class:`dynprune.router.Router`) and the
  selection (:func:`dynprune.gates.select_under_budget`) are exported with
  ``torch.onnx.export`` (TorchScript exporter); the encoder is replaced during the
  export by a placeholder node ``dynprune::GatedLayers(hidden, mask, counts)``;
- the placeholder is then replaced by the engine's If-tree graph of the gated layers
  (:func:`dynprune.exec.onnx_pieces.gated_layers_model`), fed the counts.

FLOPs numbers stay on the host (:class:`dynprune.flops.FlopsModel`): the graph takes
the FLOPs each sample may spend in the gated layers (``available``) and the cost of one
head and one FFN slice at this length as inputs, so its sequence axis stays dynamic.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from dynprune.gates import UnitMasks, select_under_budget
from dynprune.state import ForwardInfo

Tensor = torch.Tensor

PLACEHOLDER = "GatedLayers"
DOMAIN = "dynprune"
#: graph inputs besides the token inputs, in this order
ROUTING_INPUTS = ("router_budget", "available", "head_cost", "slice_cost")


class _Placeholder(torch.autograd.Function):
    """Stands for the gated layers during the export: ``dynprune::GatedLayers(hidden, mask, counts)``."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, mask: Tensor, counts: Tensor) -> Tensor:
        return hidden.clone()

    @staticmethod
    def symbolic(g: Any, hidden: Any, mask: Any, counts: Any) -> Any:
        out = g.op(f"{DOMAIN}::{PLACEHOLDER}", hidden, mask, counts)
        out.setType(hidden.type())
        return out


class _RoutedEncoder(nn.Module):
    """The encoder during the export: routes on its input (the embeddings' output) and hands the
    counts to the placeholder. ``feed`` = (attention mask, router budget, available, head cost,
    slice cost), set by :class:`_ExportForward` before the HF forward."""

    def __init__(self, gated: Any) -> None:
        super().__init__()
        object.__setattr__(self, "gated", gated)  # not a submodule
        self.feed: tuple[Tensor, ...] | None = None
        self.counts: Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions as Output

        hidden_states = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))  # DistilBERT: x=
        assert self.feed is not None
        mask = self.feed[0]
        self.counts = route_counts(self.gated, hidden_states, *self.feed)
        return Output(last_hidden_state=_Placeholder.apply(hidden_states, mask, self.counts))


def route_counts(
    gated: Any,
    hidden: Tensor,
    mask: Tensor,
    router_budget: Tensor,
    available: Tensor,
    head_cost: Tensor,
    slice_cost: Tensor,
) -> Tensor:
    """Router logits -> the selection under each sample's cap -> (B, L, 3) kept counts: the
    routing of :func:`dynprune.routing.route` in eval mode, in exportable form (costs as tensors)."""
    scores = gated.router(hidden, mask, router_budget)
    seq = hidden.shape[1]  # unused by the selection when costs are given
    masks = select_under_budget(scores, available, gated.flops, seq, costs=(head_cost, slice_cost))
    return masks.counts()


class _RoutingOnly(nn.Module):
    """(router input, mask, routing inputs) -> counts: the routing part of the whole graph alone,
    to time what routing costs on ONNX Runtime (``dynprune bench cpu``'s ``router_ms``)."""

    def __init__(self, gated: Any) -> None:
        super().__init__()
        self.gated = gated

    def forward(self, hidden: Tensor, mask: Tensor, *routing: Tensor) -> Tensor:
        return route_counts(self.gated, hidden, mask, *routing)


class _ExportForward(nn.Module):
    """(token inputs, routing inputs) -> (task output, counts): the HF forward with the encoder
    replaced by :class:`_RoutedEncoder`."""

    def __init__(self, gated: Any, token_inputs: tuple[str, ...], owner: nn.Module, slot: str) -> None:
        super().__init__()
        self.gated = gated  # a submodule: its parameters become the graph's initializers
        self.token_inputs = token_inputs
        self.encoder = _RoutedEncoder(gated)
        object.__setattr__(self, "owner", owner)
        self.slot = slot

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        tokens = dict(zip(self.token_inputs, inputs[: len(self.token_inputs)], strict=True))
        self.encoder.feed = (tokens["attention_mask"], *inputs[len(self.token_inputs) :])
        original = self.owner._modules[self.slot]
        self.owner._modules[self.slot] = self.encoder
        try:
            out = self.gated.model(**tokens)
        finally:
            self.owner._modules[self.slot] = original
        self.output_type, self.output_key = type(out), next(iter(out.keys()))  # rebuilt by the caller
        return out[0], self.encoder.counts


@contextmanager
def _stable_argsort() -> Iterator[None]:
    """``torch.argsort(..., stable=True)`` exported as ONNX ``TopK`` over the whole axis (TopK breaks
    ties by the lower index, the same order as a stable sort); the TorchScript exporter has no
    symbolic for the stable overload. Registered for the duration of one export."""
    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "b", "i", "b")
    def argsort(g: Any, x: Any, stable: bool, dim: int, descending: bool) -> Any:
        length = g.op("Gather", g.op("Shape", x), g.op("Constant", value_t=torch.tensor([dim])), axis_i=0)
        _, indices = g.op("TopK", x, length, axis_i=dim, largest_i=int(descending), sorted_i=1, outputs=2)
        return indices

    torch.onnx.register_custom_op_symbolic("aten::argsort", argsort, 17)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::argsort", 17)


def _routing_example(gated: Any, seq: int) -> tuple[Tensor, ...]:
    fm = gated.flops
    return (
        torch.ones(1),
        torch.tensor([0.5 * fm.dense(seq) - fm.fixed(seq)], dtype=torch.float64),
        torch.tensor(fm.head_cost(seq), dtype=torch.float64),
        torch.tensor(fm.slice_cost(seq), dtype=torch.float64),
    )


def _export(
    module: nn.Module, args: tuple, names: list[str], outputs: list[str], axes: dict
) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), _stable_argsort():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, buf, input_names=names, output_names=outputs, dynamic_axes=axes,
            opset_version=17, dynamo=False, custom_opsets={DOMAIN: 1},
        )  # fmt: skip
    return onnx.load_from_string(buf.getvalue())


def export_routing(gated: Any) -> onnx.ModelProto:
    """The routing alone (:class:`_RoutingOnly`) as ONNX: inputs ``hidden`` (B, T, H), ``mask``
    (B, T) int64 and the routing inputs; output ``counts``."""
    seq = 8
    if gated.training:
        raise RuntimeError("the routing graph is built from a model in eval mode")
    args = (
        torch.zeros(1, seq, gated.parts.hidden),
        torch.ones(1, seq, dtype=torch.long),
        *_routing_example(gated, seq),
    )
    axes = {"hidden": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}, "router_budget": {0: "batch"}}
    axes["available"] = {0: "batch"}
    return _export(_RoutingOnly(gated).eval(), args, ["hidden", "mask", *ROUTING_INPUTS], ["counts"], axes)


def export_front(
    gated: Any, token_inputs: tuple[str, ...], owner: nn.Module, slot: str
) -> tuple[onnx.ModelProto, type, str]:
    """The gated forward with the placeholder for the gated layers, as ONNX (opset 17), and the HF
    output class and field the graph's ``output`` stands for (e.g. SequenceClassifierOutput.logits)."""
    seq = 8
    example = {
        "input_ids": torch.full((1, seq), 1, dtype=torch.long),
        "attention_mask": torch.ones(1, seq, dtype=torch.long),
        "token_type_ids": torch.zeros(1, seq, dtype=torch.long),
    }
    args = (*(example[n] for n in token_inputs), *_routing_example(gated, seq))
    axes = {n: {0: "batch", 1: "seq"} for n in token_inputs}
    axes.update({"router_budget": {0: "batch"}, "available": {0: "batch"}, "output": {0: "batch"}})
    if gated.training:
        raise RuntimeError("the whole-forward graph is built from a model in eval mode")
    module = _ExportForward(gated, token_inputs, owner, slot).eval()  # the export restores this mode
    model = _export(module, args, [*token_inputs, *ROUTING_INPUTS], ["output", "counts"], axes)
    return model, module.output_type, module.output_key


def splice_layers(
    front: onnx.ModelProto, layers: onnx.ModelProto, n_layers: int, layer_gates: bool
) -> onnx.ModelProto:
    """``front`` with its placeholder node replaced by the gated-layers graph ``layers`` (inputs
    ``x``, ``mask``, ``l{j}_heads`` / ``l{j}_slices`` / ``l{j}_keep``; output ``y``). The counts of
    the batch's first sample drive every sample: callers run batches whose samples share one
    count vector (batch 1)."""
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
        helper.make_node(
            "Gather",
            [counts, _const("dynprune_row0", np.array(0, dtype=np.int64))],
            ["dynprune_counts0"],
            axis=0,
        ),
        helper.make_node("Reshape", ["dynprune_counts0", _const("dynprune_flat", np.array([-1]))], [flat]),
    ]
    for j in range(n_layers):
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


class WholeForward:
    """One ORT session running a gated encoder's whole forward (see the module docstring).

    Built on first use from the engine's layers (:class:`~dynprune.exec.ort_engine.OrtLayers`:
    the same If-tree graph, thread pool settings and rebuild-on-new-weights rule) and
    rebuilt when any parameter of the model or router changes. :meth:`run` takes one
    sample's token inputs; the caller checks it can run them (:func:`dynprune.exec.whole_forward`).
    """

    def __init__(self, gated: Any, layers: Any, owner: nn.Module, slot: str) -> None:
        import inspect

        self.gated, self.layers, self.owner, self.slot = gated, layers, owner, slot
        accepted = inspect.signature(gated.model.forward).parameters
        self.token_inputs = tuple(
            n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted
        )
        self._params = list(gated.parameters())
        self._key: tuple | None = None
        self._session: Any = None
        self.output_type: type | None = None
        self.output_key = ""
        self.calls = 0  # forwards this session ran

    def warm(self) -> Any:
        """Build (or rebuild after the weights changed) the session; returns it."""
        key = tuple((p.data_ptr(), p._version) for p in self._params)
        if key != self._key or self._session is None:
            self._session = None
            self._session = self.layers.make_session.from_builder(self.graph)
            self._key = key
        return self._session

    def graph(self, external: Any = None) -> onnx.ModelProto:
        """The whole-forward graph at the current weights (the layers' weights written to ``external``)."""
        front, self.output_type, self.output_key = export_front(
            self.gated, self.token_inputs, self.owner, self.slot
        )
        layers = self.layers.gated_graph(external)
        return splice_layers(front, layers, len(self.layers.layers), self.layers.layer_gates)

    def run(
        self, tokens: dict[str, np.ndarray], router_budget: float, available: float, seq: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(task output (1, ...), counts (1, L, 3)) of one sample; ``tokens`` are int64 (1, T)."""
        fm = self.gated.flops
        feed = {
            **tokens,
            "router_budget": np.array([router_budget], dtype=np.float32),
            "available": np.array([available], dtype=np.float64),
            "head_cost": np.array(fm.head_cost(seq), dtype=np.float64),
            "slice_cost": np.array(fm.slice_cost(seq), dtype=np.float64),
        }
        output, counts = self.warm().run(None, feed)
        self.calls += 1
        return output, counts


def info_from_counts(gated: Any, budget: Tensor, seq: int, counts: Tensor, routed: bool) -> ForwardInfo:
    """``GatedModel.last`` of a whole-forward call, computed as :func:`dynprune.routing.route` does."""
    fm = gated.flops
    dense = fm.dense(seq)
    if not routed:  # budget 1.0: every unit ran, no router
        return ForwardInfo(budget, seq, dense, torch.full_like(budget, dense, dtype=torch.float64))
    masks = UnitMasks.from_counts(counts, gated.parts.n_heads, gated.n_slices)
    flops = fm.fixed(seq) + fm.gated_units(masks.head.double(), masks.ffn.double(), masks.layer.double(), seq)
    return ForwardInfo(budget, seq, dense, flops, gates=masks.to_gates(), masks=masks)


def routing_timer(whole: WholeForward, hidden: Tensor, mask: Tensor, budget: float) -> Any:
    """A no-argument callable running only the routing of ``whole``'s graph on ONNX Runtime (its own
    small session, the engine's thread settings) for one sample's router input ``hidden`` (1, T, H):
    what routing costs on the engine that runs it (an upper bound: one more session call)."""
    from dynprune.routing import spendable

    gated = whole.gated
    session = whole.layers.make_session(export_routing(gated))
    seq = int(hidden.shape[1])
    fm = gated.flops
    available = float(spendable(gated, torch.tensor([budget], dtype=torch.float64), seq)[0])
    feed = {
        "hidden": hidden.detach().to(torch.float32).numpy(),
        "mask": mask.detach().numpy().astype(np.int64),
        "router_budget": np.array([budget], dtype=np.float32),
        "available": np.array([available], dtype=np.float64),
        "head_cost": np.array(fm.head_cost(seq), dtype=np.float64),
        "slice_cost": np.array(fm.slice_cost(seq), dtype=np.float64),
    }
    names = {i.name for i in session.get_inputs()}  # a static router reads neither hidden nor mask
    feed = {k: v for k, v in feed.items() if k in names}
    return lambda: session.run(None, feed)
