"""The batch-1 sessions of the CPU engine: the whole gated forward in one ONNX Runtime call
(:mod:`dynprune.exec.whole_graph` builds the graphs), ``GatedModel.last`` from the counts the
graph returns, and the routing timed alone for ``dynprune bench cpu``."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from dynprune.exec.graph_surgery import keep_only, splice_layers
from dynprune.exec.onnx_pieces import sliced_layers_model
from dynprune.exec.ort_engine import weights_key
from dynprune.exec.whole_graph import export_front
from dynprune.gates import UnitMasks
from dynprune.state import ForwardInfo

Tensor = torch.Tensor


class WholeForward:
    """ONNX Runtime sessions running a gated encoder's whole forward at batch 1.

    - The **If-tree session** (:func:`~dynprune.exec.whole_graph.export_front` + the engine's
      gated layers, :class:`~dynprune.exec.ort_engine.OrtLayers`): any kept counts, routed
      inside the graph. Every forward can run on it.
    - **Sliced sessions** for a *static* router (one mask per budget and length, the CoFi-like
      control): its counts are a function of (budget, length), remembered from the If-tree
      session's answer; a count vector met a second time gets a session of its own, the
      physically sliced model's graph (no If nodes: they cost 12-19 % of the layers' time at
      batch 1, docs/cpu_engine.md). At most ``max_sliced`` are kept (each holds the kept units'
      weights once); when they are all taken, a new count vector replaces the least used one only
      once it has been met more than twice as often, so that traffic spread over more count
      vectors than sessions (mixed budgets and lengths) never rebuilds a session per call.

    Everything is rebuilt when any parameter of the model or router changes. :meth:`run` takes
    one sample's token inputs; the caller checks it can run them (:func:`dynprune.exec.whole_forward`).
    """

    def __init__(self, gated: Any, layers: Any, owner: nn.Module, slot: str, max_sliced: int = 4) -> None:
        import inspect

        if max_sliced < 0:
            raise ValueError(f"max_sliced must be >= 0, got {max_sliced}")
        self.gated, self.layers, self.owner, self.slot = gated, layers, owner, slot
        accepted = inspect.signature(gated.model.forward).parameters
        self.token_inputs = tuple(
            n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted
        )
        self.static = gated.gate_config.router == "static"
        self.max_sliced = max_sliced
        self._params = list(gated.parameters())
        self._key: tuple | None = None
        self._session: Any = None
        self._front: onnx.ModelProto | None = None
        self._sliced: dict[tuple[int, ...], Any] = {}  # counts -> session
        self._met: Counter[tuple[int, ...]] = Counter()  # counts -> forwards that chose them
        # (budget, length[, ms available, head ms, slice ms]) -> counts
        self._static_counts: dict[tuple, np.ndarray] = {}
        # a static router's ms-priced calls whose answer the usual path must give (cost_model.WholeFeed)
        self.ms_rejected: set[tuple] = set()
        self.output_type: type | None = None
        self.output_key = ""
        self.calls = 0  # forwards run (either session kind)
        self.sliced_calls = 0  # of which on a sliced session
        self.sliced_builds = 0  # sliced sessions built

    def warm(self) -> Any:
        """Build (or rebuild after the weights changed) the If-tree session; returns it."""
        key = weights_key(self._params)
        if key != self._key or self._session is None:
            self._session, self._front = None, None
            self._sliced.clear()
            self._met.clear()
            self._static_counts.clear()
            self.ms_rejected.clear()
            self._session = self.layers.make_session.from_builder(self.graph)
            self._key = key
        return self._session

    def front(self) -> onnx.ModelProto:
        """The exported front (placeholder for the layers) at the current weights, exported once."""
        if self._front is None:
            self._front, self.output_type, self.output_key = export_front(
                self.gated, self.token_inputs, self.owner, self.slot
            )
        return self._front

    def graph(self, external: Any = None) -> onnx.ModelProto:
        """The If-tree graph at the current weights (the layers' weights written to ``external``)."""
        layers = self.layers.gated_graph(external)
        return splice_layers(self.front(), layers, len(self.layers.layers), self.layers.layer_gates)

    def sliced_graph(self, counts: np.ndarray, external: Any = None) -> onnx.ModelProto:
        """The graph of the physically sliced model for one count vector (L, 3): no routing, no Ifs."""
        weights = self.layers.weights(self.layers.layers)
        layers = sliced_layers_model(weights, self.layers.slice_size, counts.tolist(), external)
        whole = splice_layers(
            self.front(), layers, len(self.layers.layers), self.layers.layer_gates, counted=False
        )
        return keep_only(whole, ["output"])

    def counts_fed_graph(self, external: Any = None) -> onnx.ModelProto:
        """The If-tree graph with the counts as a graph input (``given_counts``, (1, L, 3) int64) instead of
        routed: the routing's nodes are gone. Timed against :meth:`graph` it prices the routing
        inside the whole graph (``dynprune bench cpu``)."""
        front = onnx.ModelProto()
        front.CopyFrom(self.front())
        place = next(n for n in front.graph.node if n.op_type == "GatedLayers")
        place.input[2] = "given_counts"
        front.graph.input.append(
            onnx.helper.make_tensor_value_info("given_counts", onnx.TensorProto.INT64, [1, None, 3])
        )
        layers = self.layers.gated_graph(external)
        whole = splice_layers(front, layers, len(self.layers.layers), self.layers.layer_gates)
        return keep_only(whole, ["output"])

    def run(
        self,
        tokens: dict[str, np.ndarray],
        router_budget: float,
        available: float,
        seq: int,
        sliced: bool = True,
        costs: tuple[float, float] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(task output (1, ...), counts (1, L, 3)) of one sample; ``tokens`` are int64 (1, T).
        ``sliced=False``: the If-tree session, routing in the graph, even for a static router.
        ``costs``: (head, slice) prices instead of FLOPs (a ms budget: ``available`` in ms); a static
        router's counts are then remembered per (budget, length, available, costs)."""
        session = self.warm()
        self.calls += 1
        key = (router_budget, seq) if costs is None else (router_budget, seq, available, *costs)
        remembered = self._static_counts.get(key) if self.static and sliced else None
        if remembered is not None:
            session_of_counts = self._sliced_session(remembered)
            if session_of_counts is not None:
                self.sliced_calls += 1
                feed = {i.name: tokens[i.name] for i in session_of_counts.get_inputs()}
                return session_of_counts.run(None, feed)[0], remembered
        output, counts = session.run(None, self.feed(tokens, router_budget, available, seq, costs))
        if self.static and len(self._static_counts) < 4096:
            self._static_counts[key] = counts
        return output, counts

    def tokens(self, inputs: dict[str, Any], seq: int) -> dict[str, np.ndarray]:
        """One sample's token inputs (1, T) as int64 arrays, as the HF forward defaults them: no
        attention mask = every token counts, no token types = type 0."""
        out = {}
        for name in self.token_inputs:
            t = inputs.get(name)
            if t is None:
                out[name] = (np.zeros if name == "token_type_ids" else np.ones)((1, seq), dtype=np.int64)
            else:
                array = t.detach().cpu().numpy() if isinstance(t, Tensor) else t  # CPU: views, no copy
                out[name] = np.asarray(array).astype(np.int64, copy=False)
        return out

    def answer(self, output: np.ndarray, return_dict: bool | None) -> Any:
        """The graph's output as the HF forward returns it (its output class, or a tuple)."""
        value = torch.from_numpy(output)
        return (value,) if return_dict is False else self.output_type(**{self.output_key: value})

    def feed(
        self,
        tokens: dict[str, np.ndarray],
        router_budget: float,
        available: float,
        seq: int,
        costs: tuple[float, float] | None = None,
    ) -> dict:
        """The If-tree session's inputs: the tokens, the router's budget, the FLOPs the gated layers
        may spend and the cost of one head / FFN slice at length ``seq`` (FLOPs stay on the host;
        ``costs``: other prices, e.g. a cost table's ms, with ``available`` in the same unit)."""
        fm = self.gated.flops
        head, slc = costs if costs is not None else (fm.head_cost(seq), fm.slice_cost(seq))
        return {
            **tokens,
            "router_budget": np.array([router_budget], dtype=np.float32),
            "available": np.array([available], dtype=np.float64),
            "head_cost": np.array(head, dtype=np.float64),
            "slice_cost": np.array(slc, dtype=np.float64),
        }

    def _sliced_session(self, counts: np.ndarray) -> Any | None:
        """The sliced session of ``counts`` (1, L, 3), or None: built the second time they are met while
        a place is free, else in place of the least met session once met more than twice as often."""
        if self.max_sliced == 0:
            return None
        key = tuple(int(c) for c in counts.reshape(-1))
        self._met[key] += 1
        if key in self._sliced:
            return self._sliced[key]
        if self._met[key] < 2:
            return None
        if len(self._sliced) >= self.max_sliced:
            victim = min(self._sliced, key=self._met.__getitem__)
            if self._met[key] <= 2 * self._met[victim]:
                return None  # the If-tree session runs it: no rebuild per call
            del self._sliced[victim]
        session = self.layers.make_session.from_builder(lambda ext: self.sliced_graph(counts[0], ext))
        self._sliced[key] = session
        self.sliced_builds += 1
        return session


def info_from_counts(gated: Any, budget: Tensor, seq: int, counts: Tensor, routed: bool) -> ForwardInfo:
    """``GatedModel.last`` of a whole-forward call, computed as :func:`dynprune.routing.route` does."""
    fm = gated.flops
    dense = fm.dense(seq)
    if not routed:  # budget 1.0: every unit ran, no router
        return ForwardInfo(budget, seq, dense, torch.full_like(budget, dense, dtype=torch.float64))
    masks = UnitMasks.from_counts(counts, gated.parts.n_heads, gated.n_slices)
    flops = fm.fixed(seq) + fm.gated_units(masks.head.double(), masks.ffn.double(), masks.layer.double(), seq)
    return ForwardInfo(budget, seq, dense, flops, gates=masks.to_gates(), masks=masks)


def routing_timers(whole: WholeForward, inputs: dict[str, Tensor], budget: float) -> dict[str, Any]:
    """Two no-argument callables for one sample's ``inputs`` (batch 1): ``routed`` runs the If-tree
    session (routing in the graph), ``fed`` the same graph given the counts it chose (no routing
    nodes); their paired time difference is what routing costs inside the whole graph."""
    from dynprune.routing import spendable

    gated = whole.gated
    ids = inputs["input_ids"]
    seq = int(ids.shape[1])
    tokens = whole.tokens(inputs, seq)
    available = spendable(gated, float(budget), seq)
    _, counts = whole.run(tokens, budget, available, seq, sliced=False)
    routed_feed = whole.feed(tokens, budget, available, seq)
    routed = whole.warm()
    fed = whole.layers.make_session.from_builder(whole.counts_fed_graph)
    feed = {i.name: tokens[i.name] for i in fed.get_inputs() if i.name != "given_counts"}
    feed["given_counts"] = counts
    return {  # both bare session calls on prepared inputs: the difference is the graph's routing
        "routed": lambda: routed.run(None, routed_feed),
        "fed": lambda: fed.run(None, feed),
    }
