"""``wrap`` / ``unwrap`` and the GatedModel they return."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from dynprune.arch import ModelParts, resolve
from dynprune.budget import MeanBudget, ThresholdRoute, TimeBudget, batch_and_device, route_budgets
from dynprune.calibration import Calibration, GovernedMean, mean_budget_forward
from dynprune.config import BACKENDS, EXECUTIONS, Backend, Execution, GateConfig, check_choice
from dynprune.cost_model import CostTable, TimePricing, require_table
from dynprune.exec import engine_for, whole_forward
from dynprune.flops import FlopsModel, build_flops_model
from dynprune.gates import UnitMasks
from dynprune.generation import ForwardLike, gated_generate, reject_forward_like
from dynprune.kv_cache import GatedKVCache
from dynprune.layers import LayerBinding, gate_layer, ungate_layer
from dynprune.ordering import apply_orders, identity_orders, undo_orders, weight_norm_orders
from dynprune.qkv_layout import PackedWeights
from dynprune.router import Router
from dynprune.routing import route, route_hook
from dynprune.state import ForwardInfo, GateState, Relaxation
from dynprune.training_free import decide_from_prefill, prefill_recorder

Tensor = torch.Tensor
_MARK = "_dynprune_wrapped"


class GatedModel(nn.Module):
    """A HF model with routers and gates. Call it like the model, plus ``budget=``.

    ``budget``: float or (B,) tensor of fractions of dense FLOPs in (0, 1]
    (default ``GateConfig.default_budget``): a cap per sample; or a
    :class:`~dynprune.budget.MeanBudget`: a mean over the inputs, spent by the
    policy calibrated for it (``self.calibration``, saved with the gates); or a
    :class:`~dynprune.calibration.GovernedMean` (``dynprune.govern(gated, MeanBudget(...))``): that
    policy with its knob corrected online from what the inputs spent; or a
    :class:`~dynprune.budget.TimeBudget`: milliseconds per input at batch 1, units priced by this
    machine's measured cost table (``self.cost_table``, saved with the gates); ``masks``: explicit
    :class:`UnitMasks` instead of the router (for tests and baselines).
    After each call, ``self.last`` is a :class:`ForwardInfo`. In train mode gates
    are sampled as ``self.relaxation`` says (a :class:`Relaxation`, training state).
    ``with self.running(execution=..., backend=...)``: forwards in the block on another path.
    """

    def __init__(
        self, model: nn.Module, cfg: GateConfig, parts: ModelParts, head_perm: Tensor, ffn_perm: Tensor
    ):
        super().__init__()
        self.model = model
        self.gate_config = cfg
        self.parts = parts
        gated_parts = parts.parts[cfg.router_layer :]
        self.n_gated = len(gated_parts)
        self.n_slices = parts.ffn_dim // cfg.ffn_slice_size
        self.router = Router(parts.hidden, self.n_gated, parts.n_heads, self.n_slices, cfg)
        base = build_flops_model(model, parts, cfg.ffn_slice_size, cfg.router_layer)
        self.flops: FlopsModel = base.with_router(self.router.flops_per_sample())
        self.register_buffer("head_perm", head_perm.clone(), persistent=False)
        self.register_buffer("ffn_perm", ffn_perm.clone(), persistent=False)
        self._state = GateState()
        self.relaxation = Relaxation()
        self._execution: Execution | None = None  # set by running(): overrides gate_config.execution
        self._backend_choice: Backend | None = None  # set by running(): overrides gate_config.backend
        self._last: ForwardInfo | Callable[[], ForwardInfo] | None = None  # see ``last``
        # per mean-budget target: the fitted policy (dynprune calibrate; saved with the gates)
        self.calibration = Calibration()
        # per-machine latency model for TimeBudget (dynprune bench calibrate; saved with the gates)
        self.cost_table: CostTable | None = None
        self._handles = []
        for i, lp in enumerate(gated_parts):
            binding = LayerBinding(
                state=self._state,
                index=i,
                parts=lp,
                n_heads=parts.n_heads,
                head_dim=parts.head_dim,
                slice_size=cfg.ffn_slice_size,
                norm_position=parts.spec.norm_position,
                qkv=PackedWeights(lp, parts.n_heads, parts.heads_per_unit, parts.head_dim),
                flops=self.flops,
                causal=parts.spec.causal,
            )
            self._handles += gate_layer(binding)
        src = parts.embeddings if cfg.router_layer == 0 else parts.parts[cfg.router_layer - 1].layer
        self._handles.append(src.register_forward_hook(self._route_hook))

    # -- attribute passthrough (config, device, ...) -----------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            reject_forward_like(name)  # forward / generation methods of the inner model: not passed through
            return getattr(self.model, name)

    @property
    def last(self) -> ForwardInfo | None:
        """What the latest forward decided and spent. A forward that leaves only the kept counts (the
        CPU engine's batch 1, :func:`dynprune.exec.whole_forward`) leaves a function that builds it:
        it runs on the first read, not inside the forward, whose time it would add to (torch work
        between ONNX Runtime calls slowed the next call by several times its own cost)."""
        if callable(self._last):
            self._last = self._last()
        return self._last

    @last.setter
    def last(self, info: ForwardInfo | Callable[[], ForwardInfo] | None) -> None:
        self._last = info

    def added_parameters(self) -> Iterator[nn.Parameter]:
        """What wrapping added to the pretrained model (the router): it trains from scratch, with its
        own learning rate (``dynprune.train.trainer.param_groups``)."""
        return self.router.parameters()

    # -- forward -----------------------------------------------------------------------
    def forward(
        self,
        *args: Any,
        budget: float | Tensor | MeanBudget | GovernedMean | ThresholdRoute | TimeBudget | None = None,
        masks: UnitMasks | None = None,
        **kwargs: Any,
    ) -> Any:
        """The HF model's forward under gates. Decoders: ``cache=`` a :class:`GatedKVCache` (or
        ``use_cache=True`` to get one back) holds the prefill's gates for later steps."""
        if isinstance(budget, (MeanBudget, GovernedMean)):
            if masks is not None:
                raise ValueError("masks= chooses the units itself; it cannot be combined with a MeanBudget")
            return mean_budget_forward(self, budget, args, kwargs)
        return self._gated_call(self.model, args, kwargs, budget, masks)

    def _gated_call(
        self,
        run: ForwardLike,
        args: tuple,
        kwargs: dict,
        budget: float | Tensor | ThresholdRoute | TimeBudget | None,
        masks: UnitMasks | None,
    ) -> Any:
        batch, device = batch_and_device(args, kwargs)
        if not self.training and self._use_gathered() and torch.is_autocast_enabled(device.type):
            # the gathered path computes in the weights' dtype (in-place addmm): under autocast (e.g. the
            # evaluation inside a bf16 training run) it runs as without it
            with torch.autocast(device.type, enabled=False):
                return self._gated_call(run, args, kwargs, budget, masks)
        time_ms = time_router = None
        if isinstance(budget, TimeBudget):
            if self.training or self.parts.spec.causal:
                raise ValueError("time budgets (ms) are for encoders in eval mode; train with FLOPs budgets")
            require_table(self)  # attached and measured for this model, else an error that says how
            # the FLOPs cap is lifted: the table's ms bound the units
            time_ms, time_router, budget = budget.ms, budget.router, 1.0
        budgets, router_budgets, threshold = route_budgets(
            self.gate_config.default_budget if budget is None else budget, batch, device
        )
        if threshold is not None and self.parts.spec.causal:
            raise ValueError(
                "mean budgets are implemented for encoders; a decoder takes a cap per sequence (a float)"
            )
        if threshold is None and masks is None and not self.training and self._use_gathered():
            time = None if time_ms is None else TimePricing(time_ms, time_router)  # a ms budget
            out = whole_forward(self, device, args, kwargs, budgets, time)  # batch 1 on CPU: one ORT call
            if out is not None:
                return out
        if masks is not None:
            masks.check_shape(batch, self.n_gated, self.parts.n_heads, self.n_slices)
            masks = UnitMasks(masks.head.to(device), masks.ffn.to(device), masks.layer.to(device)).canonical()
        cache = self._decoder_cache(kwargs, budgets, masks) if self.parts.spec.causal else None
        held = None if cache is None else cache.decision
        if held is not None and held.batch != batch:
            raise ValueError(f"this GatedKVCache was filled for a batch of {held.batch}, not {batch}")
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None and len(args) > 1 and isinstance(args[1], Tensor):
            attention_mask = args[1]
        self._state.begin(
            budgets,
            attention_mask,
            masks,
            gathered=self._use_gathered(),
            backend=self._backend(device),
            router_budget=router_budgets,
            threshold=threshold,
            time_ms=time_ms,
            time_router=time_router,
        )
        self._state.held = held
        recorder = self._training_free_prefill(held, masks, budgets)
        self._state.recorder = recorder
        fast = None if self.training or not self._use_gathered() else engine_for(self, device, kwargs, args)
        try:
            if fast is not None:  # CPU eval: encoder layers on ONNX Runtime (dynprune.exec)
                with fast.swapped():
                    out = run(*args, **kwargs)
            elif recorder is not None:  # training-free: the prompt runs dense, its activations recorded
                with recorder.recording(self._state.valid):
                    out = run(*args, **kwargs)
                self._decide_from_prefill(cache, batch)
            else:
                out = run(*args, **kwargs)
            if recorder is None and cache is not None and held is None and self._state.info is not None:
                cache.hold(self._state.info, self._state.plans, batch)
        finally:
            self.last = self._state.end()
        return out

    # training-free router (GateConfig.griffin): dynprune/training_free.py
    _training_free_prefill = prefill_recorder
    _decide_from_prefill = decide_from_prefill

    def _decoder_cache(self, kwargs: dict, budgets: Tensor, masks: UnitMasks | None) -> GatedKVCache | None:
        """The GatedKVCache of a gated decoder call (made when ``use_cache=True``), or None.

        Dense calls (budget 1.0, no masks, no GatedKVCache) keep HF's own cache untouched."""
        name = "cache" if "cache" in kwargs or "past_key_values" not in kwargs else "past_key_values"
        cache = kwargs.get(name)
        if isinstance(cache, GatedKVCache):
            return cache
        dense = masks is None and bool((budgets >= 1.0).all())
        if dense:
            return None
        if cache is not None:
            raise TypeError(
                f"a gated decoder (budget < 1) needs a dynprune.GatedKVCache, got {type(cache).__name__}; "
                "use GatedModel.generate(...) or cache=gated.new_cache()"
            )
        if kwargs.get("use_cache"):
            kwargs[name] = cache = self.new_cache()
            return cache
        kwargs["use_cache"] = False  # HF would otherwise make a DynamicCache the gated layers cannot fill
        return None

    def new_cache(self) -> GatedKVCache:
        """An empty KV cache for this gated decoder (gates are decided at its first forward)."""
        if not self.parts.spec.causal:
            raise ValueError(f"{self.parts.spec.family} is not a decoder: it has no KV cache")
        return GatedKVCache(self.parts.n_layers, self.gate_config.router_layer)

    def generate(self, *args: Any, budget: float | Tensor | None = None, **kwargs: Any) -> Tensor:
        """HF ``generate`` through the gated forward: gates decided once from each prompt at prefill
        and held for the whole generation (docs/architecture.md, "KV cache"). Greedy and sampling,
        batched with left padding; per-sample budgets."""
        return gated_generate(self, args, kwargs, budget)

    @contextmanager
    def running(
        self, execution: Execution | None = None, backend: Backend | None = None
    ) -> Iterator[GatedModel]:
        """Forwards inside the block run on ``execution`` ("masked": HF layers x gate multipliers,
        "gathered": only kept units, "auto": by train/eval mode) and/or ``backend`` instead of what
        ``gate_config`` says. The config object is never changed (it describes the model and is
        saved with its gates); the previous choice is back when the block ends, even on error."""
        if execution is not None:
            check_choice("execution", execution, EXECUTIONS)
        if backend is not None:
            check_choice("backend", backend, BACKENDS)
        saved = self._execution, self._backend_choice
        self._execution = execution or saved[0]
        self._backend_choice = backend or saved[1]
        try:
            yield self
        finally:
            self._execution, self._backend_choice = saved

    def _use_gathered(self) -> bool:
        mode = self._execution or self.gate_config.execution
        if mode == "auto":
            return not self.training
        return mode == "gathered"

    @property
    def backend_choice(self) -> Backend:
        """The backend forwards use now: ``running(backend=...)``'s, else ``gate_config.backend``."""
        return self._backend_choice or self.gate_config.backend

    def _backend(self, device: torch.device) -> str:
        choice = self.backend_choice
        if choice == "auto":
            return "triton" if device.type == "cuda" else "torch"
        return "torch" if choice == "onnxruntime" else choice  # onnxruntime: dynprune.exec, else torch

    # -- routing (a forward hook on the router's input): dynprune/routing.py --------------
    _route_hook = route_hook
    _route = route

    # -- unit order --------------------------------------------------------------------
    @contextmanager
    def original_unit_order(self):
        """Temporarily restore the base model's original head/neuron order (e.g. to save it)."""
        gated = self.parts.parts[self.gate_config.router_layer :]
        undo_orders(gated, self.head_perm, self.ffn_perm, self.parts.n_heads)
        try:
            yield self.model
        finally:
            apply_orders(gated, self.head_perm, self.ffn_perm, self.parts.n_heads)

    def reorder_units(self, head_perm: Tensor, ffn_perm: Tensor) -> None:
        """Replace the importance order (perms map new position -> ORIGINAL unit index)."""
        gated = self.parts.parts[self.gate_config.router_layer :]
        undo_orders(gated, self.head_perm, self.ffn_perm, self.parts.n_heads)
        apply_orders(gated, head_perm, ffn_perm, self.parts.n_heads)
        self.head_perm.copy_(head_perm)
        self.ffn_perm.copy_(ffn_perm)


def wrap(
    model: nn.Module, config: GateConfig | None = None, *, orders: tuple[Tensor, Tensor] | None = None
) -> GatedModel:
    """Add routers and gates to a supported HF model (in place) and return the GatedModel.

    Identity at init: with budget 1.0 (the default) outputs equal the
    unwrapped model's. ``orders`` = (head_perm (L, n_heads), ffn_perm (L,
    ffn_dim)) overrides ``config.unit_order`` (used when loading saved gates).
    """
    cfg = config or GateConfig()
    if isinstance(model, GatedModel):
        raise ValueError("this model is already a GatedModel; dynprune.unwrap(...) it first to wrap it again")
    if getattr(model, _MARK, False):
        raise ValueError("this model is already wrapped by dynprune; call dynprune.unwrap(gated) first")
    parts = resolve(model)
    if parts.ffn_dim % cfg.ffn_slice_size:
        divisors = [s for s in (32, 64, 128, 256, 512) if parts.ffn_dim % s == 0]
        raise ValueError(
            f"ffn_slice_size={cfg.ffn_slice_size} does not divide the FFN width {parts.ffn_dim}; "
            f"choose a divisor, e.g. one of {divisors}"
        )
    if cfg.router_layer >= parts.n_layers:
        raise ValueError(f"router_layer={cfg.router_layer} must be < the number of layers ({parts.n_layers})")
    gated = parts.parts[cfg.router_layer :]
    if orders is None:
        if cfg.unit_order == "weight_norm":
            orders = weight_norm_orders(gated, parts.n_heads)
        else:
            orders = identity_orders(len(gated), parts.n_heads, parts.ffn_dim)
    head_perm, ffn_perm = orders
    want_h, want_f = (len(gated), parts.n_heads), (len(gated), parts.ffn_dim)
    if tuple(head_perm.shape) != want_h or tuple(ffn_perm.shape) != want_f:
        raise ValueError(
            f"unit orders have shapes {tuple(head_perm.shape)}/{tuple(ffn_perm.shape)}, expected {want_h}/{want_f}"
        )
    apply_orders(gated, head_perm, ffn_perm, parts.n_heads)
    gm = GatedModel(model, cfg, parts, head_perm, ffn_perm)
    gm.to(next(model.parameters()).device)
    gm.train(model.training)
    object.__setattr__(model, _MARK, True)
    return gm


def unwrap(gated: GatedModel) -> nn.Module:
    """Remove routers, hooks and unit reordering; returns the original HF model (in place)."""
    if not isinstance(gated, GatedModel):
        raise ValueError(f"unwrap expects a GatedModel, got {type(gated).__name__}")
    for h in gated._handles:
        h.remove()
    gated._handles = []
    gated_parts = gated.parts.parts[gated.gate_config.router_layer :]
    undo_orders(gated_parts, gated.head_perm, gated.ffn_perm, gated.parts.n_heads)
    for lp in gated_parts:
        ungate_layer(lp.layer)
    model = gated.model
    object.__delattr__(model, _MARK)
    return model
