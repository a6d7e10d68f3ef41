"""Gated FFN: up-projection -> activation -> down-projection over each sample's kept slices only.

``out[b] = sum over kept slices s of act(x[b] @ W_up[s].T + b_up[s]) @ W_down[:, s].T``
(SwiGLU: ``act(x @ W_gate[s].T + b_gate[s]) * (x @ W_up[s].T + b_up[s])``), where a slice is
``slice_size`` consecutive intermediate features. No down bias: the caller adds
bias and residual. Each sample (row group of T rows) has its own keep list; an
empty keep list gives a zero output.

Kernels (dynprune.kernels.gathered_gemm): one *expand* launch computes the
kept intermediate columns with the activation fused into its epilogue (for
SwiGLU both the gate and the up tile are accumulated by the same program, so
the gated product never leaves registers), one *contract* launch reduces over
the kept columns only. A weight tile of a skipped slice is never loaded: expand
programs whose column block lies past the sample's kept columns exit at once,
and contract loops over kept columns only. The intermediate lives in a
(B, T, I) buffer of which only kept columns are written and read.

Limits: x, weights and biases share one dtype (fp32, fp16 or bf16; fp32
accumulation); activations "gelu" (exact erf, HF's "gelu"), "gelu_tanh",
"relu", "silu" (with ``w_gate``: SwiGLU); contiguous tensors; slice_size must
divide the intermediate width; tiles as in gathered_gemm (block sizes 16-128).
To share one keep list across a whole batch, pass x as (1, B*T, H). Row blocks never
span two groups, so a group of T rows fills min(T, 128)-row MMA tiles: with T = 1
(decode) each sample streams its own kept weights (memory-bound), unless samples
with one shared keep list are passed as one group.
"""

from __future__ import annotations

import torch
from dynprune.kernels.common import (
    KeepLists,
    KernelInputError,
    as_keep,
    check_float,
    check_tensor,
    require_runnable,
)
from dynprune.kernels.gathered_gemm import ACTIVATIONS, torch_activation, unit_contract, unit_expand
from dynprune.kernels.tiles import Tiles

Tensor = torch.Tensor
KeepArg = Tensor | KeepLists | list[list[int]]


def _slice_columns(units: Tensor, slice_size: int) -> Tensor:
    return (units.long()[:, None] * slice_size + torch.arange(slice_size, device=units.device)).reshape(-1)


def gated_ffn_ref(
    x: Tensor,
    keep: KeepArg,
    w_up: Tensor,
    b_up: Tensor | None,
    w_down: Tensor,
    *,
    slice_size: int,
    activation: str = "gelu",
    w_gate: Tensor | None = None,
    b_gate: Tensor | None = None,
) -> Tensor:
    """Pure-PyTorch oracle (and the definition) of :func:`gated_ffn`, computed in x's dtype."""
    batch, seq = x.shape[:2]
    keep_lists = as_keep(keep, batch, w_up.shape[0] // slice_size, x.device)
    act = torch_activation(_canonical_activation(activation, w_gate))
    out = x.new_zeros(batch, seq, w_down.shape[0])
    for b in range(batch):
        cols = _slice_columns(keep_lists.idx[b, : int(keep_lists.count[b])], slice_size)
        pre = torch.nn.functional.linear(x[b], w_up[cols], None if b_up is None else b_up[cols])
        if w_gate is not None:
            gate = torch.nn.functional.linear(x[b], w_gate[cols], None if b_gate is None else b_gate[cols])
            inter = act(gate) * pre
        else:
            inter = act(pre)
        out[b] = inter @ w_down[:, cols].t()
    return out


def _canonical_activation(activation: str, w_gate: Tensor | None) -> str:
    if activation == "swiglu":
        if w_gate is None:
            raise KernelInputError("activation='swiglu' needs w_gate (the SwiGLU gate projection)")
        return "silu"
    if activation not in ACTIVATIONS or activation == "none":
        raise KernelInputError(
            f"FFN activation {activation!r} is not supported; choose gelu, gelu_tanh, relu, silu or swiglu"
        )
    return activation


def gated_ffn(
    x: Tensor,
    keep: KeepArg,
    w_up: Tensor,
    b_up: Tensor | None,
    w_down: Tensor,
    *,
    slice_size: int,
    activation: str = "gelu",
    w_gate: Tensor | None = None,
    b_gate: Tensor | None = None,
    trusted: bool = False,
    tiles: tuple[Tiles | None, Tiles | None] = (None, None),
) -> Tensor:
    """Gated FFN of x (B, T, H) over each sample's kept slices -> (B, T, H_out); no down bias.

    keep: a (B, n_slices) bool mask, :class:`KeepLists` or Python lists of kept
    slice indices per sample (any order, no duplicates). Weights as in
    ``nn.Linear``: w_up/w_gate (I, H), w_down (H_out, I). ``trusted=True`` skips
    the host-side index validation (for KeepLists built by keep_from_mask).
    ``tiles``: (expand, contract) tile overrides.
    """
    check_tensor("x", x, (None, None, None))
    batch, _, hidden = x.shape
    check_tensor("w_up", w_up, (None, hidden))
    inter = w_up.shape[0]
    if not isinstance(slice_size, int) or slice_size <= 0 or inter % slice_size:
        raise KernelInputError(
            f"slice_size={slice_size!r} must be a positive divisor of the FFN width {inter}"
        )
    check_tensor("w_down", w_down, (None, inter))
    for name, t in (
        ("x", x),
        ("w_up", w_up),
        ("w_down", w_down),
        ("b_up", b_up),
        ("w_gate", w_gate),
        ("b_gate", b_gate),
    ):
        if t is not None:
            check_float(name, t, x)
    if b_up is not None:
        check_tensor("b_up", b_up, (inter,))
    if w_gate is not None:
        check_tensor("w_gate", w_gate, (inter, hidden))
        if (b_gate is None) != (b_up is None):
            raise KernelInputError("give both b_up and b_gate, or neither")
    elif b_gate is not None:
        raise KernelInputError("b_gate given without w_gate")
    act = _canonical_activation(activation, w_gate)
    require_runnable(
        x, w_up, b_up, w_down, w_gate, b_gate, keep if isinstance(keep, Tensor) else None, what="gated_ffn"
    )
    n_slices = inter // slice_size
    if trusted and isinstance(keep, KeepLists):
        keep_lists = keep
    else:
        keep_lists = as_keep(keep, batch, n_slices, x.device)
    hidden_mid = unit_expand(
        x, w_up, b_up, keep_lists, slice_size, act, w_gate, b_gate, tiles=tiles[0]
    )  # (B, T, I), kept columns only
    return unit_contract(hidden_mid, w_down, keep_lists, slice_size, tiles=tiles[1])
