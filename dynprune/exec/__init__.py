"""Fast execution engines for gated models (CPU): ``dynprune.exec``.

Interface used by :class:`dynprune.GatedModel` (one hook in ``forward``; opt-in with
``GateConfig(backend="onnxruntime")``):

- :func:`ort_available` — whether the optional extra ``dynprune[onnx]`` is installed;
- :func:`engine_for` — the cached :class:`FastEncoder` of a gated model, or None
  when the model cannot use it (then the PyTorch gathered path runs);
- :meth:`FastEncoder.swapped` — a context manager putting the engine in place of
  the HF encoder module for one forward: the HF model's own embeddings, router
  hook and task head run as usual, the encoder layers run on ONNX Runtime
  (:mod:`dynprune.exec.ort_engine`).
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

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
        self.layers = OrtLayers(gated, threads, **options)  # options: spinning, fuse_layers
        path = gated.parts.spec.layers.rsplit(".", 1)
        self._owner_path, self._name = path[0].rsplit(".", 1) if "." in path[0] else ("", path[0])
        owner = gated.parts.backbone
        for part in filter(None, self._owner_path.split(".")):
            owner = getattr(owner, part)
        object.__setattr__(self, "_owner", owner)  # not a submodule either

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
        return Output(last_hidden_state=y.to(hidden_states.dtype))

    @contextmanager
    def swapped(self):
        """The HF encoder module replaced by this engine for the duration of the block."""
        original = self._owner._modules[self._name]
        self._owner._modules[self._name] = self
        try:
            yield
        finally:
            self._owner._modules[self._name] = original


def engine_for(gated: Any, device: torch.device) -> FastEncoder | None:
    """The ORT encoder for ``gated`` on ``device`` (created once and cached), or None.

    Opt-in: only ``GateConfig.backend="onnxruntime"`` on CPU uses it (with
    ``auto`` the PyTorch gathered path runs: on the benchmark machine the engine
    was measured *slower* than that path, see results/cpu_bench/ENGINES.md).
    When it cannot run (extra not installed, nested=False masks, a model outside
    what it builds) a RuntimeError says why.
    """
    cfg = gated.gate_config
    if device.type != "cpu" or cfg.backend != "onnxruntime":
        return None
    cached = gated.__dict__.get("_fast_encoder")
    if cached is not None:
        return cached if cached is not False else None
    reason = None
    if not ort_available():
        reason = f"onnxruntime is not installed ({INSTALL_HINT})"
    elif not cfg.nested:
        reason = "nested=False masks are not prefixes of the unit order"
    engine: FastEncoder | None = None
    if reason is None:
        try:
            engine = FastEncoder(gated)
        except ValueError as err:
            reason = str(err)
    if engine is None:
        raise RuntimeError(f"GateConfig.backend='onnxruntime' cannot run this model: {reason}")
    gated.__dict__["_fast_encoder"] = engine
    return engine


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
