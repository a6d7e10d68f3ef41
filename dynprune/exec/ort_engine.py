"""Gated encoder layers on ONNX Runtime: one session that runs any kept counts.

The fast CPU path of a :class:`dynprune.GatedModel` in eval mode. Routing is
unchanged (the router's hook on the embeddings); only the encoder layers run here,
on one graph (:func:`dynprune.exec.onnx_pieces.gated_layers_model`) whose per-layer
head / FFN-slice counts and layer keeps are scalar inputs and whose If-tree leaves
hold each count's weights (pre-packed by ORT like a physically sliced model's):

- batch 1, or a batch whose samples share one count vector: one ORT call;
- per-sample masks: samples are grouped by their whole count vector (layer keeps,
  head and slice counts of every gated layer), one call per group, rows gathered
  and scattered with numpy (exact: every sample runs exactly its own units).

The session is built on first use (``warm()`` builds it ahead; a few seconds for
MiniLM) from an external-data file in a temporary directory, and rebuilt when the
parameters change (version counters). One session means one intra-op thread pool:
its threads spin within a run and, by default, stop spinning at the end of it
(``spinning="stop"``), so the PyTorch ops around the call (embeddings, router,
head) get the cores. No environment variable is read or needed.

Numerics: equal to the PyTorch gathered path to ~1e-5 (fp32, different kernels and
summation order; tests/exec/test_ort_engine.py).
"""

from __future__ import annotations

import tempfile
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from dynprune.arch import LayerParts
from dynprune.exec.onnx_pieces import (
    ACTIVATIONS,
    ExternalData,
    LayerWeights,
    dense_layers_model,
    gated_layers_model,
)
from dynprune.plan import prefix_counts

Tensor = torch.Tensor


def _np(t: Tensor | None, like: int) -> np.ndarray:
    if t is None:
        return np.zeros(like, dtype=np.float32)
    return t.detach().to(torch.float32).cpu().numpy().copy()


def layer_weights(parts: LayerParts, n_heads: int, head_dim: int, act: str) -> LayerWeights:
    """A layer's weights (in its current, importance-ordered unit order) as numpy copies."""
    w = lambda lin: _np(lin.weight, 0)  # noqa: E731
    b = lambda lin: _np(lin.bias, lin.out_features)  # noqa: E731
    n1, n2 = parts.attn_norm, parts.ffn_norm
    return LayerWeights(
        w(parts.q), b(parts.q), w(parts.k), b(parts.k), w(parts.v), b(parts.v), w(parts.o), b(parts.o),
        _np(n1.weight, 0), _np(n1.bias, n1.weight.shape[0]), float(n1.eps),
        w(parts.up), b(parts.up), w(parts.down), b(parts.down),
        _np(n2.weight, 0), _np(n2.bias, n2.weight.shape[0]), float(n2.eps),
        n_heads, head_dim, act,
    )  # fmt: skip


def activation_name(config: Any) -> str | None:
    """The HF config's FFN activation as a key of ACTIVATIONS, or None if the engine cannot build it."""
    act = getattr(config, "hidden_act", None) or getattr(config, "activation", None)
    return act if isinstance(act, str) and act in ACTIVATIONS else None


#: intra-op spinning of the engine's session: "stop" = spin within a run, stop at its end (default:
#: the torch ops between calls get the cores); "on" = ORT's default (threads keep spinning after a
#: run); "off" = never spin (threads sleep between ops inside a run too)
SPINNING = ("stop", "on", "off")


_VERSION = attrgetter("_version")


def weights_key(params: list[torch.Tensor]) -> tuple[int, ...]:
    """Changes when any of ``params`` is replaced or modified in place (data pointers, version counters);
    checked on every engine forward, so built without a Python loop."""
    return (*map(torch.Tensor.data_ptr, params), *map(_VERSION, params))


class SessionFactory:
    """Builds ORT sessions with the engine's thread settings."""

    def __init__(self, threads: int, spinning: str = "stop") -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if spinning not in SPINNING:
            raise ValueError(f"spinning must be one of {SPINNING}, got {spinning!r}")
        self.threads, self.spinning = threads, spinning

    def options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        if self.spinning == "stop":
            so.add_session_config_entry("session.force_spinning_stop", "1")
        elif self.spinning == "off":
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        return so

    def __call__(self, model: Any) -> ort.InferenceSession:
        """A session of an in-memory model (small graphs)."""
        return ort.InferenceSession(
            model.SerializeToString(), self.options(), providers=["CPUExecutionProvider"]
        )

    def from_builder(self, build: Any) -> ort.InferenceSession:
        """A session of the model ``build(external)`` returns, its weights written to an external-data
        file (never a second in-memory copy of a large protobuf); the files are gone afterwards."""
        with tempfile.TemporaryDirectory(prefix="dynprune-ort-") as tmp:
            external = ExternalData(Path(tmp) / "weights.bin")
            try:
                model = build(external)
            finally:
                external.close()
            path = Path(tmp) / "layers.onnx"
            path.write_bytes(model.SerializeToString())
            del model
            return ort.InferenceSession(str(path), self.options(), providers=["CPUExecutionProvider"])


class OrtLayers:
    """The gated layers of one GatedModel on ONNX Runtime (see the module docstring)."""

    def __init__(
        self,
        gated: Any,
        threads: int | None = None,
        spinning: str = "stop",
        max_groups: int | None = None,
        max_tokens: int | None = 128,
    ) -> None:
        cfg, parts = gated.gate_config, gated.parts
        act = activation_name(gated.model.config)
        if act is None:
            raise ValueError("the ORT engine supports FFN activations " + ", ".join(sorted(ACTIVATIONS)))
        if parts.spec.norm_position != "post" or parts.spec.gate_proj is not None:
            raise ValueError("the ORT engine supports post-LN encoder layers (BERT family) only")
        if parts.ffn_dim % cfg.ffn_slice_size:
            raise ValueError(
                f"FFN width {parts.ffn_dim} is not a multiple of ffn_slice_size {cfg.ffn_slice_size}"
            )
        self.gated = gated
        self.n_heads, self.head_dim, self.slice_size = parts.n_heads, parts.head_dim, cfg.ffn_slice_size
        self.n_slices = parts.ffn_dim // cfg.ffn_slice_size
        self.act = act
        self.layer_gates = cfg.layers
        self.layers = parts.parts[cfg.router_layer :]
        self.prefix = parts.parts[: cfg.router_layer]
        self.make_session = SessionFactory(
            threads if threads is not None else torch.get_num_threads(), spinning
        )
        self._params = [p for lp in parts.parts for p in lp.layer.parameters()]
        self._key: tuple | None = None
        self._session: ort.InferenceSession | None = None
        self._prefix_session: ort.InferenceSession | None = None
        self._full = np.array([self.n_heads, self.n_slices], dtype=np.int64)
        #: per-sample masks: the most ORT calls (groups of samples sharing a count vector) per forward
        #: before the batch goes to the PyTorch path instead (None: max(1, batch // 4))
        self.max_groups = max_groups
        #: batches of more tokens (batch x padded length) go to the PyTorch path (None: no limit). On the
        #: benchmark machine ORT won below ~128 tokens (per-op overhead dominates) and PyTorch's GEMMs
        #: won above (8 x 32: 1.15x, 16 x 32: 1.2x; results/cpu_bench/ENGINES.md)
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        self.max_tokens = max_tokens

    # -- the session ----------------------------------------------------------------------
    def warm(self) -> ort.InferenceSession:
        """Build the session now (else on first use) if the weights changed since; returns it."""
        key = weights_key(self._params)
        if key != self._key or self._session is None:  # first call, or trained / reordered since
            self._session = None  # drop the old one before building (memory)
            self._session = self.make_session.from_builder(self.gated_graph)
            first = len(self.prefix)
            self._prefix_session = (
                self.make_session(dense_layers_model(self.weights(self.prefix), self.slice_size))
                if first
                else None
            )
            self._key = key
        return self._session

    def weights(self, layers: list[LayerParts]) -> list[LayerWeights]:
        """Numpy copies of ``layers``' weights in their current (importance-ordered) unit order."""
        return [layer_weights(lp, self.n_heads, self.head_dim, self.act) for lp in layers]

    def gated_graph(self, external: ExternalData | None = None) -> Any:
        """The ONNX graph of the gated layers at their current weights (any kept counts)."""
        return gated_layers_model(self.weights(self.layers), self.slice_size, self.layer_gates, external)

    # -- execution ----------------------------------------------------------------------
    def _inputs(self, hidden: Tensor, attention_mask: Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(hidden.detach().to(torch.float32).cpu().numpy())
        if attention_mask is None:
            return x, np.ones(x.shape[:2], dtype=np.int32)
        return x, np.ascontiguousarray(attention_mask.detach().cpu().numpy().astype(np.int32, copy=False))

    def forward_dense(self, hidden: Tensor, attention_mask: Tensor | None, n_layers: int) -> Tensor:
        """The layers before the router (``n_layers`` = their number), dense: (B, T, H) -> (B, T, H)."""
        self.warm()
        if n_layers != len(self.prefix) or self._prefix_session is None:
            raise ValueError(
                f"the engine runs the {len(self.prefix)} layers before the router, not {n_layers}"
            )
        x, mask = self._inputs(hidden, attention_mask)
        return torch.from_numpy(self._prefix_session.run(None, {"x": x, "mask": mask})[0])

    def forward(
        self, hidden: Tensor, attention_mask: Tensor | None, masks: Any, skip_prefix: bool = False
    ) -> Tensor | None:
        """hidden (B, T, H) -> last hidden state (B, T, H). ``masks``: canonical UnitMasks of the gated
        layers, or None (dense); ``skip_prefix``: ``hidden`` is already past the un-gated layers.
        None: more distinct per-sample count vectors than ``max_groups`` (one call each would not
        pay; the PyTorch path's per-layer blocks run such a batch). Batches of more than
        ``max_tokens`` tokens never reach the engine (``dynprune.exec.engine_for``)."""
        batch = hidden.shape[0]
        counts = self.counts(masks, batch)  # (B, L, 3): keep, heads, slices
        flat = counts.reshape(batch, -1)  # (B, 3L): one count vector per sample
        shared = batch == 1 or bool((flat == flat[0]).all())
        if not shared:
            vectors, group = np.unique(flat, axis=0, return_inverse=True)
            limit = self.max_groups if self.max_groups is not None else max(1, batch // 4)
            if len(vectors) > limit and not self.prefix:
                return None
        sess = self.warm()
        x, mask = self._inputs(hidden, attention_mask)
        if self.prefix and not skip_prefix:
            x = self._prefix_session.run(None, {"x": x, "mask": mask})[0]
        if shared:
            return torch.from_numpy(sess.run(None, self._feed(x, mask, counts[0]))[0])
        out = np.empty_like(x)
        for g in range(len(vectors)):
            rows = np.flatnonzero(group.reshape(-1) == g)
            out[rows] = sess.run(None, self._feed(x[rows], mask[rows], counts[rows[0]]))[0]
        return torch.from_numpy(out)

    def counts(self, masks: Any, batch: int) -> np.ndarray:
        """(B, L, 3) int64 per sample and gated layer: layer kept (0/1), kept heads, kept FFN slices.
        Masks must be prefixes of the unit order (nested gates); None = dense."""
        n_layers = len(self.layers)
        if masks is None:
            out = np.empty((batch, n_layers, 3), dtype=np.int64)
            out[..., 0], out[..., 1:] = 1, self._full
            return out
        layer = masks.layer.detach().cpu().numpy().astype(bool, copy=False)
        n_head = prefix_counts(masks.head.detach().cpu().numpy())  # (B, L), None if not prefixes
        n_ffn = prefix_counts(masks.ffn.detach().cpu().numpy())
        for name, n in (("head", n_head), ("FFN", n_ffn)):
            if n is None:
                raise ValueError(
                    f"the ORT engine runs nested (prefix) masks only; a {name} mask is not a prefix"
                )
        out = np.stack([layer, n_head, n_ffn], axis=-1).astype(np.int64)
        out[~layer] = 0  # a skipped layer's counts do not matter: one key for every skip
        return out

    def _feed(self, x: np.ndarray, mask: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
        feed = {"x": x, "mask": mask}
        for j, (keep, heads, slices) in enumerate(counts.tolist()):
            feed[f"l{j}_heads"] = np.array(heads, dtype=np.int64)
            feed[f"l{j}_slices"] = np.array(slices, dtype=np.int64)
            if self.layer_gates:
                feed[f"l{j}_keep"] = np.array(bool(keep))
            elif not keep:
                raise ValueError("layer gating is off in this model's GateConfig, but a mask skips a layer")
        return feed
