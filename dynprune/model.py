"""``wrap`` / ``unwrap`` and the GatedModel they return."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from dynprune.arch import ModelParts, resolve
from dynprune.budget import MeanBudget, ThresholdRoute
from dynprune.calibration import Calibration, mean_budget_forward
from dynprune.config import GateConfig
from dynprune.flops import FlopsModel, build_flops_model
from dynprune.gates import (
    Gates,
    UnitMasks,
    add_noise,
    fill_ungated,
    probabilities,
    relaxed,
    select_under_budget,
    straight_through,
)
from dynprune.gathered import PackedQKV
from dynprune.layers import LayerBinding, gate_layer, ungate_layer
from dynprune.ordering import apply_orders, identity_orders, undo_orders, weight_norm_orders
from dynprune.route_host import route_on_host
from dynprune.router import Router
from dynprune.state import ForwardInfo, GateState

Tensor = torch.Tensor
_MARK = "_dynprune_wrapped"


class GatedModel(nn.Module):
    """A HF model with routers and gates. Call it like the model, plus ``budget=``.

    ``budget``: float or (B,) tensor of fractions of dense FLOPs in (0, 1]
    (default ``GateConfig.default_budget``): a cap per sample; or a
    :class:`~dynprune.budget.MeanBudget`: a mean over the inputs, spent by the
    policy calibrated for it (``self.calibration``); ``masks``: explicit
    :class:`UnitMasks` instead of the router (for tests and baselines).
    After each call, ``self.last`` is a :class:`ForwardInfo`.
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
        self.last: ForwardInfo | None = None
        # per mean-budget target: the fitted policy (dynprune calibrate; saved with the gates)
        self.calibration = Calibration()
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
                qkv=PackedQKV(lp, parts.n_heads, parts.head_dim),
                flops=self.flops,
            )
            self._handles += gate_layer(binding)
        src = parts.embeddings if cfg.router_layer == 0 else parts.parts[cfg.router_layer - 1].layer
        self._handles.append(src.register_forward_hook(self._route_hook))

    # -- attribute passthrough (config, device, generate, ...) -------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -- forward -----------------------------------------------------------------------
    def forward(
        self,
        *args: Any,
        budget: float | Tensor | MeanBudget | ThresholdRoute | None = None,
        masks: UnitMasks | None = None,
        **kwargs: Any,
    ) -> Any:
        if isinstance(budget, MeanBudget):
            if masks is not None:
                raise ValueError("masks= chooses the units itself; it cannot be combined with a MeanBudget")
            return mean_budget_forward(self, budget, args, kwargs)
        batch, device = _batch_and_device(args, kwargs)
        router_budget, threshold = None, None
        if isinstance(budget, ThresholdRoute):
            full = lambda v: torch.full((batch,), float(v), dtype=torch.float64, device=device)  # noqa: E731
            budgets, router_budget, threshold = full(budget.cap or 1.0), full(budget.target), budget.threshold
        else:
            budgets = normalize_budget(
                self.gate_config.default_budget if budget is None else budget, batch, device
            )
        if masks is not None:
            masks.check_shape(batch, self.n_gated, self.parts.n_heads, self.n_slices)
            masks = UnitMasks(masks.head.to(device), masks.ffn.to(device), masks.layer.to(device)).canonical()
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None and len(args) > 1 and isinstance(args[1], Tensor):
            attention_mask = args[1]
        self._state.begin(
            budgets,
            attention_mask,
            masks,
            gathered=self._use_gathered(),
            backend=self._backend(device),
            router_budget=router_budget,
            threshold=threshold,
        )
        try:
            out = self.model(*args, **kwargs)
        finally:
            self.last = self._state.end()
        if self.last is not None and isinstance(budget, ThresholdRoute):
            self.last.mean_target = budget.target
        return out

    def _use_gathered(self) -> bool:
        mode = self.gate_config.execution
        if mode == "auto":
            return not self.training
        return mode == "gathered"

    def _backend(self, device: torch.device) -> str:
        choice = self.gate_config.backend
        if choice == "auto":
            return "triton" if device.type == "cuda" else "torch"
        return choice

    # -- routing (a forward hook on the router's input) --------------------------------
    def _route_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        state = self._state
        if not state.active:
            return
        hidden = output[0] if isinstance(output, tuple) else output  # (B, T, H)
        state.info = self._route(hidden, state)
        state.gates = state.info.gates

    def _route(self, hidden: Tensor, state: GateState) -> ForwardInfo:
        fast = route_on_host(self, hidden, state)  # eval mode on CPU: same result, ~7x fewer ops
        if fast is not None:
            return fast
        cfg, fm = self.gate_config, self.flops
        batch, seq = hidden.shape[:2]
        dense = fm.dense(seq)
        assert state.budget is not None and state.router_budget is not None
        budget, router_budget = state.budget, state.router_budget  # cap per sample, router's input
        dims = (self.n_gated, self.parts.n_heads, self.n_slices)
        if state.forced_masks is not None:
            m = state.forced_masks
            flops = fm.fixed(seq, with_router=False) + fm.gated_units(
                m.head.double(), m.ffn.double(), m.layer.double(), seq
            )
            return ForwardInfo(budget, seq, dense, flops, gates=m.to_gates(hidden.dtype), masks=m)
        routed = router_budget < 1.0
        if not bool(routed.any()):
            return ForwardInfo(
                budget, seq, dense, torch.full((batch,), dense, dtype=torch.float64, device=hidden.device)
            )
        rows = None if bool(routed.all()) else routed.nonzero().squeeze(1)
        sub = lambda t: t if (rows is None or t is None) else t.index_select(0, rows)  # noqa: E731
        sub_budget = sub(budget)
        available = sub_budget.double() * dense - fm.fixed(seq)  # (n,) FLOPs the gated layers may spend
        if bool((available < 0).any()):
            least = fm.fixed(seq) / dense
            raise ValueError(
                f"budget {float(sub_budget.min()):.4f} is below the smallest this gated model can run at "
                f"sequence length {seq}: {least:.4f} of dense FLOPs (router, task head and "
                f"{cfg.router_layer} dense layer(s) always run)"
            )
        scores = self.router(sub(hidden), sub(state.attention_mask), sub(router_budget))
        n = sub_budget.shape[0]
        probs = fill_ungated(probabilities(scores), n, *dims, like=hidden)
        expected = fm.fixed(seq) + fm.gated_units(probs.head, probs.ffn, probs.layer, seq)
        masks = None
        if self.training:
            noisy = add_noise(scores, cfg.nested)
            soft = fill_ungated(relaxed(noisy, cfg.temperature), n, *dims, like=hidden)
            if cfg.hard:
                masks = select_under_budget(noisy, available, fm, seq, state.threshold)
                gates_sub = straight_through(masks, soft)
            else:
                gates_sub = soft
        else:
            masks = select_under_budget(scores, available, fm, seq, state.threshold)
            gates_sub = masks.to_gates(hidden.dtype)
        gates = _scatter_rows(gates_sub, rows, batch, dims, hidden)
        full_masks = None if masks is None else gates.masks()
        if full_masks is not None:
            used = fm.gated_units(
                full_masks.head.double(), full_masks.ffn.double(), full_masks.layer.double(), seq
            )
            flops = torch.where(routed, fm.fixed(seq) + used, torch.full_like(used, dense))
        else:
            flops = torch.full((batch,), dense, dtype=torch.float64, device=hidden.device)
            flops = (
                flops.index_put((rows,), expected.detach().double())
                if rows is not None
                else expected.detach().double()
            )
        return ForwardInfo(
            budget,
            seq,
            dense,
            flops,
            gates=gates,
            masks=full_masks,
            scores=scores,
            routed_rows=rows,
            expected_flops=expected,
        )

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


def _scatter_rows(
    gates: Gates, rows: Tensor | None, batch: int, dims: tuple[int, int, int], like: Tensor
) -> Gates:
    """Gates for the routed rows -> full batch (unrouted rows: all ones = dense)."""
    if rows is None:
        return gates
    n_layers, n_heads, n_slices = dims

    def full(part: Tensor, *shape: int) -> Tensor:
        out = torch.ones(batch, *shape, dtype=part.dtype, device=part.device)
        return out.index_put((rows,), part)

    return Gates(
        full(gates.head, n_layers, n_heads),
        full(gates.ffn, n_layers, n_slices),
        full(gates.layer, n_layers),
        gates.hard,
    )


def _batch_and_device(args: tuple, kwargs: dict) -> tuple[int, torch.device]:
    for t in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(t, Tensor):
            return t.shape[0], t.device
    raise ValueError("GatedModel needs input_ids or inputs_embeds (as a tensor) to know the batch size")


def normalize_budget(budget: float | Tensor, batch: int, device: torch.device) -> Tensor:
    """float or (B,) tensor -> validated (B,) float64 tensor; nothing is clamped."""
    if isinstance(budget, Tensor):
        if budget.dim() == 0:
            budget = budget.reshape(1).expand(batch)
        elif budget.shape != (batch,):
            raise ValueError(
                f"per-sample budget must have shape ({batch},) for a batch of {batch}, got {tuple(budget.shape)}"
            )
        b = budget.detach().to(device=device, dtype=torch.float64)
    else:
        try:
            value = float(budget)
        except (TypeError, ValueError) as err:
            raise ValueError(f"budget must be a float or a tensor, got {type(budget).__name__}") from err
        b = torch.full((batch,), value, dtype=torch.float64, device=device)
        if 0.0 < value <= 1.0:  # valid (NaN fails the test): skip the tensor checks (batch-1 latency)
            return b
    bad = ~(torch.isfinite(b) & (b > 0) & (b <= 1))
    if bool(bad.any()):
        raise ValueError(
            f"budget must be a fraction of dense FLOPs in (0, 1] (1.0 = dense); got {b[bad][0].item()!r}"
            + (f" at sample {int(bad.nonzero()[0])}" if batch > 1 else "")
        )
    return b


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
