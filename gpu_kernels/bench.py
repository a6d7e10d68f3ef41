"""`dynprune bench kernels`: Triton gated FFN / attention vs dense cuBLAS / SDPA, plus end-to-end MiniLM.

Every row times the dense PyTorch computation and the gated Triton kernels side by
side in one run, on the same random weights and inputs:

- ffn:       dense ``down(act(up(x)))`` (SwiGLU for the Llama-class shape) vs
             :func:`gated_ffn` over each sample's kept slices;
- attention: dense Q/K/V projections + ``scaled_dot_product_attention`` + O vs
             :func:`gated_attention` over each sample's kept heads (GQA + causal
             for the Llama-class shape, key padding mask path for encoders);
- e2e:       packaged MiniLM (``dynprune.assets.minilm_path()``) wrapped with
             ``GateConfig(backend="triton")`` under random per-sample masks vs
             the same model at budget 1.0 (the untouched HF forward).

Masks are *mixed per sample*: nested prefixes (what trained routers produce)
whose kept fraction cycles through keep-1/8, keep, keep+1/8 across the batch.
``ideal_speedup`` = dense FLOPs / gated FLOPs of the row (dynprune.flops
conventions); ``ratio_to_ideal`` = speedup / ideal_speedup (goal: >= 0.8).
``max_err``: max |gated - dense computation with the same units zeroed|.

Needs a CUDA GPU. ``--smoke`` runs tiny shapes under TRITON_INTERPRET=1 on the
CPU to exercise the harness and CSV writing (its timings mean nothing).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

COLUMNS = [
    "kernel", "shape", "batch", "seq", "keep", "dense_ms", "triton_ms", "speedup", "ideal_speedup",
    "ratio_to_ideal", "kept_fraction", "max_err", "dtype", "device",
]  # fmt: skip


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    act: str  # "gelu" or "swiglu"
    causal: bool
    slice_size: int = 128

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES = [
    Shape("minilm", 384, 1536, 12, 12, "gelu", False),
    Shape("bert-base", 768, 3072, 12, 12, "gelu", False),
    Shape("llama-7b", 4096, 11008, 32, 8, "swiglu", True),
]
SMOKE_SHAPES = [
    Shape("smoke-mha", 64, 128, 2, 2, "gelu", False, 32),
    Shape("smoke-gqa", 64, 96, 4, 2, "swiglu", True, 32),
]


def mixed_counts(batch: int, units: int, keep: float) -> list[int]:
    """Per-sample kept counts: fractions keep-1/8, keep, keep+1/8 cycling over the batch (>= 1 unit)."""
    offsets = (0.0, -0.125, 0.125)
    return [min(units, max(1, round(units * (keep + offsets[b % 3])))) for b in range(batch)]


def prefix_mask(counts: list[int], units: int, device: torch.device) -> torch.Tensor:
    return torch.arange(units, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]


# ----------------------------------------------------------------------------- timing
def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu_time(fn: Callable[[], object]) -> float:  # smoke mode: one call, the number means nothing
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return cpu_time


# ----------------------------------------------------------------------------- rows
def _ffn_row(shape: Shape, batch: int, seq: int, keep: float, dtype, device, timer) -> dict:
    from dynprune.kernels.gated_ffn import gated_ffn

    g = torch.Generator(device="cpu").manual_seed(0)
    hidden, inter, s = shape.hidden, shape.ffn, shape.slice_size
    mk = lambda *size: (torch.randn(*size, generator=g) / math.sqrt(size[-1])).to(device, dtype)  # noqa: E731
    x = torch.randn(batch, seq, hidden, generator=g).to(device, dtype)
    w_up, w_down = mk(inter, hidden), mk(hidden, inter)
    b_up = None if shape.act == "swiglu" else mk(inter, 1)[:, 0].contiguous()
    w_gate = mk(inter, hidden) if shape.act == "swiglu" else None
    n = inter // s
    counts = mixed_counts(batch, n, keep)
    mask = prefix_mask(counts, n, device)
    act = "silu" if shape.act == "swiglu" else "gelu"

    def dense(slice_mask: torch.Tensor | None = None) -> torch.Tensor:
        up = F.linear(x, w_up, b_up)
        mid = F.silu(F.linear(x, w_gate)) * up if w_gate is not None else F.gelu(up)
        if slice_mask is not None:  # (B, n) -> zero skipped slices (reference only)
            mid = mid * slice_mask.repeat_interleave(s, dim=1)[:, None, :].to(mid.dtype)
        return F.linear(mid, w_down)

    def gated() -> torch.Tensor:
        return gated_ffn(x, mask, w_up, b_up, w_down, slice_size=s, activation=act, w_gate=w_gate)

    err = (gated().float() - dense(mask).float()).abs().max().item()
    ideal = (n * batch) / sum(counts)  # every slice costs the same (FlopsModel.slice_cost)
    return _row(
        "ffn", shape, batch, seq, keep, timer(dense), timer(gated), ideal, sum(counts) / (n * batch), err
    )


def _attention_row(shape: Shape, batch: int, seq: int, keep: float, dtype, device, timer) -> dict:
    from dynprune.kernels.gated_attention import gated_attention, pack_qkv

    g = torch.Generator(device="cpu").manual_seed(1)
    hidden, nh, nkv, d = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim
    mk = lambda *size: (torch.randn(*size, generator=g) / math.sqrt(size[-1])).to(device, dtype)  # noqa: E731
    x = torch.randn(batch, seq, hidden, generator=g).to(device, dtype)
    w_q, w_k, w_v, w_o = mk(nh * d, hidden), mk(nkv * d, hidden), mk(nkv * d, hidden), mk(hidden, nh * d)
    bias = not shape.causal  # encoders have biases, Llama does not
    b_q, b_k, b_v = (mk(n, 1)[:, 0].contiguous() for n in (nh * d, nkv * d, nkv * d)) if bias else (None,) * 3
    w_qkv, b_qkv = pack_qkv(w_q, w_k, w_v, b_q, b_k, b_v, nh, nkv)
    counts = mixed_counts(batch, nh, keep)
    mask = prefix_mask(counts, nh, device)
    # no padding in these rows: neither side gets a mask, so SDPA keeps its fastest backend
    # (the key-padding path of the kernel is covered by tests/kernels)

    def dense(head_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = F.linear(x, w_q, b_q).view(batch, seq, nh, d).transpose(1, 2)
        k = F.linear(x, w_k, b_k).view(batch, seq, nkv, d).transpose(1, 2)
        v = F.linear(x, w_v, b_v).view(batch, seq, nkv, d).transpose(1, 2)
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal, enable_gqa=nkv != nh)
        if head_mask is not None:
            ctx = ctx * head_mask[:, :, None, None].to(ctx.dtype)
        return F.linear(ctx.transpose(1, 2).reshape(batch, seq, nh * d), w_o)

    def gated() -> torch.Tensor:
        return gated_attention(x, mask, w_qkv, b_qkv, w_o, n_heads=nh, n_kv_heads=nkv, causal=shape.causal)

    err = (gated().float() - dense(mask).float()).abs().max().item()
    # dynprune.flops conventions: projections 2·T·H·d per head and matrix, attention 4·T²·d per
    # query head (halved when causal). GQA: K/V cost per KV head that a kept query head reads.
    attn = 4.0 * seq * seq * d * (0.5 if shape.causal else 1.0)
    proj = 2.0 * seq * hidden * d
    kv_kept = sum(math.ceil(c / (nh // nkv)) for c in counts)  # prefixes: kept KV groups
    dense_flops = batch * (nh * (2 * proj + attn) + nkv * 2 * proj)
    gated_flops = sum(counts) * (2 * proj + attn) + kv_kept * 2 * proj
    return _row("attention", shape, batch, seq, keep, timer(dense), timer(gated), dense_flops / gated_flops,
                sum(counts) / (nh * batch), err)  # fmt: skip


def _e2e_rows(batches, seqs, keeps, dtype, device, timer, smoke: bool) -> list[dict]:
    from transformers import AutoModel

    import dynprune
    from dynprune.assets import minilm_path
    from dynprune.gates import UnitMasks

    model = AutoModel.from_pretrained(minilm_path(), dtype=torch.float32).to(device, dtype).eval()
    gm = dynprune.wrap(model, dynprune.GateConfig(backend="triton", layers=False)).eval()
    n_layers, n_heads, n_slices = gm.n_gated, gm.parts.n_heads, gm.n_slices
    rows = []
    for batch in batches:
        for seq in seqs:
            ids = torch.randint(1000, 20000, (batch, seq), device=device)
            attn = torch.ones(batch, seq, dtype=torch.long, device=device)
            for keep in keeps:
                h = torch.stack(
                    [prefix_mask(mixed_counts(batch, n_heads, keep), n_heads, device)] * n_layers, 1
                )
                f = torch.stack(
                    [prefix_mask(mixed_counts(batch, n_slices, keep), n_slices, device)] * n_layers, 1
                )
                masks = UnitMasks(h, f, torch.ones(batch, n_layers, dtype=torch.bool, device=device))
                with torch.no_grad():
                    dense_fn = lambda i=ids, a=attn: gm(input_ids=i, attention_mask=a, budget=1.0)  # noqa: E731
                    gated_fn = lambda i=ids, a=attn, m=masks: gm(input_ids=i, attention_mask=a, masks=m)  # noqa: E731
                    out = gated_fn().last_hidden_state
                    info = gm.last
                    assert info is not None
                    ideal = float(info.dense_flops * batch / info.flops.sum())  # dynprune.flops
                    kept = float(info.flops.sum() / (info.dense_flops * batch))
                    with gm.running(backend="torch"):  # error vs the gathered PyTorch path, same masks
                        ref = gm(input_ids=ids, attention_mask=attn, masks=masks).last_hidden_state
                    err = (out.float() - ref.float()).abs().max().item()
                    shape = Shape("minilm-e2e", 384, 1536, 12, 12, "gelu", False)
                    rows.append(
                        _row(
                            "e2e", shape, batch, seq, keep, timer(dense_fn), timer(gated_fn), ideal, kept, err
                        )
                    )
            if smoke:
                break
    return rows


def _row(kernel, shape, batch, seq, keep, dense_ms, triton_ms, ideal, kept, err) -> dict:
    speedup = dense_ms / triton_ms
    return {
        "kernel": kernel, "shape": shape.name, "batch": batch, "seq": seq, "keep": keep,
        "dense_ms": f"{dense_ms:.4f}", "triton_ms": f"{triton_ms:.4f}", "speedup": f"{speedup:.3f}",
        "ideal_speedup": f"{ideal:.3f}", "ratio_to_ideal": f"{speedup / ideal:.3f}",
        "kept_fraction": f"{kept:.3f}", "max_err": f"{err:.3e}",
    }  # fmt: skip


# ----------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynprune bench kernels", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example (GPU): dynprune bench kernels --out results/kernels/h100.csv",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("kernels-bench.csv"), help="CSV file to write")
    p.add_argument("--quick", action="store_true", help="batch 1/16, seq 128/512 (about a third of the rows)")
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1 (no GPU)"
    )
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument(
        "--only", nargs="+", choices=["ffn", "attention", "e2e"], default=["ffn", "attention", "e2e"]
    )
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.smoke:
        if "dynprune.kernels.common" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke needs TRITON_INTERPRET=1 set before dynprune.kernels is imported", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel modules are imported (below)
        device = torch.device("cpu")
        shapes, batches, seqs, keeps = SMOKE_SHAPES, [1, 3], [16], [0.5]
        e2e = ([2], [8], [0.5])
    else:
        if not torch.cuda.is_available():
            print(
                "dynprune bench kernels needs a CUDA GPU (torch.cuda.is_available() is False), so no "
                "timings were taken. On a GPU machine run: dynprune bench kernels --out results/kernels/<gpu>.csv\n"
                "To exercise the harness on this machine: dynprune bench kernels --smoke",
                file=sys.stderr,
            )
            return 2
        device = torch.device("cuda")
        shapes = SHAPES
        batches, seqs = ([1, 16], [128, 512]) if args.quick else ([1, 4, 16, 64], [128, 512, 2048])
        keeps = [0.25, 0.5, 0.75]
        e2e = ([1, 16], [128], keeps) if args.quick else ([1, 8, 64], [128, 512], keeps)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    timer = _timer(device)
    from tqdm import tqdm

    jobs = [(k, s, b, t, p) for k in ("ffn", "attention") if k in args.only for s in shapes for b in batches
            for t in seqs for p in keeps]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as fh:  # rows are flushed as they come: nothing lost on a crash
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()

        def emit(row: dict) -> None:
            writer.writerow(row | {"dtype": args.dtype, "device": device_name})
            fh.flush()
            tqdm.write(
                " ".join(
                    f"{k}={row[k]}"
                    for k in (
                        "kernel",
                        "shape",
                        "batch",
                        "seq",
                        "keep",
                        "speedup",
                        "ideal_speedup",
                        "ratio_to_ideal",
                    )
                )
            )

        for kernel, shape, batch, seq, keep in tqdm(jobs, desc="bench kernels", disable=args.smoke):
            make = _ffn_row if kernel == "ffn" else _attention_row
            try:
                emit(make(shape, batch, seq, keep, dtype, device, timer))
            except torch.cuda.OutOfMemoryError:
                tqdm.write(f"skipped {kernel} {shape.name} b{batch} t{seq}: out of GPU memory")
                torch.cuda.empty_cache()
        if "e2e" in args.only:
            for row in _e2e_rows(
                *e2e, dtype if device.type == "cuda" else torch.float32, device, timer, args.smoke
            ):
                emit(row)
    print(f"wrote {args.out} ({device_name}, {args.dtype})")
    return 0
