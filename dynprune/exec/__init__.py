"""Fast execution engines for gated models (CPU): ``dynprune.exec``.

Interface used by :class:`dynprune.GatedModel` (one hook in ``forward``; the default on
CPU in eval mode, ``GateConfig(backend="auto")``):

- :func:`ort_available` — whether the optional extra ``dynprune[onnx]`` is installed;
- :func:`engine_for` — the cached :class:`FastEncoder` of a gated model, or None
  when the model cannot use it (then the PyTorch gathered path runs);
- :func:`current_engine` — the engine a gated model has been running on, if any;
- :meth:`FastEncoder.swapped` — a context manager putting the engine in place of
  the HF encoder module for one forward: the HF model's own embeddings, router
  hook and task head run as usual, the encoder layers run on ONNX Runtime
  (:mod:`dynprune.exec.ort_engine`).
"""

from __future__ import annotations

import importlib.util
import warnings
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

Tensor = torch.Tensor

INSTALL_HINT = "pip install 'dynprune[onnx]'"


def ort_available() -> bool:
    return (
        importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
    )


class FastEncoder(nn.Module):
    """Stands in for the HF encoder (``encoder`` / ``transformer``) during one forward."""

    def __init__(self, gated: Any, threads: int | None = None, **options: Any) -> None:
        super().__init__()
        from dynprune.exec.ort_engine import OrtLayers

        object.__setattr__(self, "gated", gated)  # not a submodule (no cycle in the module tree)
        self.layers = OrtLayers(gated, threads, **options)  # options: spinning, max_groups, max_tokens
        self.fallbacks = 0  # forwards handed to the PyTorch path (OrtLayers.max_tokens / max_groups)
        self._original: nn.Module | None = None
        self._torch_threads = torch.get_num_threads()
        owner, self._name = encoder_slot(gated)
        object.__setattr__(self, "_owner", owner)  # not a submodule either
        self._whole: Any = None  # WholeForward, built on the first batch-1 call

    def whole(self) -> Any:
        """The whole-forward session of this model (dynprune.exec.whole_graph), built lazily."""
        if self._whole is None:
            from dynprune.exec.whole_session import WholeForward

            self._whole = WholeForward(self.gated, self.layers, self._owner, self._name)
        return self._whole

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions as Output

        hidden_states = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))  # DistilBERT: x=

        gated, state = self.gated, self.gated._state
        prefix = len(self.layers.prefix)
        if prefix:  # dense layers before the router: run here, then route on their output
            x = self.layers.forward_dense(hidden_states, state.attention_mask, prefix)
            src = gated.parts.parts[prefix - 1].layer
            gated._route_hook(src, (), x)
            hidden_states = x
        gates = state.gates if state.active else None
        masks = None
        if gates is not None:
            info = state.info
            masks = info.masks if info is not None and info.masks is not None else gates.masks()
            masks = masks.canonical()
        y = self.layers.forward(hidden_states, state.attention_mask, masks, skip_prefix=bool(prefix))
        if y is None:  # many distinct per-sample count vectors: the PyTorch path's per-layer blocks
            self.fallbacks += 1
            torch.set_num_threads(self._torch_threads)
            try:
                return self._original(*args, **kwargs)
            finally:
                torch.set_num_threads(1)
        return Output(last_hidden_state=y.to(hidden_states.dtype))

    @contextmanager
    def swapped(self):
        """The HF encoder module replaced by this engine for the duration of the block, and PyTorch
        single-threaded in it: the ops around the engine (embeddings, router, selection, head) are
        tiny, and PyTorch's OpenMP threads spinning after them took the cores from ONNX Runtime's
        pool (the engine's layers ran up to 2x slower, docs/cpu_engine.md)."""
        original = self._owner._modules[self._name]
        object.__setattr__(self, "_original", original)  # not a submodule
        self._torch_threads = torch.get_num_threads()
        self._owner._modules[self._name] = self
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(self._torch_threads)
            self._owner._modules[self._name] = original


def encoder_slot(gated: Any) -> tuple[nn.Module, str]:
    """(module, attribute name) holding the HF encoder (``encoder`` / ``transformer``) of ``gated``."""
    owner_path, _ = gated.parts.spec.layers.rsplit(".", 1)
    parent, name = owner_path.rsplit(".", 1) if "." in owner_path else ("", owner_path)
    owner = gated.parts.backbone
    for part in filter(None, parent.split(".")):
        owner = getattr(owner, part)
    return owner, name


#: backend="auto" builds the engine only when its per-count weights fit in this many bytes
AUTO_MAX_ENGINE_BYTES = 2 * 2**30


def engine_bytes(gated: Any) -> int:
    """Bytes of fp32 weights the engine's If-tree leaves hold: every kept count of every gated
    layer's heads and FFN slices has its own copy, (n + 1) / 2 times the layer's weights."""
    parts, cfg = gated.parts, gated.gate_config
    n_slices = parts.ffn_dim // cfg.ffn_slice_size
    attention = 4 * parts.hidden * parts.n_heads * parts.head_dim * (parts.n_heads + 1) / 2
    ffn = 2 * parts.hidden * parts.ffn_dim * (n_slices + 1) / 2
    return int(4 * (attention + ffn) * (parts.n_layers - cfg.router_layer))


def unsupported_reason(gated: Any, insist: bool = False) -> str | None:
    """Why the engine cannot (or, under ``backend="auto"``, should not) run ``gated``; None: it can,
    as far as can be told before building it."""
    if not ort_available():
        return f"onnxruntime is not installed ({INSTALL_HINT})"
    if not gated.gate_config.nested:
        return "nested=False masks are not prefixes of the unit order"
    dtype = next(gated.model.parameters()).dtype
    if dtype != torch.float32:
        return f"the engine runs fp32 weights, this model is {dtype}"
    size = engine_bytes(gated)
    if not insist and size > AUTO_MAX_ENGINE_BYTES:
        return (
            f"the engine would hold {size / 2**30:.1f} GiB of per-count weights (more than "
            f"{AUTO_MAX_ENGINE_BYTES / 2**30:.0f} GiB); GateConfig(backend='onnxruntime') builds it anyway"
        )
    return None


def _tokens(args: tuple, kwargs: dict) -> int | None:
    """Batch x sequence length of a forward's inputs (None: not given as a tensor)."""
    for t in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return int(t.shape[0] * t.shape[1])
    return None


def engine_for(
    gated: Any, device: torch.device, kwargs: dict | None = None, args: tuple = ()
) -> FastEncoder | None:
    """The ORT encoder for ``gated`` on ``device`` (created once and cached), or None.

    ``GateConfig.backend="auto"`` (the default) uses it in eval mode on CPU whenever it
    can run the model — on the benchmark machine it is the fastest way to run gated
    layers (results/cpu_bench/) — and otherwise runs the PyTorch gathered path: with a
    one-line warning when only the optional extra is missing, silently for models the
    engine does not build (decoders, pre-LN encoders, non-fp32 weights, nested=False).
    ``backend="onnxruntime"`` insists: a RuntimeError says why it cannot run.
    ``kwargs`` asking for attentions or hidden states (which the engine does not
    return) send the call to the PyTorch path, and so do inputs of more than the engine's
    ``max_tokens`` tokens (counted in ``FastEncoder.fallbacks``): the model is never
    swapped, nor PyTorch's threads touched, for a forward the engine does not run.
    """
    choice = gated.backend_choice
    if device.type != "cpu" or choice not in ("auto", "onnxruntime"):
        return None
    insist = choice == "onnxruntime"
    if kwargs and (kwargs.get("output_attentions") or kwargs.get("output_hidden_states")):
        if insist:
            raise RuntimeError(
                "GateConfig.backend='onnxruntime' returns the last hidden state only: run with "
                "backend='torch' for attentions or hidden states"
            )
        return None
    cached = gated.__dict__.get("_fast_encoder")
    if cached is None:  # decide once per model: the engine, or why not
        cached = unsupported_reason(gated, insist)
        if cached is None:
            try:
                cached = FastEncoder(gated)
            except ValueError as err:
                cached = str(err)
        gated.__dict__["_fast_encoder"] = cached
        if isinstance(cached, str) and not insist and not ort_available():
            warnings.warn(
                f"dynprune: {cached}; running the slower PyTorch gathered path on CPU", stacklevel=3
            )
    if cached is False:  # engine_override(gated, None): the reference path
        return None
    if isinstance(cached, str):
        if insist:
            raise RuntimeError(f"GateConfig.backend='onnxruntime' cannot run this model: {cached}")
        return None
    limit, tokens = cached.layers.max_tokens, _tokens(args, kwargs or {})
    if limit is not None and tokens is not None and tokens > limit and not cached.layers.prefix:
        cached.fallbacks += 1  # a large batch: the PyTorch path's GEMMs are faster
        return None
    return cached


def current_engine(gated: Any) -> FastEncoder | None:
    """The engine ``gated`` has been running on (None: it has run the PyTorch path, or not run yet)."""
    cached = gated.__dict__.get("_fast_encoder")
    return cached if isinstance(cached, FastEncoder) else None


@contextmanager
def engine_override(gated: Any, engine: FastEncoder | None):
    """Inside the block ``gated`` runs on ``engine`` (None: the PyTorch gathered path, the reference)."""
    saved = gated.__dict__.get("_fast_encoder")
    gated.__dict__["_fast_encoder"] = engine if engine is not None else False
    try:
        yield gated
    finally:
        if saved is None:
            gated.__dict__.pop("_fast_encoder", None)
        else:
            gated.__dict__["_fast_encoder"] = saved


def reference_path(gated: Any):
    """Run ``gated`` on the PyTorch gathered path inside the block (the reference the engine must equal)."""
    return engine_override(gated, None)


#: keyword arguments the whole-forward session takes (anything else: the usual path)
_WHOLE_KWARGS = frozenset({"input_ids", "attention_mask", "token_type_ids", "return_dict"})


def whole_graph_unsupported(gated: Any) -> str | None:
    """Why the whole-forward graph (batch 1, ``dynprune export``) cannot route ``gated``; None: it can
    (the router runs inside the graph, so it must be a learned one reading the embeddings)."""
    cfg = gated.gate_config
    if cfg.router not in ("dynamic", "static") or cfg.router_layer != 0:
        return "the whole-forward graph routes with learned routers (dynamic / static) reading the embeddings (router_layer 0)"
    return None


def whole_forward(
    gated: Any, device: torch.device, args: tuple, kwargs: dict, budget: Tensor, time: Any = None
) -> Any | None:
    """Run one sample's whole gated forward as one ONNX Runtime call (dynprune.exec.whole_graph) and
    return the HF output, with ``gated.last`` set; None when this call is not one it runs: the
    caller then runs the usual path (PyTorch around the engine's layers). It runs batch-1 calls
    of encoder classifiers under a cap budget, routed by a learned router on the embeddings,
    with token inputs given as keyword tensors and nothing else asked for. ``time``: a
    ``dynprune.cost_model.TimePricing`` (a TimeBudget's ms, units priced by the cost table)."""
    if args or not kwargs.keys() <= _WHOLE_KWARGS or whole_graph_unsupported(gated) is not None:
        return None
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
        return None
    engine = engine_for(gated, device, kwargs)
    if engine is None:
        return None
    whole = engine.whole()
    if not all(isinstance(kwargs.get(n), torch.Tensor) or n not in kwargs for n in whole.token_inputs):
        return None
    from dynprune.exec.whole_session import info_from_counts
    from dynprune.routing import spendable

    seq = int(ids.shape[1])
    tokens = whole.tokens(kwargs, seq)
    if time is not None:  # ms budget: the same graph, priced by the cost table (dynprune.cost_model)
        feed = time.whole_feed(gated, seq)
        if feed is None:
            return None
        key = (feed.router, seq, feed.available, *feed.costs)
        if whole.static and key in whole.ms_rejected:  # known to need the usual path: skip the session
            return None
        output, counts = whole.run(tokens, feed.router, feed.available, seq, costs=feed.costs)
        if not feed.accepts(counts):
            if whole.static and len(whole.ms_rejected) < 4096:
                whole.ms_rejected.add(key)
            return None
        routed = feed.router < 1.0
    else:
        cap = float(budget[0])
        available = float("inf") if cap >= 1.0 else spendable(gated, cap, seq)  # a float: no tensor ops
        output, counts = whole.run(tokens, cap, available, seq)
        routed = cap < 1.0
    # GatedModel.last is built on its first read, not here (GatedModel.last says why)
    gated.last = partial(info_from_counts, gated, budget, seq, torch.from_numpy(counts), routed)
    return whole.answer(output, kwargs.get("return_dict"))
