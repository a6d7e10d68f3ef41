"""Gathered GEMMs over kept units: the two matmul kernels every gated projection uses.

A *unit* is ``U`` consecutive output features of a weight (an FFN slice:
U = slice_size; a head's Q, K or V rows: U = head_dim). Rows come in groups
(a sample's T rows) and each group has its own keep list (common.KeepLists).

- expand  : ``Y[g, :, cols(u)] = act(X[g] @ W[cols(u)].T + b)`` for the kept units u of group g
            (FFN up / SwiGLU gate+up, Q/K/V projections). Columns of skipped units are
            not written (and their weight rows are never loaded).
- contract: ``Y[g] = sum over kept u of A[g, :, cols(u)] @ W[:, cols(u)].T``
            (FFN down, O projection). An empty keep list gives zeros.

Both keep the kept columns at their original positions ("scattered" layout):
expand writes the unit's columns where a dense layer would, contract reads
them there, so no index translation is needed between them.

Design (for H100; untuned, no GPU was available when written):
- 1-D grid over (row block, column block) with GROUP_M swizzling, so programs
  that read the same weight tile run close in time (L2 reuse; with nested keep
  lists every sample shares the prefix of the weight).
- A program whose column block (expand) lies past its group's kept columns
  exits at once; contract loops only over its group's kept K range.
- ALIGNED (unit width is a multiple of the tile along the unit axis): one unit
  per tile, so the gathered addresses are ``base + arange`` and loads vectorise;
  otherwise every column looks its unit up (correct for any U).
- fp32 accumulation; fp32 inputs use IEEE dots unless torch allows TF32.
Limits: fp32/fp16/bf16 (one dtype for all float inputs), contiguous row-major
tensors, int32 keep lists, tiles are powers of two >= 16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from dynprune.kernels.common import (
    KeepLists,
    KernelInputError,
    check_float,
    check_tensor,
    dot_precision,
    require_runnable,
    to_store,
    upcast_flag,
)
from dynprune.kernels.tiles import Tiles, default_tiles, sm_count

Tensor = torch.Tensor
ACTIVATIONS = {"none": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4}


def torch_activation(name: str) -> Callable[[Tensor], Tensor]:
    return {
        "none": lambda t: t,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
    }[name]


# ----------------------------------------------------------------------------- references
def _kept_columns(keep: KeepLists, g: int, unit: int) -> Tensor:
    units = keep.idx[g, : int(keep.count[g])].long()
    return (units[:, None] * unit + torch.arange(unit, device=units.device)).reshape(-1)


def unit_expand_ref(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    keep: KeepLists,
    unit: int,
    act: str = "none",
    w2: Tensor | None = None,
    b2: Tensor | None = None,
) -> Tensor:
    """PyTorch oracle of expand, in x's dtype; columns of skipped units are zero."""
    y = x.new_zeros(*x.shape[:2], w.shape[0])
    fn = torch_activation(act)
    for g in range(x.shape[0]):
        cols = _kept_columns(keep, g, unit)
        pre = F.linear(x[g], w[cols], None if b is None else b[cols])
        y[g][:, cols] = (
            fn(F.linear(x[g], w2[cols], None if b2 is None else b2[cols])) * pre
            if w2 is not None
            else fn(pre)
        )
    return y


def unit_contract_ref(a: Tensor, w: Tensor, keep: KeepLists, unit: int) -> Tensor:
    """PyTorch oracle of contract, in a's dtype."""
    y = a.new_zeros(*a.shape[:2], w.shape[0])
    for g in range(a.shape[0]):
        cols = _kept_columns(keep, g, unit)
        y[g] = a[g][:, cols] @ w[:, cols].t()
    return y


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _activate(x, ACT: tl.constexpr):
    if ACT == 1:  # exact GELU (HF "gelu")
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 2:  # tanh GELU; tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * z)
    elif ACT == 3:
        x = tl.maximum(x, 0.0)
    elif ACT == 4:  # SiLU
        x = x * tl.sigmoid(x)
    return x


@triton.jit
def _tile_coords(n_row_blocks, n_col_blocks, GROUP_M: tl.constexpr):
    """Swizzled (row block, column block) of this program."""
    pid = tl.program_id(0)
    width = GROUP_M * n_col_blocks
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(n_row_blocks - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _expand_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    w2_ptr,
    b2_ptr,
    y_ptr,
    idx_ptr,
    cnt_ptr,
    T,
    K,
    N,
    U,
    n_units,
    n_row_blocks,
    n_col_blocks,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ALIGNED: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(n_row_blocks, n_col_blocks, GROUP_M)
    blocks_per_group = tl.cdiv(T, BLOCK_M)
    g = pid_m // blocks_per_group
    n_cols = tl.load(cnt_ptr + g) * U  # kept columns of this group
    col0 = pid_n * BLOCK_N
    if col0 >= n_cols:
        return  # this column block is past the kept units: no weight is loaded
    offs_n = tl.arange(0, BLOCK_N)
    if ALIGNED:  # the tile lies inside one unit: contiguous source rows
        unit_id = tl.load(idx_ptr + g * n_units + col0 // U)
        src = unit_id * U + (col0 % U) + offs_n
        col_ok = offs_n < BLOCK_N
    else:
        cols = col0 + offs_n
        col_ok = cols < n_cols
        unit_ids = tl.load(idx_ptr + g * n_units + cols // U, mask=col_ok, other=0)
        src = unit_ids * U + cols % U
    t = (pid_m % blocks_per_group) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = t < T
    rows = g.to(tl.int64) * T + t  # (BLOCK_M,) int64
    offs_k = tl.arange(0, BLOCK_K)
    x_offs = rows[:, None] * K + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    w_offs = src[None, :] * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N) = W[src].T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        xt = tl.load(x_ptr + x_offs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + w_offs + k0, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=PREC)
        if GATED:
            w2t = tl.load(w2_ptr + w_offs + k0, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                w2t = w2t.to(tl.float32)
            acc2 = tl.dot(xt, w2t, acc2, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + src, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc2 += tl.load(b2_ptr + src, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:  # SwiGLU-style: act(gate) * up
        out = _activate(acc2, ACT) * acc
    else:
        out = _activate(acc, ACT)
    y_ptrs = y_ptr + rows[:, None] * N + src[None, :]
    tl.store(y_ptrs, to_store(out, y_ptr.dtype.element_ty, UPCAST), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _contract_kernel(
    a_ptr,
    w_ptr,
    y_ptr,
    idx_ptr,
    cnt_ptr,
    T,
    N,
    K,
    U,
    n_units,
    n_row_blocks,
    n_col_blocks,
    ALIGNED: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(n_row_blocks, n_col_blocks, GROUP_M)
    blocks_per_group = tl.cdiv(T, BLOCK_M)
    g = pid_m // blocks_per_group
    n_k = tl.load(cnt_ptr + g) * U  # kept reduction length of this group
    t = (pid_m % blocks_per_group) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = t < T
    rows = g.to(tl.int64) * T + t
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_k, BLOCK_K):
        if ALIGNED:  # the K tile lies inside one unit
            unit_id = tl.load(idx_ptr + g * n_units + k0 // U)
            src = unit_id * U + (k0 % U) + offs_k
            k_ok = offs_k < BLOCK_K
        else:
            ks = k0 + offs_k
            k_ok = ks < n_k
            unit_ids = tl.load(idx_ptr + g * n_units + ks // U, mask=k_ok, other=0)
            src = unit_ids * U + ks % U
        at = tl.load(
            a_ptr + rows[:, None] * K + src[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        wt = tl.load(
            w_ptr + n[None, :] * K + src[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0
        )  # (BLOCK_K, BLOCK_N) = W[:, src].T
        if UPCAST:
            at = at.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(at, wt, acc, input_precision=PREC)
    y_ptrs = y_ptr + rows[:, None] * N + n[None, :]
    tl.store(y_ptrs, to_store(acc, y_ptr.dtype.element_ty, UPCAST), mask=row_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------- launchers
def _check_groups(name: str, t: Tensor, keep: KeepLists, n_units: int) -> None:
    if keep.idx.shape != (t.shape[0], n_units) or keep.count.shape != (t.shape[0],):
        raise KernelInputError(
            f"keep lists have shapes {tuple(keep.idx.shape)}/{tuple(keep.count.shape)}, expected "
            f"({t.shape[0]}, {n_units})/({t.shape[0]},) for {name} with {t.shape[0]} groups and {n_units} units"
        )
    if keep.idx.dtype != torch.int32 or keep.count.dtype != torch.int32:
        raise KernelInputError("keep lists must be int32 (use keep_from_mask / keep_from_lists)")
    if not (keep.idx.is_contiguous() and keep.count.is_contiguous()):
        raise KernelInputError("keep lists must be contiguous")


def unit_expand(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    keep: KeepLists,
    unit: int,
    act: str = "none",
    w2: Tensor | None = None,
    b2: Tensor | None = None,
    *,
    out: Tensor | None = None,
    tiles: Tiles | None = None,
) -> Tensor:
    """Launch expand. x (G, T, K), w (n_units*unit, K) -> (G, T, n_units*unit); keep lists trusted.

    Columns of skipped units are left as they are in ``out`` (uninitialised when
    ``out`` is None): read only the kept columns, or pass a zeroed ``out``.
    """
    check_tensor("x", x, (None, None, None))
    groups, rows, k = x.shape
    check_tensor("w", w, (None, k))
    check_float("x", x, x)
    check_float("w", w, x)
    if act not in ACTIVATIONS:
        raise KernelInputError(f"activation {act!r} is not supported; choose from {sorted(ACTIVATIONS)}")
    width = w.shape[0]
    if unit <= 0 or width % unit:
        raise KernelInputError(f"unit width {unit} does not divide the output width {width}")
    n_units = width // unit
    for name, t in (("b", b), ("b2", b2)):
        if t is not None:
            check_tensor(name, t, (width,))
            check_float(name, t, x)
    if w2 is not None:
        check_tensor("w2", w2, (width, k))
        check_float("w2", w2, x)
    if (b is None) != (b2 is None) and w2 is not None:
        raise KernelInputError("give biases for both weights of a gated expand, or for neither")
    _check_groups("x", x, keep, n_units)
    require_runnable(x, w, b, w2, b2, keep.idx, keep.count, out, what="unit_expand")
    if out is None:
        out = torch.empty(groups, rows, width, dtype=x.dtype, device=x.device)
    else:
        check_tensor("out", out, (groups, rows, width), x.dtype)
    if groups == 0 or rows == 0:
        return out
    tl_tiles = tiles or default_tiles(
        "expand", groups, rows, width, unit, x.dtype, x.is_cuda, sm_count(x.device), gated=w2 is not None
    )
    tl_tiles.check()
    n_row_blocks = groups * triton.cdiv(rows, tl_tiles.block_m)
    n_col_blocks = triton.cdiv(width, tl_tiles.block_n)
    _expand_kernel[(n_row_blocks * n_col_blocks,)](
        x, w, b if b is not None else w, w2 if w2 is not None else w, b2 if b2 is not None else w,
        out, keep.idx, keep.count,
        rows, k, width, unit, n_units, n_row_blocks, n_col_blocks,
        ACT=ACTIVATIONS[act], GATED=w2 is not None, HAS_BIAS=b is not None,
        ALIGNED=unit % tl_tiles.block_n == 0, UPCAST=upcast_flag(x.dtype), PREC=dot_precision(x.dtype),
        BLOCK_M=tl_tiles.block_m, BLOCK_N=tl_tiles.block_n, BLOCK_K=tl_tiles.block_k, GROUP_M=tl_tiles.group_m,
        num_warps=tl_tiles.num_warps, num_stages=tl_tiles.num_stages,
    )  # fmt: skip
    return out


def unit_contract(
    a: Tensor, w: Tensor, keep: KeepLists, unit: int, *, out: Tensor | None = None, tiles: Tiles | None = None
) -> Tensor:
    """Launch contract. a (G, T, n_units*unit), w (N, n_units*unit) -> (G, T, N); keep lists trusted."""
    check_tensor("a", a, (None, None, None))
    groups, rows, k = a.shape
    check_tensor("w", w, (None, k))
    check_float("a", a, a)
    check_float("w", w, a)
    if unit <= 0 or k % unit:
        raise KernelInputError(f"unit width {unit} does not divide the reduction width {k}")
    n_units = k // unit
    _check_groups("a", a, keep, n_units)
    require_runnable(a, w, keep.idx, keep.count, out, what="unit_contract")
    n = w.shape[0]
    if out is None:
        out = torch.empty(groups, rows, n, dtype=a.dtype, device=a.device)
    else:
        check_tensor("out", out, (groups, rows, n), a.dtype)
    if groups == 0 or rows == 0:
        return out
    tl_tiles = tiles or default_tiles(
        "contract", groups, rows, n, unit, a.dtype, a.is_cuda, sm_count(a.device)
    )
    tl_tiles.check()
    n_row_blocks = groups * triton.cdiv(rows, tl_tiles.block_m)
    n_col_blocks = triton.cdiv(n, tl_tiles.block_n)
    _contract_kernel[(n_row_blocks * n_col_blocks,)](
        a, w, out, keep.idx, keep.count,
        rows, n, k, unit, n_units, n_row_blocks, n_col_blocks,
        ALIGNED=unit % tl_tiles.block_k == 0, UPCAST=upcast_flag(a.dtype), PREC=dot_precision(a.dtype),
        BLOCK_M=tl_tiles.block_m, BLOCK_N=tl_tiles.block_n, BLOCK_K=tl_tiles.block_k, GROUP_M=tl_tiles.group_m,
        num_warps=tl_tiles.num_warps, num_stages=tl_tiles.num_stages,
    )  # fmt: skip
    return out
