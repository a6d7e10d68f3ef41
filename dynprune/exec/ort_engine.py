"""Gated encoder layers on ONNX Runtime: one small static graph per (layer, kind, kept count).

The fast CPU path of a :class:`dynprune.GatedModel` in eval mode. Routing and
planning are unchanged (the router's hook on the embeddings, then
:func:`dynprune.plan.plan_forward`); only the encoder layers run here:

- per gated layer and kept count ``k`` a graph holding exactly the kept units'
  weights (:mod:`dynprune.exec.onnx_pieces`): attention with heads ``0:k``, FFN
  with slices ``0:k``, or the whole layer for a pair of counts. Sessions are
  built on first use and cached (``warm()`` builds them ahead);
- batch 1 / a shared mask: one whole-layer call per layer, on the activations
  in place (no gathers); the second time a forward's count vector is seen, one
  session holding every gated layer with those counts is built (like a
  physically sliced model; LRU-cached, ``max_model_sessions``) and used from then on. Per-sample masks: the planner's blocks (samples that
  keep the same count), one attention and one FFN call per block, rows
  gathered / scattered with numpy; samples whose layer is skipped pass through.

Threads: every session gets its own intra-op pool of ``threads`` threads
(default: ``torch.get_num_threads()``), spinning off by default (per-session
pools that spin fight over the cores; see docs/cpu_engine.md and
results/cpu_bench/ENGINES.md for the measurements). No environment variable is
read or needed.

Numerics: equal to the PyTorch gathered path to ~1e-5 (fp32, different
kernels and summation order; tests/exec/test_ort_engine.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from dynprune.arch import LayerParts
from dynprune.exec.onnx_pieces import (
    ACTIVATIONS,
    LayerWeights,
    attention_piece,
    ffn_piece,
    layer_piece,
    model_piece,
)
from dynprune.plan import KindPlan, plan_forward

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


#: intra-op spinning of the engine's sessions: "off" = never spin (default: measured fastest of the
#: three, results/cpu_bench/candidates.csv); "stop" = spin within a run, stop at its end;
#: "on" = ORT's default (threads keep spinning after a run: sessions then fight over the cores)
SPINNING = ("stop", "on", "off")


class SessionFactory:
    """Builds ORT sessions with the engine's thread settings."""

    def __init__(self, threads: int, spinning: str = "off") -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if spinning not in SPINNING:
            raise ValueError(f"spinning must be one of {SPINNING}, got {spinning!r}")
        self.threads, self.spinning = threads, spinning

    def __call__(self, model: Any) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        if self.spinning == "stop":
            so.add_session_config_entry("session.force_spinning_stop", "1")
        elif self.spinning == "off":
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


class OrtLayers:
    """The gated layers of one GatedModel on ONNX Runtime (see the module docstring)."""

    def __init__(
        self,
        gated: Any,
        threads: int | None = None,
        spinning: str = "off",
        fuse_layers: bool = True,
        max_model_sessions: int = 8,
    ) -> None:
        cfg, parts = gated.gate_config, gated.parts
        act = activation_name(gated.model.config)
        if act is None:
            raise ValueError("the ORT engine supports FFN activations " + ", ".join(sorted(ACTIVATIONS)))
        if parts.spec.norm_position != "post" or parts.spec.gate_proj is not None:
            raise ValueError("the ORT engine supports post-LN encoder layers (BERT family) only")
        self.gated = gated
        self.n_heads, self.head_dim, self.slice_size = parts.n_heads, parts.head_dim, cfg.ffn_slice_size
        self.n_slices = parts.ffn_dim // cfg.ffn_slice_size
        self.act = act
        self.layers = parts.parts[cfg.router_layer :]
        self.prefix = parts.parts[: cfg.router_layer]
        self.make_session = SessionFactory(
            threads if threads is not None else torch.get_num_threads(), spinning
        )
        self.fuse_layers = fuse_layers  # one whole-layer session where every sample shares the counts
        #: whole-model sessions per count vector (batch 1 / shared masks), built the second time a
        #: vector is seen; at most ``max_model_sessions`` kept (least recently used dropped)
        self.max_model_sessions = max_model_sessions
        self._seen: dict[tuple, int] = {}
        self._model_sessions: dict[tuple, ort.InferenceSession] = {}
        self._params = [p for lp in parts.parts for p in lp.layer.parameters()]
        self._key: tuple | None = None
        self._weights: list[LayerWeights] = []
        self._sessions: dict[tuple, ort.InferenceSession] = {}

    # -- weights and sessions -----------------------------------------------------------
    def _check_weights(self) -> None:
        key = tuple((p.data_ptr(), p._version) for p in self._params)
        if key != self._key:  # first call, or the model was trained / reordered since
            self._weights = [
                layer_weights(lp, self.n_heads, self.head_dim, self.act) for lp in self.gated.parts.parts
            ]
            self._sessions.clear()
            self._model_sessions.clear()
            self._seen.clear()
            self._key = key

    def session(self, layer: int, kind: str, k: int, k2: int = 0) -> ort.InferenceSession:
        """Session of model layer ``layer``: kind "a" (k heads), "f" (k slices) or "l" (k heads, k2 slices)."""
        key = (layer, kind, k, k2)
        sess = self._sessions.get(key)
        if sess is None:
            lw = self._weights[layer]
            if kind == "a":
                model = attention_piece(lw, k)
            elif kind == "f":
                model = ffn_piece(lw, k, self.slice_size)
            else:
                model = layer_piece(lw, k, k2, self.slice_size)
            sess = self.make_session(model)
            sess.needs_mask = len(sess.get_inputs()) > 1  # read once (get_inputs() costs µs per call)
            self._sessions[key] = sess
        return sess

    def warm(self) -> int:
        """Build every attention / FFN piece session ahead of time (else built on first use); returns count."""
        self._check_weights()
        first = len(self.prefix)
        for i in range(first, first + len(self.layers)):
            for k in range(self.n_heads + 1):
                self.session(i, "a", k)
            for k in range(self.n_slices + 1):
                self.session(i, "f", k)
            self.session(i, "l", self.n_heads, self.n_slices)
        return len(self._sessions)

    # -- execution ----------------------------------------------------------------------
    def _run(self, sess: ort.InferenceSession, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        feed = {"x": x, "mask": mask} if sess.needs_mask and mask is not None else {"x": x}
        return sess.run(None, feed)[0]

    def _inputs(self, hidden: Tensor, attention_mask: Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(hidden.detach().to(torch.float32).cpu().numpy())
        if attention_mask is None:
            return x, np.ones(x.shape[:2], dtype=np.int32)
        return x, np.ascontiguousarray(attention_mask.detach().cpu().numpy().astype(np.int32, copy=False))

    def forward_dense(self, hidden: Tensor, attention_mask: Tensor | None, n_layers: int) -> Tensor:
        """The first ``n_layers`` layers of the model, dense: (B, T, H) -> (B, T, H)."""
        self._check_weights()
        x, mask = self._inputs(hidden, attention_mask)
        for i in range(n_layers):
            x = self._run(self.session(i, "l", self.n_heads, self.n_slices), x, mask)
        return torch.from_numpy(x)

    def forward(
        self, hidden: Tensor, attention_mask: Tensor | None, masks: Any, skip_prefix: bool = False
    ) -> Tensor:
        """hidden (B, T, H) -> last hidden state (B, T, H). ``masks``: canonical UnitMasks of the gated
        layers, or None (dense); ``skip_prefix``: ``hidden`` is already past the un-gated layers."""
        self._check_weights()
        x, mask = self._inputs(hidden, attention_mask)
        batch = x.shape[0]
        first = len(self.prefix)
        for i in range(0 if skip_prefix else first):
            x = self._run(self.session(i, "l", self.n_heads, self.n_slices), x, mask)
        if masks is None:
            for j in range(len(self.layers)):
                x = self._run(self.session(first + j, "l", self.n_heads, self.n_slices), x, mask)
            return torch.from_numpy(x)
        plans = plan_forward(masks.head, masks.ffn, masks.layer)
        whole = self._model_session(plans, batch) if self.max_model_sessions > 0 else None
        if whole is not None:  # one call for every gated layer
            return torch.from_numpy(self._run(whole, x, mask))
        for j, lp in enumerate(plans):
            if lp.n_kept == 0:
                continue
            att, ffn = lp.attention, lp.ffn
            if self.fuse_layers and lp.n_kept == batch and _single(att, batch) and _single(ffn, batch):
                kh, kf = _count(att), _count(ffn)
                x = self._run(self.session(first + j, "l", kh, kf), x, mask)
                continue
            x = self._per_sample_layer(first + j, x, mask, att, ffn)
        return torch.from_numpy(x)

    def _model_session(self, plans: list, batch: int) -> ort.InferenceSession | None:
        """The whole-model session of this forward's count vector when every layer has one count for
        the whole batch and the vector was seen before (built then), else None."""
        counts: list[tuple[int, int] | None] = []
        for lp in plans:
            if lp.n_kept == 0:
                counts.append(None)
            elif lp.n_kept == batch and _single(lp.attention, batch) and _single(lp.ffn, batch):
                counts.append((_count(lp.attention), _count(lp.ffn)))
            else:
                return None
        key = tuple(counts)
        sess = self._model_sessions.pop(key, None)
        if sess is None:
            if len(self._seen) > 4096:  # many distinct vectors: forget the sightings
                self._seen.clear()
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] < 2:
                return None
            first = len(self.prefix)
            sess = self.make_session(model_piece(self._weights[first:], counts, self.slice_size))
            sess.needs_mask = len(sess.get_inputs()) > 1
            if len(self._model_sessions) >= self.max_model_sessions:
                self._model_sessions.pop(next(iter(self._model_sessions)))  # least recently used
        self._model_sessions[key] = sess  # (re)inserted last = most recently used
        return sess

    def _per_sample_layer(
        self, layer: int, x: np.ndarray, mask: np.ndarray, att: KindPlan, ffn: KindPlan
    ) -> np.ndarray:
        """One layer for samples in blocks of equal counts; skipped samples keep x."""
        h = np.empty_like(x)
        for rows, k in _groups(att):
            h[rows] = self._run(self.session(layer, "a", k), x[rows], mask[rows])
        out = x.copy() if ffn.rows.size < x.shape[0] else np.empty_like(x)
        for rows, k in _groups(ffn):
            out[rows] = self._run(self.session(layer, "f", k), h[rows], None)
        return out


def _single(kp: KindPlan, batch: int) -> bool:
    """Every sample of the batch keeps the layer and the same count (0 or one block covering all rows)."""
    if not kp.blocks:
        return kp.rows.size == batch
    return len(kp.blocks) == 1 and kp.blocks[0].n_rows == batch


def _count(kp: KindPlan) -> int:
    return kp.blocks[0].n_units if kp.blocks else 0


def _groups(kp: KindPlan) -> list[tuple[np.ndarray, int]]:
    """(original sample indices, kept count) per block of the plan, plus the kept rows keeping 0 units."""
    if any(not isinstance(b.units, slice) for b in kp.blocks):
        raise ValueError("the ORT engine runs nested (prefix) masks only")
    out = [(kp.rows[b.start : b.stop], b.n_units) for b in kp.blocks]
    done = kp.blocks[-1].stop if kp.blocks else 0
    if done < kp.rows.size:
        out.append((kp.rows[done:], 0))
    return out
