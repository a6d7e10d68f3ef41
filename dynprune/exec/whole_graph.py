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

import onnx
import torch
from torch import nn

from dynprune.exec.graph_surgery import DOMAIN, PLACEHOLDER
from dynprune.gates import select_under_budget

Tensor = torch.Tensor

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
    masks = select_under_budget(
        scores,
        available,
        gated.flops,
        seq,
        costs=(head_cost, slice_cost),
        ranking=gated.gate_config.unit_ranking,
    )
    return masks.counts()


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
    axes = {n: {1: "seq"} for n in token_inputs}  # batch 1: shape arithmetic on it folds away
    if gated.training:
        raise RuntimeError("the whole-forward graph is built from a model in eval mode")
    module = _ExportForward(gated, token_inputs, owner, slot).eval()  # the export restores this mode
    model = _export(module, args, [*token_inputs, *ROUTING_INPUTS], ["output", "counts"], axes)
    return model, module.output_type, module.output_key
