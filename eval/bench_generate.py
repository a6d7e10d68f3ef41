"""`dynprune bench generate`: gated vs dense decoding with a KV cache (SmolLM2-135M), side by side.

In ONE process, per dtype (fp32, bf16), batch size and budget, interleaved
(eval/timing.py): ``dense`` = HF ``generate`` on the unwrapped model (the gated
model at budget 1.0 runs exactly that), ``gated`` = ``GatedModel.generate`` at
the budget (gates chosen once from each prompt at prefill and held; the
gathered path on CPU). Every run generates exactly ``new`` tokens
(``min_new_tokens``), greedy. Columns:

- ``flops_ratio``: executed FLOPs per *decoded* token / dense (the held masks
  at T = 1, from the FLOPs module; LM head included), ``prefill_flops_ratio``
  the same for the prompt (what the router budgeted);
- ``dense_tok_s`` / ``gated_tok_s``: generated tokens per second over the
  whole ``generate`` call (prefill included); ``speedup`` = median of paired
  per-round ratios; ``ideal_speedup`` = 1 / flops_ratio; ``ratio_to_ideal``;
- ``prefill_ms_*``: one forward of the prompt (median, interleaved);
- ``kv_bytes_*``: K/V bytes held after the generation (dense: HF's
  DynamicCache of the same tokens; gated: ``GatedKVCache.nbytes()``).

Which units run: ``--gates DIR`` (saved by ``dynprune.save_gates``): the
trained router's choice; otherwise ``--select uniform`` (default): every layer
keeps the same prefix share of its head units and FFN slices, the largest that
fits the budget — a stand-in for trained gates (an untrained router spends a
budget on the cheapest units per logit, FFN slices first, and drops attention
altogether at 0.6: ``--select router`` shows it). Speed, FLOPs and cache size
are meaningful; output quality is not (no trained gates). ``--select griffin``:
the training-free router (``GateConfig.griffin``, docs/training_free.md): each
prompt runs dense (``prefill_flops_ratio`` 1.0) and chooses its own units from
its activations; ``flops_ratio`` is the decoded tokens' share under them.

``--llama-cpp``: the engine a CPU user would pick for this model, timed in the same
interleaved rounds at batch 1: llama.cpp (``llama-cpp-python``, extra ``dynprune[llama]``,
built from source) on the very GGUF file that is shipped (Q4_1 weights; HF dequantises the
same file to fp32 / bf16), the same prompt token ids, greedy, exactly ``new`` tokens, its own
``--threads`` threads, no prompt-cache reuse between rounds. Columns ``llama_cpp_tok_s`` and
``gated_over_llama_cpp`` (median of paired per-round ratios); empty at batch > 1 (the
high-level API decodes one sequence).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import statistics
import sys
from pathlib import Path

import torch

COLUMNS = [
    "model", "dtype", "batch", "prompt", "new", "budget", "flops_ratio", "prefill_flops_ratio",
    "dense_tok_s", "gated_tok_s", "speedup", "ideal_speedup", "ratio_to_ideal",
    "prefill_ms_dense", "prefill_ms_gated", "kv_bytes_dense", "kv_bytes_gated", "select", "repeats",
    "llama_cpp_tok_s", "gated_over_llama_cpp",
]  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynprune bench generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="prompt 32 -> 32 tokens, budget 0.6, 2 repeats")
    p.add_argument("--gates", type=Path, help="saved gates (dynprune.save_gates) for SmolLM2")
    p.add_argument(
        "--select",
        choices=["uniform", "router", "griffin"],
        default="uniform",
        help="gated units: 'uniform' = every layer keeps the same prefix share of its head units and FFN "
        "slices, the largest that fits the budget at the prompt length (default without --gates); "
        "'router' = the (trained with --gates, else untrained) router's choice; "
        "'griffin' = the training-free router (dense prefill, units from the prompt's activations)",
    )
    p.add_argument("--out", type=Path, help="CSV file to write (refuses to overwrite)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--budget", type=float, nargs="+", help="default 0.4 0.6 0.8 (quick: 0.6)")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--prompt", type=int, help="prompt tokens (default 128; quick 32)")
    p.add_argument("--new", type=int, help="generated tokens (default 128; quick 32)")
    p.add_argument("--repeats", type=int, help="timed rounds (default 3; quick 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--llama-cpp",
        action="store_true",
        help="also time llama.cpp on the shipped GGUF at batch 1 (pip install 'dynprune[llama]')",
    )
    return p


def llama_cpp_generate(prompt_ids: list[int], new: int, threads: int):
    """A function that decodes exactly ``new`` tokens greedily after ``prompt_ids`` with llama.cpp
    on the shipped GGUF, prefill included and the prompt's cache dropped first (as HF's generate)."""
    from llama_cpp import Llama

    from dynprune.assets import smollm2_gguf

    llm = Llama(
        model_path=str(smollm2_gguf()),
        n_ctx=len(prompt_ids) + new + 8,
        n_batch=max(64, len(prompt_ids)),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def run() -> int:
        llm.reset()  # no reuse of the previous round's prompt
        made = 0
        for _ in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
            made += 1
            if made == new:
                break
        if made != new:
            raise RuntimeError(f"llama.cpp stopped after {made} of {new} tokens")
        return made

    return run


def _prompts(tokenizer, batch: int, length: int) -> dict[str, torch.Tensor]:
    """``batch`` different KJV passages of exactly ``length`` tokens."""
    import json

    from dynprune.assets import kjv_path

    with open(kjv_path()) as fh:
        verses = [json.loads(line)["text"] for _, line in zip(range(4000), fh)]
    text = " ".join(verses)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    rows = [ids[i * length * 3 : i * length * 3 + length] for i in range(batch)]
    input_ids = torch.stack(rows)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def uniform_masks(gated, batch: int, budget: float, seq: int):
    """Every gated layer keeps the first k_h head units and k_f FFN slices: for each k_h ≥ 1 the most
    slices that fit ``budget`` at ``seq``; of those pairs, the most balanced (k_h/n_h ≈ k_f/n_f)."""
    from dynprune import UnitMasks

    fm, n_layers = gated.flops, gated.n_gated
    n_h, n_f = gated.parts.n_heads, gated.n_slices
    available = budget * fm.dense(seq) - fm.fixed(seq)
    pairs = []
    for k_h in range(1, n_h + 1):
        k_f = min(n_f, int((available / n_layers - k_h * fm.head_cost(seq)) // fm.slice_cost(seq)))
        if k_f >= 0:
            pairs.append((abs(k_h / n_h - k_f / n_f), -(k_h + k_f), k_h, k_f))
    if not pairs:
        raise ValueError(f"budget {budget} cannot fit one head unit per layer at {seq} tokens")
    _, _, k_h, k_f = min(pairs)
    head = (torch.arange(n_h) < k_h).expand(batch, n_layers, n_h)
    ffn = (torch.arange(n_f) < k_f).expand(batch, n_layers, n_f)
    return UnitMasks(head.clone(), ffn.clone(), torch.ones(batch, n_layers, dtype=torch.bool))


def _decode_flops_ratio(gated, masks) -> float:
    fm = gated.flops
    m = masks.canonical()
    per = fm.fixed(1) + fm.gated_units(m.head.double(), m.ffn.double(), m.layer.double(), 1)
    return float(per.mean()) / fm.dense(1)


def run(args: argparse.Namespace) -> list[dict]:
    from dynprune.eval.timing import paired_ratio, time_interleaved

    import dynprune
    from dynprune.assets import load_smollm2
    from dynprune.kv_cache import dense_kv_bytes

    torch.set_num_threads(args.threads)
    prompt = args.prompt or (32 if args.quick else 128)
    new = args.new or (32 if args.quick else 128)
    repeats = args.repeats or (2 if args.quick else 3)
    budgets = args.budget or ([0.6] if args.quick else [0.4, 0.6, 0.8])
    model, tokenizer = load_smollm2()
    # the prompt and token count are the same for every dtype: one llama.cpp model for the run
    llama = (
        llama_cpp_generate(_prompts(tokenizer, 1, prompt)["input_ids"][0].tolist(), new, args.threads)
        if args.llama_cpp and 1 in args.batch
        else None
    )
    gated = (
        dynprune.load_gates(model, args.gates)
        if args.gates
        else dynprune.wrap(
            model,
            dynprune.GateConfig.griffin(ffn_slice_size=128)
            if args.select == "griffin"
            else dynprune.GateConfig(ffn_slice_size=128),
        )
    )
    gated.eval()
    parts, rows = gated.parts, []
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        gated.to(dtype)
        for batch in args.batch:
            inputs = _prompts(tokenizer, batch, prompt)
            fns, prefill = {}, {}
            pick = {}
            for b in budgets:  # masks= overrides the router; None = the router decides
                pick[b] = (
                    {}
                    if args.select in ("router", "griffin") or args.gates
                    else {"masks": uniform_masks(gated, batch, b, prompt)}
                )
            for name, b in [("dense", 1.0)] + [(f"gated@{b}", b) for b in budgets]:
                m = pick.get(b, {})
                fns[name] = lambda b=b, x=inputs, m=m: gated.generate(**x, budget=b, **m, **gen)
                prefill[name] = lambda b=b, x=inputs, m=m: gated(**x, budget=b, use_cache=True, **m)
            if llama is not None and batch == 1:
                fns["llama.cpp"] = llama
            times = time_interleaved(fns, warmup=1, repeats=repeats)
            pre = time_interleaved(prefill, warmup=1, repeats=max(3, repeats))
            dense_s = times["dense"].median_ms / 1e3
            kv_dense = dense_kv_bytes(
                parts.n_layers, batch, parts.n_heads, prompt + new - 1, parts.head_dim, dtype
            )
            for b in budgets:
                cache = gated.new_cache()
                with torch.inference_mode():
                    gated.generate(**inputs, budget=b, cache=cache, **pick[b], **gen)
                info = gated.last
                flops = _decode_flops_ratio(gated, info.masks)
                speed = paired_ratio(times["dense"], times[f"gated@{b}"])
                row = {
                    "model": "SmolLM2-135M", "dtype": dtype_name, "batch": batch, "prompt": prompt,
                    "new": new, "budget": b, "flops_ratio": round(flops, 4),
                    "prefill_flops_ratio": 1.0 if args.select == "griffin" else round(float(info.flops_ratio.mean()), 4),
                    "dense_tok_s": round(batch * new / dense_s, 2),
                    "gated_tok_s": round(batch * new / (times[f"gated@{b}"].median_ms / 1e3), 2),
                    "speedup": round(speed, 3), "ideal_speedup": round(1 / flops, 3),
                    "ratio_to_ideal": round(speed * flops, 3),
                    "prefill_ms_dense": round(pre["dense"].median_ms, 2),
                    "prefill_ms_gated": round(pre[f"gated@{b}"].median_ms, 2),
                    "kv_bytes_dense": kv_dense, "kv_bytes_gated": cache.nbytes(),
                    "select": "gates" if args.gates else args.select, "repeats": repeats,
                    "llama_cpp_tok_s": "", "gated_over_llama_cpp": "",
                }  # fmt: skip
                if "llama.cpp" in times:
                    row["llama_cpp_tok_s"] = round(new / (times["llama.cpp"].median_ms / 1e3), 2)
                    row["gated_over_llama_cpp"] = round(
                        paired_ratio(times["llama.cpp"], times[f"gated@{b}"]), 3
                    )
                rows.append(row)
                if set(row) != set(COLUMNS):  # fail at the first row, not when writing the CSV at the end
                    raise RuntimeError(f"row keys differ from COLUMNS: {sorted(set(row) ^ set(COLUMNS))}")
                print(",".join(str(row[c]) for c in COLUMNS), flush=True)
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    """The rows as CSV (every column of :data:`COLUMNS`, nothing else)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.out is not None and args.out.exists():
        print(f"dynprune bench generate: {args.out} exists; choose another --out", file=sys.stderr)
        return 2
    if any(not 0 < b < 1 for b in args.budget or []):
        print("dynprune bench generate: budgets must be in (0, 1)", file=sys.stderr)
        return 2
    if args.llama_cpp and importlib.util.find_spec("llama_cpp") is None:
        print(
            "dynprune bench generate: --llama-cpp needs llama-cpp-python: pip install 'dynprune[llama]' "
            "(builds llama.cpp from source, about 10 minutes on 2 cores)",
            file=sys.stderr,
        )
        return 2
    print(",".join(COLUMNS), flush=True)
    rows = run(args)
    if args.out is not None:
        write_rows(args.out, rows)
    if rows:
        print(f"median speedup over all rows: {statistics.median(r['speedup'] for r in rows):.3f}")
    return 0
