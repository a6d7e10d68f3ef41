"""Gated FFN kernels (expand + contract) under the Triton interpreter vs the PyTorch oracle."""

from __future__ import annotations

import pytest
import torch
from dynprune.kernels.common import KeepLists, KernelInputError, keep_from_lists, keep_from_mask
from dynprune.kernels.gated_ffn import gated_ffn, gated_ffn_ref
from dynprune.kernels.gathered_gemm import unit_expand
from dynprune.kernels.tiles import Tiles

from tests.kernels.util import DEVICE, DTYPE_IDS, DTYPES, assert_rule, keep_mask, rand, weight

# (batch, seq, hidden, slice_size, n_slices, keep, activation): awkward widths (hidden and
# FFN widths not multiples of the tiles, slice sizes that are not powers of two), keep 0/partial/1
GRID = [
    (1, 1, 64, 32, 3, 1.0, "gelu"),
    (3, 17, 72, 24, 5, 0.5, "gelu"),
    (16, 128, 48, 32, 3, "mixed", "swiglu"),
    (16, 1, 40, 40, 3, "mixed", "gelu"),
    (3, 128, 64, 16, 5, 0.0, "gelu"),
    (1, 17, 80, 48, 2, 1.0, "swiglu"),
    (16, 17, 32, 20, 4, 0.5, "gelu_tanh"),
]


def _operands(hidden: int, inter: int, gated: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    ops = {
        "w_up": weight(inter, hidden, g),
        "b_up": rand(inter, gen=g, scale=0.5),
        "w_down": weight(hidden, inter, g),
    }
    if gated:
        ops |= {"w_gate": weight(inter, hidden, g), "b_gate": rand(inter, gen=g, scale=0.5)}
    return ops, g


def _run(x, keep, ops, dtype, slice_size, act, tiles=(None, None)):
    cast = {k: v.to(dtype) for k, v in ops.items()}
    activation = "silu" if act == "swiglu" else act
    out = gated_ffn(x.to(dtype), keep, slice_size=slice_size, activation=activation, tiles=tiles, **cast)
    ref_dt = gated_ffn_ref(x.to(dtype), keep, slice_size=slice_size, activation=activation, **cast)
    ref32 = gated_ffn_ref(
        x.to(dtype).float(), keep, slice_size=slice_size, activation=activation,
        **{k: v.float() for k, v in cast.items()},
    )  # fmt: skip
    return out, ref_dt, ref32


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", GRID, ids=lambda c: "b{}-t{}-h{}-s{}x{}-{}-{}".format(*c))
def test_gated_ffn_matches_reference(case, dtype):
    batch, seq, hidden, slice_size, n_slices, keep, act = case
    ops, g = _operands(hidden, slice_size * n_slices, act == "swiglu", seed=batch * 31 + seq)
    x = rand(batch, seq, hidden, gen=g)
    mask = keep_mask(batch, n_slices, keep, g)
    out, ref_dt, ref32 = _run(x, mask, ops, dtype, slice_size, act)
    assert_rule(out, ref32, ref_dt, f"ffn {case} {dtype}")
    assert (out[~mask.any(1)] == 0).all(), "a sample with no kept slice must give exactly zero"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "slice_size,tiles",
    [(24, (Tiles(16, 16, 16), Tiles(16, 16, 16))), (32, (Tiles(32, 32, 16), Tiles(16, 32, 32)))],
    ids=["unaligned-16", "aligned-32"],
)
def test_small_tiles_boundaries(slice_size, tiles, dtype):
    """Tiles smaller than the problem: many row/column/K blocks, partial edge tiles, both load paths."""
    ops, g = _operands(40, slice_size * 3, True, seed=5)
    x = rand(3, 33, 40, gen=g)
    mask = keep_mask(3, 3, "mixed", g)
    out, ref_dt, ref32 = _run(x, mask, ops, dtype, slice_size, "swiglu", tiles=tiles)
    assert_rule(out, ref32, ref_dt, "small tiles")


def test_index_lists_any_order_equal_mask():
    ops, g = _operands(32, 16 * 6, False, seed=7)
    x = rand(3, 9, 32, gen=g)
    lists = [[5, 0, 3], [], [1, 2, 3, 4, 5, 0]]
    mask = torch.zeros(3, 6, dtype=torch.bool, device=DEVICE)
    for b, units in enumerate(lists):
        mask[b, units] = True
    by_lists = gated_ffn(x, lists, slice_size=16, **ops)
    by_mask = gated_ffn(x, mask, slice_size=16, **ops)
    by_keep = gated_ffn(x, keep_from_lists(lists, 6, DEVICE), slice_size=16, **ops)
    torch.testing.assert_close(by_lists, by_mask, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(by_keep, by_mask, rtol=1e-6, atol=1e-6)
    assert (by_lists[1] == 0).all()


def test_skipped_slices_are_never_read():
    """NaN in every weight/bias entry of skipped slices: a kernel that touched them would return NaN."""
    ops, g = _operands(24, 16 * 5, True, seed=11)
    x = rand(4, 5, 24, gen=g)
    mask = torch.tensor(
        [[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool
    )
    expected = gated_ffn_ref(x, mask, slice_size=16, activation="silu", **ops)
    skipped_everywhere = ~mask.any(0)  # slices 3 and 4; sample 3 keeps nothing (exact zeros)
    poisoned = {k: v.clone() for k, v in ops.items()}
    cols = torch.arange(80, device=DEVICE).view(5, 16)[skipped_everywhere].reshape(-1)
    for name in ("w_up", "w_gate"):
        poisoned[name][cols] = float("nan")
    for name in ("b_up", "b_gate"):
        poisoned[name][cols] = float("nan")
    poisoned["w_down"][:, cols] = float("nan")
    out = gated_ffn(x, mask, slice_size=16, activation="silu", **poisoned)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out[3] == 0).all()


def test_shared_keep_list_as_one_group():
    """A batch-wide keep list: pass x as (1, B*T, H) and get the per-sample answer."""
    ops, g = _operands(32, 32 * 3, False, seed=3)
    x = rand(4, 6, 32, gen=g)
    mask = torch.tensor([[True, False, True]], device=DEVICE).expand(4, 3)
    per_sample = gated_ffn(x, mask, slice_size=32, **ops)
    one_group = gated_ffn(x.reshape(1, 24, 32), mask[:1], slice_size=32, **ops)
    torch.testing.assert_close(one_group.view(4, 6, 32), per_sample, rtol=1e-6, atol=1e-6)


def test_no_bias_and_relu():
    ops, g = _operands(32, 16 * 4, False, seed=2)
    x = rand(2, 7, 32, gen=g)
    mask = keep_mask(2, 4, 0.5, g)
    out = gated_ffn(x, mask, ops["w_up"], None, ops["w_down"], slice_size=16, activation="relu")
    ref = gated_ffn_ref(x, mask, ops["w_up"], None, ops["w_down"], slice_size=16, activation="relu")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad input
def _good():
    g = torch.Generator().manual_seed(0)
    return rand(2, 3, 16, gen=g), weight(32, 16, g), torch.zeros(32, device=DEVICE), weight(16, 32, g)


@pytest.mark.parametrize(
    "keep,match",
    [
        ([[0, 4], [1]], r"index 4 .* out of range \[0, 4\)"),
        ([[0, -1], [1]], r"index -1 .* out of range"),
        ([[2, 2], [1]], r"unit 2 is listed twice in group 0"),
        ([[0, 1, 2, 3, 0], []], r"5 entries but there are only 4 units"),
        ([[0]], r"got 1 keep lists for 2 groups"),
        (torch.ones(2, 3, dtype=torch.bool), r"keep mask has shape \(2, 3\), expected \(2, 4\)"),
        (torch.ones(2, 4, dtype=torch.int32), r"keep mask has dtype torch.int32, expected torch.bool"),
        (
            KeepLists(
                torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0]], dtype=torch.int32),
                torch.tensor([2, 5], dtype=torch.int32),
            ),
            r"count\[1\] = 5 is outside \[0, 4\]",
        ),
        (
            KeepLists(torch.zeros(2, 4, dtype=torch.int64), torch.ones(2, dtype=torch.int32)),
            r"keep.idx has dtype torch.int64, expected torch.int32",
        ),
    ],
)
def test_bad_keep_lists(keep, match):
    x, w_up, b_up, w_down = _good()
    with pytest.raises(KernelInputError, match=match):
        gated_ffn(x, keep, w_up, b_up, w_down, slice_size=8)


def test_bad_shapes_dtypes_layouts():
    x, w_up, b_up, w_down = _good()
    keep = torch.ones(2, 4, dtype=torch.bool, device=DEVICE)
    with pytest.raises(
        KernelInputError, match=r"slice_size=5 must be a positive divisor of the FFN width 32"
    ):
        gated_ffn(x, torch.ones(2, 6, dtype=torch.bool, device=DEVICE), w_up, b_up, w_down, slice_size=5)
    with pytest.raises(KernelInputError, match=r"w_up has shape \(32, 15\), expected \(\*, 16\)"):
        gated_ffn(x, keep, w_up[:, :15].contiguous(), b_up, w_down, slice_size=8)
    with pytest.raises(
        KernelInputError, match=r"w_up has dtype torch.float16 but the input is torch.float32"
    ):
        gated_ffn(x, keep, w_up.half(), b_up, w_down, slice_size=8)
    with pytest.raises(KernelInputError, match=r"x has dtype torch.float64; supported"):
        gated_ffn(x.double(), keep, w_up.double(), b_up.double(), w_down.double(), slice_size=8)
    with pytest.raises(KernelInputError, match=r"x must be contiguous"):
        gated_ffn(
            x.transpose(0, 1),
            torch.ones(3, 4, dtype=torch.bool, device=DEVICE),
            w_up,
            b_up,
            w_down,
            slice_size=8,
        )
    with pytest.raises(KernelInputError, match=r"w_down must be contiguous"):
        gated_ffn(x, keep, w_up, b_up, w_down.t().contiguous().t(), slice_size=8)
    with pytest.raises(KernelInputError, match=r"b_up has shape"):
        gated_ffn(x, keep, w_up, b_up[:5], w_down, slice_size=8)
    with pytest.raises(KernelInputError, match=r"activation 'tanh' is not supported"):
        gated_ffn(x, keep, w_up, b_up, w_down, slice_size=8, activation="tanh")
    with pytest.raises(KernelInputError, match=r"'swiglu' needs w_gate"):
        gated_ffn(x, keep, w_up, b_up, w_down, slice_size=8, activation="swiglu")
    with pytest.raises(KernelInputError, match=r"give both b_up and b_gate"):
        gated_ffn(x, keep, w_up, b_up, w_down, slice_size=8, activation="silu", w_gate=w_up)
    with pytest.raises(KernelInputError, match=r"all tensors must be on one device"):
        gated_ffn(x, keep, w_up.to("meta"), b_up, w_down, slice_size=8)
    with pytest.raises(KernelInputError, match=r"Tiles.block_m=8 must be a power of two >= 16"):
        gated_ffn(x, keep, w_up, b_up, w_down, slice_size=8, tiles=(Tiles(8, 16, 16), None))


def test_unit_expand_rejects_mismatched_keep_lists():
    x, w_up, b_up, _ = _good()
    keep = keep_from_mask(torch.ones(3, 4, dtype=torch.bool))  # 3 groups for a batch of 2
    with pytest.raises(
        KernelInputError, match=r"keep lists have shapes \(3, 4\)/\(3,\), expected \(2, 4\)/\(2,\)"
    ):
        unit_expand(x, w_up, b_up, keep, 8)
