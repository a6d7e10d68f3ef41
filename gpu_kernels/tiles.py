"""Tile sizes and launch options of the kernels, and the default choice per shape.

The defaults are guesses for H100/A100 (no GPU was available when they were
written; the compile check verifies that every default compiles for sm_80 and
sm_90 and fits their shared memory). Under the interpreter every tile operation
costs Python time and a dot costs in proportion to its padded FLOPs, so the
biggest tiles are used there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from dynprune.kernels.common import KernelInputError, next_pow2


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch options of one GEMM launch (powers of two >= 16)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8

    def check(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise KernelInputError(f"Tiles.{name}={v} must be a power of two >= 16")


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM: only shapes the grid heuristics


def _largest_divisor_tile(unit: int, cap: int) -> int | None:
    for tile in (128, 64, 32, 16):
        if tile <= cap and unit % tile == 0:
            return tile
    return None


def default_tiles(
    kind: str,
    groups: int,
    rows: int,
    width: int,
    unit: int,
    dtype: torch.dtype,
    on_gpu: bool = True,
    sms: int = 132,
    gated: bool = False,
) -> Tiles:
    """Heuristic tiles (untuned guesses for H100/A100; checked to compile and fit shared memory).

    Big MMA tiles; the tile along the unit axis divides the unit width when it
    can (ALIGNED loads); a thin grid gets narrower contract tiles; fp32 halves
    the K tile so three pipeline stages fit sm_80's shared memory. ``width``:
    output columns of the launch. Under the interpreter every tile operation
    costs Python time, so the biggest tiles are used there.
    """
    block_m = 128 if rows >= 128 else max(16, next_pow2(rows))
    if not on_gpu:
        return Tiles(block_m, 128, 128)
    k_cap = 32 if dtype == torch.float32 else 64
    if kind == "expand":
        block_n = _largest_divisor_tile(unit, 64 if gated else 128) or 64
        block_k = k_cap
    else:
        block_n = 128
        block_k = _largest_divisor_tile(unit, k_cap) or k_cap
        programs = groups * triton.cdiv(rows, block_m) * triton.cdiv(width, block_n)
        if programs < 2 * sms:
            block_n = 64
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return Tiles(block_m, block_n, block_k, num_warps=num_warps, num_stages=3)


@dataclass(frozen=True)
class AttentionTiles:
    """Query (block_m) and key (block_n) tile of the attention kernel (powers of two >= 16)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def check(self) -> None:
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise KernelInputError(f"AttentionTiles.{name}={v} must be a power of two >= 16")


def default_attention_tiles(
    seq: int, head_dim: int, dtype: torch.dtype, on_gpu: bool = True
) -> AttentionTiles:
    """H100 guess (untuned): 128x64 tiles (x32 for fp32 or d > 128), 8 warps for d > 64; the
    biggest tiles under the interpreter (fewest tile operations)."""
    if not on_gpu:
        size = min(128, max(16, next_pow2(seq)))
        return AttentionTiles(size, size)
    wide = dtype == torch.float32 or head_dim > 128
    block_m = min(128, max(16, next_pow2(seq)))
    block_n = min(32 if wide else 64, max(16, next_pow2(seq)))
    return AttentionTiles(block_m, block_n, num_warps=8 if head_dim > 64 else 4, num_stages=2 if wide else 3)
