"""Shared helpers of the Triton kernels: where they can run, input checks, keep lists.

Keep lists
----------
Every gated kernel takes, per row group (one sample: its T rows), a *keep
list*: ``idx`` (G, n_units) int32 whose first ``count[g]`` entries are the
kept unit indices of group g (any order; entries after ``count[g]`` are
ignored) and ``count`` (G,) int32. :func:`keep_from_mask` builds them on the
device from a bool mask without a host sync (kept indices first, ascending);
:func:`keep_from_lists` builds them from Python lists. :func:`check_keep`
validates untrusted lists (index range, duplicates): it reads them back, so it
costs one host sync, and the trusted internal path (masks) skips it.

Where kernels run
-----------------
Compiled kernels need CUDA tensors. Under ``TRITON_INTERPRET=1`` (read when a
kernel module is first imported) the same kernels run on CPU tensors, which is
how CI checks them. :func:`require_runnable` turns every other case into a
clear error instead of a driver fault.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# every kernel's input error; defined with the Q/K/V layout, whose pack_qkv raises it too
from dynprune.qkv_layout import KernelInputError as KernelInputError

Tensor = torch.Tensor
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _probe_kernel(x_ptr):  # only its type is inspected: it tells whether the interpreter is on
    tl.store(x_ptr, 0)


@triton.jit
def to_store(x, out_dtype: tl.constexpr, UPCAST: tl.constexpr):
    """Cast an fp32 tile for storing. Under UPCAST (interpreter) round bf16 to nearest even by
    hand: the interpreter's own fp32 -> bf16 cast truncates, unlike a GPU's."""
    if UPCAST and out_dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(out_dtype)


def interpreting() -> bool:
    """True when this package's kernels were decorated under TRITON_INTERPRET=1."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe_kernel, InterpretedFunction)


def _patch_old_interpreter() -> None:
    """Work around a triton < 3.7 interpreter bug: it turns scalar kernel arguments into Python ints
    with ``int(array_of_shape_(1,))``, which NumPy >= 2.4 rejects, so any ``range(0, K, ...)`` over
    a runtime bound fails under TRITON_INTERPRET=1 (triton 3.6 is what the GPU machines run).
    triton 3.7 squeezes the array first; this does the same for older versions, only in
    interpreter mode (compiled kernels are untouched)."""
    import warnings

    import numpy as np
    import triton.runtime.interpreter as interp

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            int(np.zeros(1, dtype=np.int32))
        return  # this NumPy still converts 1-element arrays
    except TypeError:
        pass
    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    original = getattr(interp, "_patch_lang_tensor", None)
    if (major, minor) >= (3, 7) or original is None or getattr(original, "_dynprune", False):
        return

    def patch_lang_tensor(tensor, scope):  # same signature as triton's
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._dynprune = True  # type: ignore[attr-defined]
    interp._patch_lang_tensor = patch_lang_tensor


if interpreting():
    _patch_old_interpreter()


def require_runnable(*tensors: Tensor | None, what: str = "Triton kernels") -> None:
    """Raise a clear error unless the kernels can run on these tensors' device."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise KernelInputError(f"{what}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if not devices:
        return
    device = devices.pop()
    if device.type == "cuda":
        return
    if interpreting():
        if device.type == "cpu":
            return
        raise KernelInputError(f"{what}: under TRITON_INTERPRET=1 tensors must be on CPU, got {device}")
    raise RuntimeError(
        f"{what} cannot run on {device} tensors: compiled Triton kernels need CUDA tensors. On a "
        "machine without a GPU use the "
        "PyTorch path (GateConfig(backend='torch') or 'auto'), or set TRITON_INTERPRET=1 in the "
        "environment *before* importing dynprune.kernels to run the kernels in Triton's (slow) "
        "CPU interpreter."
    )


def check_tensor(
    name: str,
    t: Tensor,
    shape: tuple[int | None, ...],
    dtype: torch.dtype | tuple[torch.dtype, ...] | None = None,
    contiguous: bool = True,
) -> None:
    """Shape (None = any size), dtype and contiguity check with a message naming the argument."""
    if not isinstance(t, Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        raise KernelInputError(f"{name} has shape {tuple(t.shape)}, expected {want}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            raise KernelInputError(f"{name} has dtype {t.dtype}, expected {' or '.join(map(str, allowed))}")
    if contiguous and not t.is_contiguous():
        raise KernelInputError(f"{name} must be contiguous (call .contiguous() first); strides {t.stride()}")


def check_float(name: str, t: Tensor, like: Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise KernelInputError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if t.dtype != like.dtype:
        raise KernelInputError(f"{name} has dtype {t.dtype} but the input is {like.dtype}; use one dtype")


def upcast_flag(dtype: torch.dtype) -> bool:
    """Under the interpreter, compute 16-bit tiles in fp32 (the kernels' UPCAST flag).

    bf16 arithmetic is wrong in Triton's interpreter (values treated as raw
    16-bit integers) and its fp16 dots are slow numpy loops; products of 16-bit
    values are exact in fp32 and a GPU's tensor cores accumulate in fp32 too,
    so this keeps GPU semantics. On a GPU the flag is False and compiles away.
    """
    return dtype in (torch.float16, torch.bfloat16) and interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: IEEE fp32 like torch's default, or TF32 when torch allows it for matmuls."""
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit inputs
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def triton_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


@dataclass(frozen=True)
class KeepLists:
    """Per-group kept unit indices: ``idx`` (G, n_units) int32, ``count`` (G,) int32 (see module doc)."""

    idx: Tensor
    count: Tensor

    @property
    def groups(self) -> int:
        return self.count.shape[0]


def keep_from_mask(mask: Tensor) -> KeepLists:
    """(G, n_units) bool -> KeepLists with kept units first in ascending order; no host sync."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise KernelInputError(
            f"keep mask must be a (groups, units) bool tensor, got {mask.dtype} {tuple(mask.shape)}"
        )
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # kept first, ascending
    return KeepLists(order.to(torch.int32).contiguous(), mask.sum(1, dtype=torch.int32))


def keep_from_lists(lists: list[list[int]], n_units: int, device: torch.device | str) -> KeepLists:
    """Python lists of kept unit indices per group -> validated KeepLists."""
    idx = torch.zeros(len(lists), n_units, dtype=torch.int32)
    count = torch.zeros(len(lists), dtype=torch.int32)
    for g, units in enumerate(lists):
        if len(units) > n_units:
            raise KernelInputError(
                f"keep list of group {g} has {len(units)} entries but there are only {n_units} units "
                "(duplicated indices?)"
            )
        idx[g, : len(units)] = torch.as_tensor(list(units), dtype=torch.int32)
        count[g] = len(units)
    keep = KeepLists(idx.to(device), count.to(device))
    check_keep(keep, len(lists), n_units)
    return keep


def check_keep(keep: KeepLists, groups: int, n_units: int, name: str = "keep") -> None:
    """Validate untrusted keep lists: shapes, dtypes, counts, index range, no duplicates (host sync)."""
    if not isinstance(keep, KeepLists):
        raise KernelInputError(f"{name} must be KeepLists (see keep_from_mask / keep_from_lists)")
    check_tensor(f"{name}.idx", keep.idx, (groups, n_units), torch.int32)
    check_tensor(f"{name}.count", keep.count, (groups,), torch.int32)
    if keep.idx.device != keep.count.device:
        raise KernelInputError(f"{name}.idx and {name}.count are on different devices")
    count = keep.count.cpu()
    bad = (count < 0) | (count > n_units)
    if bool(bad.any()):
        g = int(bad.nonzero()[0])
        raise KernelInputError(f"{name}.count[{g}] = {int(count[g])} is outside [0, {n_units}]")
    idx = keep.idx.cpu().long()
    used = torch.arange(n_units)[None, :] < count[:, None]  # (G, n_units)
    out_of_range = used & ((idx < 0) | (idx >= n_units))
    if bool(out_of_range.any()):
        g, j = (int(v) for v in out_of_range.nonzero()[0])
        raise KernelInputError(
            f"{name}: index {int(idx[g, j])} (group {g}, entry {j}) is out of range [0, {n_units})"
        )
    sentinel = n_units + torch.arange(n_units)[None, :]  # distinct, never equal to a real index
    ordered = torch.where(used, idx, sentinel).sort(dim=1).values
    dup = ordered[:, 1:] == ordered[:, :-1]
    if bool(dup.any()):
        g, j = (int(v) for v in dup.nonzero()[0])
        raise KernelInputError(f"{name}: unit {int(ordered[g, j])} is listed twice in group {g}")


def as_keep(
    keep: Tensor | KeepLists | list[list[int]], groups: int, n_units: int, device: torch.device
) -> KeepLists:
    """Accept a bool mask (G, n_units), KeepLists or Python lists; validate; return KeepLists."""
    if isinstance(keep, Tensor):
        check_tensor("keep mask", keep, (groups, n_units), torch.bool, contiguous=False)
        if keep.device != device:
            raise KernelInputError(f"keep mask is on {keep.device} but the input is on {device}")
        return keep_from_mask(keep)
    if isinstance(keep, KeepLists):
        check_keep(keep, groups, n_units)
        if keep.idx.device != device:
            raise KernelInputError(f"keep lists are on {keep.idx.device} but the input is on {device}")
        return keep
    if isinstance(keep, (list, tuple)):
        if len(keep) != groups:
            raise KernelInputError(f"got {len(keep)} keep lists for {groups} groups (samples)")
        return keep_from_lists([list(map(int, u)) for u in keep], n_units, device)
    raise KernelInputError(
        f"keep must be a bool mask, KeepLists or lists of indices, got {type(keep).__name__}"
    )


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
