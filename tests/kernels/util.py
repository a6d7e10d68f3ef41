"""Shared helpers of the kernel tests: random operands, masks, the error rule."""

from __future__ import annotations

import torch

EPS = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def rand(*shape: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def weight(out_features: int, in_features: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=gen) / in_features**0.5


def keep_mask(batch: int, units: int, keep: float | str, gen: torch.Generator) -> torch.Tensor:
    """(batch, units) bool: keep ratio 0 / 1 / fraction, or "mixed" (rows: all, none, random ...)."""
    if keep == "mixed":
        mask = torch.rand(batch, units, generator=gen) < 0.5
        mask[0::3] = True
        mask[1::3] = False
        return mask
    assert isinstance(keep, float)
    if keep in (0.0, 1.0):
        return torch.full((batch, units), keep == 1.0)
    mask = torch.rand(batch, units, generator=gen) < keep
    mask[0, 0] = True  # at least one kept unit somewhere
    return mask


def assert_rule(out: torch.Tensor, ref32: torch.Tensor, ref_dt: torch.Tensor, what: str = "") -> None:
    """flash-attention's rule: |kernel - fp32 ref| <= 2 |ref in the kernel's dtype - fp32 ref| + eps."""
    assert out.shape == ref32.shape, (out.shape, ref32.shape)
    assert out.dtype == ref_dt.dtype, (out.dtype, ref_dt.dtype)
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out.float() - ref32).abs().max().item() if out.numel() else 0.0
    base = (ref_dt.float() - ref32).abs().max().item() if out.numel() else 0.0
    eps = EPS[out.dtype] * max(1.0, ref32.abs().max().item() if out.numel() else 0.0)
    assert err <= 2 * base + eps, (
        f"{what}: kernel error {err:.3e} > 2 x {base:.3e} (ref in {out.dtype}) + {eps:.1e}"
    )
