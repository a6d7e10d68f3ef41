"""`dynprune bench serve-generate`: generation load on local `dynprune serve` processes
(loopback only, bounded in count and time) — /v1/generate, greedy, mixed budgets.

Phases, as `dynprune bench serve` does for classification:
1. burst: N concurrent prompts at mixed budgets at once -> every one 200 and equal to the
   unbatched generation of its prompt (below);
2. closed loop, interleaved rounds: C clients, {batching on, off} x {gated B, dense, mixed}:
   generated tokens/s, requests/s, p50 / p99 latency; ratios as medians of per-round pairs;
3. overload: M concurrent prompts at a server with a small queue -> 429 with Retry-After.

"Equal": the router's choice depends on the left-padded prompt length, so each answer reports
its ``padded_len``; the reference is the same prompt alone, left-padded to that length, at the
same budget (``GeneratorEngine.generate_alone``): the same token ids and executed FLOPs.

Default model: the packaged SmolLM2-135M served with ``--model`` — open gates and an UNTRAINED
router (``--untrained-budgets``): its speed at a budget is the speed of that FLOPs share, its text
below 1.0 is not meaningful. Pass ``--checkpoint`` for trained gates.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from .bench_report import overload_lines, ratio_lines, summarize, write_data
from .loadgen import bench_servers, deadline, percentile, post, run_phases

MIXED = (0.4, 0.6, 0.8, 1.0)
KEYS = ("tokens_per_s", "throughput_rps", "p50_ms", "p99_ms", "mean_flops_ratio", "mean_batch")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynprune bench serve-generate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="gated causal-LM checkpoint (trained gates)")
    src.add_argument(
        "--model", help="plain causal LM (default: packaged SmolLM2-135M GGUF, untrained router)"
    )
    p.add_argument("--budget", type=float, default=0.6, help="the gated variant's budget")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per request")
    p.add_argument("--burst", type=int, default=200, help="concurrent requests in the burst phase")
    p.add_argument("--requests", type=int, default=32, help="requests per variant per round (closed loop)")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--overload", type=int, default=200, help="concurrent requests in the overload phase")
    p.add_argument("--max-batch", type=int, default=8, help="sequences per generate call")
    p.add_argument("--max-wait-ms", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    p.add_argument("--deadline-s", type=float, default=3600, help="hard bound on the whole run")
    p.add_argument(
        "--out", default="results/serve_generate", help="directory for bench_generate.{md,csv,json}"
    )
    p.add_argument("--force", action="store_true", help="overwrite existing results in --out")
    return p


def prompts(n: int) -> list[str]:
    """``n`` prompts from the held-out King James test books: sentences of varied length, books interleaved."""
    from dynprune.assets import kjv_books

    per_book = [
        [s.strip() for s in re.split(r"(?<=[.:;?!])\s+", text) if len(s.split()) >= 3]
        for _, text in kjv_books("test")
    ]
    mixed = [s for group in zip(*per_book) for s in group]
    return [mixed[i % len(mixed)] for i in range(n)]


def _sender(max_new_tokens: int):
    async def send(session, job: tuple[str, float]) -> dict[str, Any]:
        prompt, budget = job
        body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0, "budget": budget}
        return {"prompt": prompt, "budget": budget, **await post(session, "/v1/generate", body)}

    return send


def check_answers(engine, results: list[dict], max_new_tokens: int) -> dict[str, int]:
    """Compare every 200 answer with the prompt's unbatched generation at its padded length."""
    from .generator import GenJob, Sampling

    cache: dict[tuple[str, float, int], Any] = {}
    wrong = {"tokens": 0, "flops": 0}
    for r in results:
        if r["status"] != 200:
            continue
        got = r["body"]
        key = (r["prompt"], r["budget"], got["padded_len"])
        if key not in cache:
            job = GenJob(
                tuple(engine.encode(r["prompt"])), r["budget"], Sampling(max_new_tokens=max_new_tokens)
            )
            cache[key] = engine.generate_alone(job, got["padded_len"])
        ref = cache[key]
        wrong["tokens"] += got["token_ids"] != list(ref.token_ids)
        wrong["flops"] += abs(got["flops_ratio"] - ref.flops_ratio) > 1e-9
    return wrong


def _row(res: list[dict], wall: float) -> dict[str, Any]:
    """One closed-loop round's numbers."""
    ok = [r for r in res if r["status"] == 200]
    lat = [r["latency_s"] for r in ok]
    return {
        "requests": len(res),
        "ok": len(ok),
        "tokens": sum(r["body"]["completion_tokens"] for r in ok),
        "tokens_per_s": sum(r["body"]["completion_tokens"] for r in ok) / wall,
        "throughput_rps": len(ok) / wall,
        "p50_ms": 1e3 * percentile(lat, 0.5),
        "p99_ms": 1e3 * percentile(lat, 0.99),
        "mean_flops_ratio": statistics.mean(r["body"]["flops_ratio"] for r in ok),
        "mean_batch": statistics.mean(r["body"]["batch_size"] for r in ok),
        "finished_by_length": sum(r["body"]["finish_reason"] == "length" for r in ok) / max(1, len(ok)),
    }


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    ints = (
        "max_new_tokens",
        "burst",
        "requests",
        "concurrency",
        "rounds",
        "overload",
        "max_batch",
        "threads",
    )
    for name in ints:
        if getattr(args, name) <= 0:
            raise SystemExit(f"dynprune bench serve-generate: --{name.replace('_', '-')} must be > 0")
    if not 0.0 < args.budget <= 1.0:
        raise SystemExit(f"dynprune bench serve-generate: --budget must be in (0, 1], got {args.budget}")
    out = Path(args.out)
    md = out / "bench_generate.md"
    if md.exists() and not args.force:
        raise SystemExit(f"dynprune bench serve-generate: {md} exists; pass --force to overwrite it")
    from tqdm import tqdm

    from dynprune.eval.report import machine_description

    from . import ServeConfig, load_engine

    if args.checkpoint:
        source, model = ["--checkpoint", args.checkpoint], {"checkpoint": args.checkpoint}
    else:
        from dynprune.assets import smollm2_gguf

        path = args.model or str(smollm2_gguf())
        source, model = ["--model", path, "--untrained-budgets"], {"model": path}
    left = deadline(args.deadline_s, "dynprune bench serve-generate")

    tmp = Path(tempfile.mkdtemp(prefix="dynprune-bench-generate-"))
    common = ["--threads", str(args.threads), "--max-texts", "1", "--timeout-s", "600"]
    queue = max(args.burst, args.requests) + args.max_batch
    texts = prompts(max(args.burst, args.requests, args.overload))
    servers = bench_servers(source, tmp, common, args.max_batch, args.max_wait_ms, queue)
    gated = f"gated {args.budget:g}"
    variants = {gated: (args.budget,), "dense": (1.0,), "mixed": MIXED}
    send = _sender(args.max_new_tokens)
    report: dict[str, Any] = {"machine": machine_description(), "args": vars(args), **model}
    parts, everything = run_phases(
        servers, texts, send, variants, MIXED, args, lambda: min(1200, left()), _row, ready_s=600
    )
    report.update(parts)
    # correctness after the load (it does not compete with it); the servers' seed 0 router for --model
    engine = load_engine(ServeConfig(threads=args.threads, max_batch=args.max_batch), **model)
    report["lost"] = sum(1 for r in everything if isinstance(r["status"], str))
    checked = tqdm(everything, desc="check vs unbatched", file=sys.stderr, mininterval=10)
    report["wrong"] = check_answers(engine, checked, args.max_new_tokens)
    report["checked"] = sum(1 for r in everything if r["status"] == 200)
    report["summary"] = summarize(report["closed_loop"], gated=gated, rate="tokens_per_s", keys=KEYS)
    write(out, report)
    print(md.read_text())
    return 0


def write(out: Path, report: dict[str, Any]) -> None:
    write_data(out, "bench_generate", report)
    a, s = report["args"], report["summary"]
    source = report.get("checkpoint") or f"{report.get('model')} (open gates, untrained router)"
    lines = [
        "# dynprune bench serve-generate",
        "",
        f"Machine: {report['machine']}. Servers and load generator on the same machine (loopback).",
        f"Model: `{source}`; each server runs `--threads {a['threads']}`, greedy, "
        f"{a['max_new_tokens']} new tokens per request, up to {a['max_batch']} sequences per generate call.",
        "",
        f"## Burst: {report['burst']['requests']} concurrent prompts, mixed budgets {list(MIXED)}",
        "",
        f"statuses {report['burst']['statuses']}, {report['burst']['wall_s']:.1f} s, largest batch "
        f"{report['burst']['max_batch_seen']}.",
        "",
        f"## Correctness: {report['checked']} answers checked, lost {report['lost']}, wrong {report['wrong']}",
        "",
        "Reference: the same prompt alone, left-padded to the `padded_len` its batch ran at, same budget:",
        "the same generated token ids and executed FLOPs ratio (1e-9).",
        "",
        f"## Closed loop: {a['concurrency']} clients, {a['requests']} prompts per variant, "
        f"{a['rounds']} interleaved rounds (medians)",
        "",
        "| server / budget | tokens/s | requests/s | p50 (ms) | p99 (ms) | mean FLOPs ratio | mean batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, v in s["table"].items():
        lines.append(
            f"| {k} | {v['tokens_per_s']:.1f} | {v['throughput_rps']:.2f} | {v['p50_ms']:.0f} | "
            f"{v['p99_ms']:.0f} | {v['mean_flops_ratio']:.3f} | {v['mean_batch']:.1f} |"
        )
    lines += [*ratio_lines(s), "", *overload_lines(report, "prompts", "sequences")]
    (out / "bench_generate.md").write_text("\n".join(lines))
