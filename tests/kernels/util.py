"""Shared helpers of the kernel tests: random operands, masks, the error rule."""

from __future__ import annotations

import torch
from dynprune.kernels.common import interpreting

# The interpreter (CI, the default under tests/conftest.py) runs kernels on CPU tensors; with
# TRITON_INTERPRET=0 on a GPU machine the same tests run the compiled kernels on CUDA tensors.
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")
EPS = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def rand(*shape: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)


def weight(out_features: int, in_features: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(out_features, in_features, generator=gen) / in_features**0.5).to(DEVICE)


def keep_mask(batch: int, units: int, keep: float | str, gen: torch.Generator) -> torch.Tensor:
    """(batch, units) bool: keep ratio 0 / 1 / fraction, or "mixed" (rows: all, none, random ...)."""
    if keep == "mixed":
        mask = torch.rand(batch, units, generator=gen) < 0.5
        mask[0::3] = True
        mask[1::3] = False
        return mask.to(DEVICE)
    assert isinstance(keep, float)
    if keep in (0.0, 1.0):
        return torch.full((batch, units), keep == 1.0, device=DEVICE)
    mask = torch.rand(batch, units, generator=gen) < keep
    mask[0, 0] = True  # at least one kept unit somewhere
    return mask.to(DEVICE)


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
