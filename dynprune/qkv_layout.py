"""The one Q/K/V layout, shared by the gathered torch path and the Triton kernels.

Q/K/V weights are packed KV-group-major: ``(n_units, G + 2, head_dim, hidden)``
where a *unit* is one KV head with the ``G = n_query_heads / n_kv_heads`` query
heads that read it (MHA: G = 1, the unit is a head and the pack is
``(n_heads, 3, head_dim, hidden)``). Per unit: its G query heads, then its K,
then its V. So

- a run of units is one contiguous view of the pack: the gathered path
  projects Q, K and V of the kept units of a block with one matmul, and a
  skipped unit's K/V are never projected (nor cached);
- the Triton kernels (``dynprune.kernels.gated_attention``) read the same
  buffer layout, ``(…, n_units * (G + 2) * head_dim)`` per token.

:class:`PackedWeights` holds the pack of one gated layer (rebuilt when the
source parameters change) and the per-run weight views the gathered path uses.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from dynprune.arch import LayerParts

Tensor = torch.Tensor


class KernelInputError(ValueError):
    """Bad input to a dynprune Triton kernel (shape, dtype, device, layout, index range), or
    Q/K/V weights that do not fit this layout. Defined here, with the layout the kernels read,
    so that :func:`pack_qkv` raises it for both paths; ``dynprune.kernels.common`` exports it."""


def pack_qkv(
    w_q: Tensor,
    w_k: Tensor,
    w_v: Tensor,
    b_q: Tensor | None,
    b_k: Tensor | None,
    b_v: Tensor | None,
    n_heads: int,
    n_kv_heads: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """nn.Linear-style Q (nh*d, H), K/V (n_kv*d, H) -> packed (n_kv*(G+2)*d, H) weight and bias.

    ``n_heads`` counts query heads. Bias: None when all three are None. Weights that do not fit
    the layout: :class:`KernelInputError` (a ValueError), for the gathered path and the kernels.
    """
    n_kv = n_kv_heads or n_heads
    if n_heads % n_kv:
        raise KernelInputError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
    group = n_heads // n_kv
    hidden = w_q.shape[1]
    if w_q.shape[0] % n_heads:
        raise KernelInputError(f"query width {w_q.shape[0]} is not divisible by n_heads={n_heads}")
    d = w_q.shape[0] // n_heads
    for name, w in (("w_k", w_k), ("w_v", w_v)):
        if tuple(w.shape) != (n_kv * d, hidden):
            raise KernelInputError(f"{name} has shape {tuple(w.shape)}, expected ({n_kv * d}, {hidden})")
    parts = [
        w_q.reshape(n_kv, group, d, hidden),
        w_k.reshape(n_kv, 1, d, hidden),
        w_v.reshape(n_kv, 1, d, hidden),
    ]
    weight = torch.cat(parts, dim=1).reshape(-1, hidden).contiguous()  # (n_kv*(G+2)*d, H)
    if b_q is None and b_k is None and b_v is None:
        return weight, None
    zeros = lambda n: w_q.new_zeros(n)  # noqa: E731
    bs = [
        (b_q if b_q is not None else zeros(n_heads * d)).reshape(n_kv, group, d),
        (b_k if b_k is not None else zeros(n_kv * d)).reshape(n_kv, 1, d),
        (b_v if b_v is not None else zeros(n_kv * d)).reshape(n_kv, 1, d),
    ]
    return weight, torch.cat(bs, dim=1).reshape(-1).contiguous()


def units_of(t: Tensor, units: slice | Tensor, dim: int) -> Tensor:
    """Unit selection along ``dim``: a view for a run, a gather (copy) for an index tensor."""
    return t[(slice(None),) * dim + (units,)] if isinstance(units, slice) else t.index_select(dim, units)


def expand_units(units: slice | Tensor, width: int, device: torch.device) -> slice | Tensor:
    """Unit run/indices -> column run/indices for units of ``width`` columns each."""
    if isinstance(units, slice):
        return slice(units.start * width, units.stop * width)
    offs = torch.arange(width, device=device)
    return (units[:, None] * width + offs).reshape(-1)


class PackedWeights:
    """Weights of one gated layer as the gathered path uses them, rebuilt when parameters change.

    - ``get()``: the packed Q/K/V ``(n_units, G + 2, head_dim, hidden)`` + bias
      ``(n_units, G + 2, head_dim)`` (zeros when the model has none; the Triton
      backend reads the same pack);
    - ``attention(units)`` / ``ffn(cols)``: the (transposed) weight *views* of a
      run of head units / FFN columns, cached per run while gradients are off
      (the same prefixes recur forward after forward; a view costs a few µs).
      Units given as an index tensor (arbitrary subsets: gathered *copies*) are
      cached per tensor object while it lives, so the blocks of a plan held for a
      whole generation (``attention(units)`` / ``ffn_units(units, s)``) copy their
      weights once, at the first step, not at every decoded token.
    """

    def __init__(self, parts: LayerParts, n_units: int, heads_per_unit: int, head_dim: int) -> None:
        self.parts, self.n_units, self.group, self.head_dim = parts, n_units, heads_per_unit, head_dim
        self._key: tuple | None = None
        self.weight: Tensor | None = None  # (U, G+2, d, H)
        self.bias: Tensor | None = None  # (U, G+2, d)
        self._views: dict[tuple, tuple] = {}
        self._copies: dict[tuple, tuple] = {}  # (kind, id(index tensor)) -> (weakref to it, views)
        modules = {
            id(p.module): p.module
            for p in (parts.q, parts.k, parts.v, parts.o, parts.up, parts.down, parts.gate_proj)
            if p is not None
        }
        self._modules = list(modules.values())

    @property
    def unit_width(self) -> int:
        """Packed Q/K/V rows per unit: (G + 2) * head_dim."""
        return (self.group + 2) * self.head_dim

    def _version(self) -> tuple:
        params = [t for m in self._modules for t in (m.weight, m.bias) if t is not None]
        return tuple((t.data_ptr(), t._version, t.dtype) for t in params)

    def get(self) -> tuple[Tensor, Tensor]:
        key = self._version()
        if key != self._key:
            p, u, g, d = self.parts, self.n_units, self.group, self.head_dim
            with torch.no_grad():
                w, b = pack_qkv(
                    p.q.weight.detach(),
                    p.k.weight.detach(),
                    p.v.weight.detach(),
                    *(None if t.bias is None else t.bias.detach() for t in (p.q, p.k, p.v)),
                    n_heads=u * g,
                    n_kv_heads=u,
                )
                self.weight = w.view(u, g + 2, d, -1)
                self.bias = (b if b is not None else w.new_zeros(w.shape[0])).view(u, g + 2, d)
            self._views.clear()
            self._copies.clear()
            self._key = key
        assert self.weight is not None and self.bias is not None
        return self.weight, self.bias

    def _copied(self, kind: str, units: Tensor, make: Callable[[], tuple]) -> tuple:
        """Views of an index-tensor selection, made once per live tensor (gradients off)."""
        if torch.is_grad_enabled():
            return make()
        key = (kind, id(units))
        hit = self._copies.get(key)
        if hit is not None and hit[0]() is units:
            return hit[1]
        views = make()
        copies = self._copies
        copies[key] = (weakref.ref(units, lambda _ref, k=key: copies.pop(k, None)), views)
        return views

    def attention(self, units: slice | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(W_qkv of the units, transposed (H, k*(G+2)*d); their bias; O columns, transposed (k*G*d, H))."""
        if not isinstance(units, slice):
            return self._copied("a", units, lambda: self._attention(units))
        return self._attention(units)

    def ffn_units(
        self, units: slice | Tensor, slice_size: int
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor]:
        """:meth:`ffn` of the columns of FFN slices ``units`` (``slice_size`` columns each)."""
        cols = expand_units(units, slice_size, self.parts.down.weight.device)
        if not isinstance(units, slice):
            return self._copied("f", units, lambda: self.ffn(cols))
        return self.ffn(cols)

    def _attention(self, units: slice | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        key = ("a", units.start, units.stop) if isinstance(units, slice) else None
        views = self._views.get(key) if key is not None else None
        if views is None:
            w_qkv, b_qkv = self.get()
            hidden = w_qkv.shape[-1]
            w = units_of(w_qkv, units, 0).reshape(-1, hidden)  # (k*(G+2)*d, H), a view for a run
            b = units_of(b_qkv, units, 0).reshape(-1)
            w_o = self.parts.o.weight  # (H, U*G*d)
            cols = expand_units(units, self.group * self.head_dim, w_o.device)
            views = (w.t(), b, units_of(w_o, cols, 1).t())  # O: (k*G*d, H)
            if key is not None and not torch.is_grad_enabled():
                self._views[key] = views
        return views

    def ffn(self, cols: slice | Tensor) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor]:
        """(up rows (k*s, H), up bias, gate rows, gate bias, down columns transposed (k*s, H))."""
        key = ("f", cols.start, cols.stop) if isinstance(cols, slice) else None
        views = self._views.get(key) if key is not None else None
        if views is None:
            p = self.parts
            pick = lambda t: None if t is None else units_of(t, cols, 0)  # noqa: E731
            gate = p.gate_proj
            views = (
                pick(p.up.weight),
                pick(p.up.bias),
                None if gate is None else pick(gate.weight),
                None if gate is None else pick(gate.bias),
                units_of(p.down.weight, cols, 1).t(),
            )
            if key is not None and not torch.is_grad_enabled():
                self._views[key] = views
        return views
