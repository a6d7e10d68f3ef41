"""Compile every kernel for sm_80 / sm_90 without a GPU (Triton's bundled ptxas runs on the CPU).

The interpreter accepts programs the compiler rejects (e.g. tl.dot shapes,
type mixes, control flow), so CI also compiles each kernel, in each supported
dtype, with the tile configurations the launchers choose by default for real
layer shapes (MiniLM, BERT-base, a Llama-7B-class layer) plus small boundary
tiles, and checks the shared memory of each compiled kernel against the
architecture's per-block limit (a launch with more would fail on the GPU).

Run: ``python -m dynprune.kernels.compile_check [--arch 80 90] [--dtype fp16 ...]``.
Must run with TRITON_INTERPRET unset (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHARED_LIMIT = {80: 166912, 90: 232448}  # max dynamic shared memory per block (bytes)
# (hidden, ffn, heads, kv_heads, head_dim, slice) of the benchmark's layer shapes
SHAPES = {
    "minilm": (384, 1536, 12, 12, 32, 128),
    "bert-base": (768, 3072, 12, 12, 64, 128),
    "llama-7b": (4096, 11008, 32, 8, 128, 128),
}


@dataclass
class Case:
    name: str
    kernel: str  # attribute name in its module
    module: str
    types: dict[str, str]  # non-constexpr argument -> Triton type
    constexprs: dict[str, object]
    options: dict[str, int] = field(default_factory=dict)
    divisible: tuple[str, ...] = ()  # int arguments that are multiples of 16 at these shapes


def _gemm_cases(dt: str, torch_dtype: torch.dtype) -> list[Case]:
    from dynprune.kernels.gathered_gemm import ACTIVATIONS
    from dynprune.kernels.tiles import Tiles, default_tiles

    p = f"*{dt}"
    ints = {n: "i32" for n in ("T", "K", "N", "U", "n_units", "n_row_blocks", "n_col_blocks")}
    expand_types = {n: p for n in ("x_ptr", "w_ptr", "b_ptr", "w2_ptr", "b2_ptr", "y_ptr")}
    expand_types |= {"idx_ptr": "*i32", "cnt_ptr": "*i32", **ints}
    contract_types = {n: p for n in ("a_ptr", "w_ptr", "y_ptr")} | {
        "idx_ptr": "*i32",
        "cnt_ptr": "*i32",
        **ints,
    }
    prec = "ieee" if torch_dtype == torch.float32 else "tf32"
    cases = []
    seen = set()
    for shape, (hidden, ffn, heads, kv, d, slc) in SHAPES.items():
        for rows in (128, 17):
            for kind, act, gated, unit, width in (
                ("expand", "gelu", False, slc, ffn),
                ("expand", "silu", True, slc, ffn),
                ("expand", "none", False, d, (heads + 2 * kv) * d),
                ("contract", None, False, slc, hidden),
                ("contract", None, False, d, hidden),
            ):
                t = default_tiles(kind, 8, rows, width, unit, torch_dtype, gated=gated)
                if kind == "expand":
                    cx = dict(ACT=ACTIVATIONS[act], GATED=gated, HAS_BIAS=True, ALIGNED=unit % t.block_n == 0)
                else:
                    cx = dict(ALIGNED=unit % t.block_k == 0)
                cx |= dict(UPCAST=False, PREC=prec, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                           GROUP_M=t.group_m)  # fmt: skip
                values = {"T": rows, "K": hidden if kind == "expand" else width, "N": width if kind == "expand" else hidden,
                          "U": unit, "n_units": width // unit}  # fmt: skip
                divisible = tuple(n for n, v in values.items() if v % 16 == 0)
                key = (kind, tuple(sorted(cx.items())), t.num_warps, t.num_stages, divisible)
                if key in seen:
                    continue
                seen.add(key)
                cases.append(
                    Case(f"{kind}[{shape},rows={rows},{act or f'unit={unit}'}]", f"_{kind}_kernel", "gathered_gemm",
                         expand_types if kind == "expand" else contract_types, cx,
                         {"num_warps": t.num_warps, "num_stages": t.num_stages}, divisible)
                )  # fmt: skip
    small = Tiles(16, 16, 16)
    for aligned in (False, True):
        base = dict(UPCAST=False, PREC=prec, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=8, ALIGNED=aligned)
        cases.append(Case(f"expand[small,aligned={aligned}]", "_expand_kernel", "gathered_gemm", expand_types,
                          base | dict(ACT=2, GATED=False, HAS_BIAS=False), {"num_warps": small.num_warps}))  # fmt: skip
        cases.append(Case(f"contract[small,aligned={aligned}]", "_contract_kernel", "gathered_gemm",
                          contract_types, base, {"num_warps": small.num_warps}))  # fmt: skip
    return cases


def _attention_cases(dt: str, torch_dtype: torch.dtype) -> list[Case]:
    from dynprune.kernels.common import next_pow2
    from dynprune.kernels.tiles import default_attention_tiles

    p = f"*{dt}"
    types = {"qkv_ptr": p, "out_ptr": p, "keep_ptr": "*u8", "valid_ptr": "*u8", "kv_hi_ptr": "*i32"}
    types |= {n: "i32" for n in ("T", "n_heads", "G", "D", "row_stride", "out_stride")} | {
        "scale_log2": "fp32"
    }
    prec = "ieee" if torch_dtype == torch.float32 else "tf32"
    cases = []
    for d in (32, 64, 128):
        for seq in (2048, 17):
            t = default_attention_tiles(seq, d, torch_dtype)
            for has_valid, causal in ((True, False), (False, True)):
                cx = dict(HAS_VALID=has_valid, CAUSAL=causal, UPCAST=False, PREC=prec, BLOCK_M=t.block_m,
                          BLOCK_N=t.block_n, BLOCK_D=next_pow2(d))  # fmt: skip
                cases.append(Case(f"attention[d={d},seq={seq},valid={has_valid},causal={causal}]",
                                  "_attention_kernel", "gated_attention", types, cx,
                                  {"num_warps": t.num_warps, "num_stages": t.num_stages},
                                  ("D", "row_stride", "out_stride") + (("T",) if seq % 16 == 0 else ())))  # fmt: skip
    dec_types = {n: p for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    dec_types |= {"acc_ptr": "*fp32", "ml_ptr": "*fp32", "keep_ptr": "*u8", "len_ptr": "*i32"}
    dec_types |= {n: "i32" for n in ("n_heads", "n_kv", "G", "D", "S", "chunk", "n_split", "stride_kb",
                                     "stride_kh", "stride_ks", "stride_vb", "stride_vh", "stride_vs")}  # fmt: skip
    dec_types["scale_log2"] = "fp32"
    for d, group in ((64, 1), (128, 4)):
        for split in (False, True):
            cx = dict(SPLIT=split, UPCAST=False, PREC=prec, BLOCK_G=16, BLOCK_N=64, BLOCK_D=d)
            cases.append(Case(f"decode[d={d},G={group},split={split}]", "_decode_kernel", "gated_decode",
                              dec_types, cx, {"num_warps": 4, "num_stages": 3},
                              ("D", "S", "chunk", "stride_kb", "stride_kh", "stride_ks", "stride_vb", "stride_vh",
                               "stride_vs")))  # fmt: skip
    comb_types = {
        "out_ptr": p,
        "acc_ptr": "*fp32",
        "ml_ptr": "*fp32",
        "keep_ptr": "*u8",
        "D": "i32",
        "n_split": "i32",
    }
    cases.append(Case("combine", "_combine_kernel", "gated_decode", comb_types,
                      dict(UPCAST=False, BLOCK_S=32, BLOCK_D=128), {}, ("D",)))  # fmt: skip
    return cases


# one representative configuration of every kernel (and of both expand epilogues): the CI set
QUICK = (
    "expand[minilm,rows=128,gelu]",
    "expand[minilm,rows=128,silu]",
    "contract[llama-7b,rows=128,unit=128]",
    "attention[d=64,seq=2048,valid=True,causal=False]",
    "attention[d=128,seq=2048,valid=False,causal=True]",
    "decode[d=128,G=4,split=True]",
    "combine",
)


def _with_ones(case: Case) -> Case | None:
    """The case as a launch specialises it when some int arguments equal 1 (they become constexprs)."""
    ones = [n for n in ("T", "n_units", "G", "n_split") if n in case.types]
    if not ones:
        return None
    return Case(
        case.name.replace("]", "," + ",".join(f"{n}=1" for n in ones) + "]"), case.kernel, case.module,
        {k: v for k, v in case.types.items() if k not in ones}, case.constexprs | dict.fromkeys(ones, 1),
        case.options, tuple(n for n in case.divisible if n not in ones),
    )  # fmt: skip


def all_cases(dtypes: list[str], quick: bool = False) -> list[tuple[str, Case]]:
    out: list[tuple[str, Case]] = []
    for dt in dtypes:
        for case in _gemm_cases(dt, DTYPES[dt]) + _attention_cases(dt, DTYPES[dt]):
            if quick and case.name not in QUICK:
                continue
            if any(c.name == case.name for d, c in out if d == dt):
                continue  # first configuration of that name only
            out.append((dt, case))
            special = _with_ones(case) if case.name in QUICK and not quick else None
            if special is not None:
                out.append((dt, special))
    return out


def compile_case(case: Case, arch: int):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    fn = getattr(importlib.import_module(f"dynprune.kernels.{case.module}"), case.kernel)
    signature = {}
    for name in fn.arg_names:
        if name in case.constexprs:
            signature[name] = "constexpr"
        elif name in case.types:
            signature[name] = case.types[name]
        else:
            raise KeyError(f"{case.name}: no type for argument {name!r} of {case.kernel}")
    # what a real launch specialises: 16-byte aligned pointers and the widths that are multiples of 16
    backend = make_backend(GPUTarget("cuda", arch, 32))
    attrs = {
        (i,): backend.parse_attr("D")
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*") or name in case.divisible
    }
    src = ASTSource(fn, signature, constexprs=dict(case.constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(case.options))


def _compile_one(job: tuple[int, str, int, bool]) -> tuple[str, int | None, str]:
    """Worker: compile case number ``index`` of all_cases(dtypes=[dt]) for ``arch``."""
    arch, dt, index, quick = job
    _, case = all_cases([dt], quick)[index]
    label = f"sm_{arch} {dt:4s} {case.name}"
    try:
        return label, int(compile_case(case, arch).metadata.shared), ""
    except Exception as err:  # report every failing case, not only the first
        first = str(err).strip().splitlines()[:6]
        return label, None, f"{type(err).__name__}: {' | '.join(first)}"


def run(
    archs: list[int], dtypes: list[str], quick: bool = False, jobs: int = 1, verbose: bool = True
) -> list[str]:
    """Compile all cases (``jobs`` processes); return failure messages (empty = all good)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return ["TRITON_INTERPRET is set: interpreted kernels cannot be compiled; unset it"]
    work = [
        (arch, dt, i, quick) for arch in archs for dt in dtypes for i in range(len(all_cases([dt], quick)))
    ]
    start = time.time()
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_compile_one, work))
    else:
        results = [_compile_one(job) for job in work]
    failures = []
    for (arch, *_), (label, shared, error) in zip(work, results):
        if shared is None:
            failures.append(f"{label}: {error}")
        elif shared > SHARED_LIMIT[arch]:
            failures.append(f"{label}: needs {shared} B shared memory > {SHARED_LIMIT[arch]}")
        elif verbose:
            print(f"ok  {label:70s} shared={shared:6d} B")
    if verbose:
        n = len(work)
        print(f"{n - len(failures)}/{n} kernel configurations compiled in {time.time() - start:.1f}s")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dynprune.kernels.compile_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--quick", action="store_true", help="one configuration per kernel (the CI set)")
    parser.add_argument(
        "-j", "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes"
    )
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    failures = run(args.arch, args.dtype, quick=args.quick, jobs=args.jobs, verbose=not args.quiet)
    for f in failures:
        print("FAIL " + f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
