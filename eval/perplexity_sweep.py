"""The perplexity sweep of a causal LM: methods × budgets on held-out King James books.

Methods (one row each per budget < 1; ``dense`` once at 1.0):

- ``dense``: the model itself (a wrapped model at budget 1.0 runs HF's forward untouched);
- ``griffin``: dynprune's training-free router (``GateConfig.griffin``): prompt dense, the
  continuation under the gates chosen from the prompt's activations, via the GatedKVCache;
  FLOPs ratio = the FLOPs module's for the chosen gates at the prompt's length (the budget is
  enforced there, as for every router), the prompt's own FLOPs being dense;
- ``teal``: per-token activation sparsity at calibrated thresholds (eval/baselines/teal.py);
  FLOPs ratio = ideal sparse-kernel FLOPs from the measured densities (dense hardware saves none);
- ``learned``: routers trained by ``dynprune train`` (``task: causal_lm``), loaded from
  ``gates`` onto the same base: the prompt runs under the gates the router chose from it, the
  continuation under the same held gates (the GatedKVCache, as in ``generate``);
- ``shortgpt``: static layer removal by block influence (eval/baselines/shortgpt.py), executed
  through the gated model's layer masks; FLOPs ratio = the FLOPs module's at ``seq_len``.
- ``ln_structured``: static width pruning by weight norm: every layer keeps the same number of
  head units and FFN slices (``eval.baselines.structured.uniform_counts``), the first of the
  wrap's weight-norm order (‖V‖·‖O‖ per head unit, ‖up‖·‖down‖ per neuron), executed through
  the gated model's masks; FLOPs ratio = the FLOPs module's at ``seq_len``.

Rows land one by one in ``OUT/rows.jsonl`` (with per-chunk NLL, so a rerun resumes and the
paired intervals can be recomputed); ``OUT/perplexity.csv`` / ``.md`` / ``meta.json`` at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dynprune.eval.perplexity import (
    ChunkScores,
    Scorer,
    book_windows,
    bootstrap,
    score_chunks,
    token_stream,
    windows,
)

DEFAULT_METHODS = ("dense", "griffin", "teal", "shortgpt", "ln_structured")
METHODS = (*DEFAULT_METHODS, "learned")  # learned: needs `gates`
COLUMNS = [
    *("method", "budget", "flops_ratio", "perplexity", "ppl_lo", "ppl_hi", "ppl_ratio_to_dense"),
    *("ratio_lo", "ratio_hi", "nll_per_token", "tokens", "chunks", "seconds", "notes"),
]


@dataclass(frozen=True)
class PerplexityConfig:
    model: str = "smollm2"  # "smollm2" (packaged) or a local HF causal-LM directory
    budgets: tuple[float, ...] = (0.4, 0.6, 0.8, 1.0)
    methods: tuple[str, ...] = DEFAULT_METHODS
    gates: str | None = None  # directory of learned gates (dynprune train, task causal_lm) for "learned"
    seq_len: int = 256
    prompt_len: int = 128
    chunks: int = 24
    calibration_chunks: int = 16
    batch_size: int = 4
    ffn_slice_size: int = 64
    resamples: int = 2000
    threads: int = 2

    def __post_init__(self) -> None:
        from dynprune.config import check_budget_value

        for b in self.budgets:
            check_budget_value(b)
        bad = sorted(set(self.methods) - set(METHODS))
        if bad:
            raise ValueError(f"unknown perplexity methods {bad}; choose from {METHODS}")
        if ("learned" in self.methods) != (self.gates is not None):
            raise ValueError(
                "method 'learned' and --gates DIR (learned gates) go together: give both or neither"
            )
        if self.gates is not None and not (Path(self.gates) / "gates.json").is_file():
            raise ValueError(f"--gates {self.gates!r} holds no saved gates (gates.json, from dynprune train)")
        if not 0 < self.prompt_len < self.seq_len - 1:
            raise ValueError(
                f"prompt_len must be in (0, seq_len - 1), got {self.prompt_len} / {self.seq_len}"
            )
        for name in ("chunks", "calibration_chunks", "batch_size", "ffn_slice_size", "resamples", "threads"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def _load(cfg: PerplexityConfig):
    import transformers

    from dynprune.assets import load_smollm2

    transformers.logging.set_verbosity_error()
    if cfg.model == "smollm2":
        return load_smollm2()
    path = Path(cfg.model)
    if not (path / "config.json").is_file():
        raise ValueError(f"--model must be 'smollm2' or a local HF model directory, got {cfg.model!r}")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fingerprint(cfg: PerplexityConfig) -> dict[str, Any]:
    from dynprune.assets import KJV_SPLIT_BOOKS

    return json.loads(json.dumps({**asdict(cfg), "split": KJV_SPLIT_BOOKS}))  # tuples -> lists


def _check_fingerprint(out: Path, fingerprint: dict[str, Any]) -> bool:
    """True when OUT already holds a sweep with these settings; a clear error for other settings."""
    meta = out / "fingerprint.json"
    if meta.is_file():
        old = json.loads(meta.read_text())
        if old != fingerprint:
            raise ValueError(
                f"{out} holds a sweep with other settings ({meta}); choose another --out or remove it"
            )
        return True
    return False


def _prepare_out(out: Path, fingerprint: dict[str, Any]) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    if not _check_fingerprint(out, fingerprint):
        (out / "fingerprint.json").write_text(json.dumps(fingerprint, indent=1))
    return _read_rows(out / "rows.jsonl")


def run(cfg: PerplexityConfig, out: Path) -> list[dict[str, Any]]:
    """Run (or resume) the sweep; returns the finished rows (see module docstring)."""
    import dynprune
    from dynprune import GateConfig
    from dynprune.assets import kjv_books

    done = _prepare_out(out, _fingerprint(cfg))
    torch.set_num_threads(cfg.threads)
    model, tokenizer = _load(cfg)
    test = windows(token_stream(tokenizer, kjv_books("test")), cfg.seq_len, cfg.chunks)
    calib = book_windows(tokenizer, kjv_books("train"), cfg.seq_len, cfg.calibration_chunks)
    gated = dynprune.wrap(model, GateConfig.griffin(ffn_slice_size=cfg.ffn_slice_size)).eval()
    p = cfg.prompt_len
    todo = [("dense", 1.0)] if "dense" in cfg.methods else []  # then budgets in the order given
    others = [m for m in cfg.methods if m not in ("dense", "learned")]
    todo += [(m, b) for b in cfg.budgets if b < 1.0 for m in others]
    if "learned" in cfg.methods:  # last: it rewraps the model
        todo += [("learned", b) for b in cfg.budgets if b < 1.0]
    rows = {(r["method"], r["budget"]): r for r in done}
    shared: dict[str, Any] = {}  # calibration results, made once (TEAL activations, block influence)
    for method, budget in todo:
        if (method, budget) in rows:
            continue
        started = time.time()
        if method == "learned" and gated.gate_config.router == "griffin":
            dynprune.unwrap(gated)
            gated = dynprune.load_gates(model, cfg.gates).eval()
        scorer, flops, notes = _method(method, budget, gated, cfg, calib, shared)
        scores = score_chunks(scorer, test, p, cfg.batch_size, progress=f"{method} {budget}")
        row = {
            "method": method,
            "budget": budget,
            "flops_ratio": flops(),
            "perplexity": scores.perplexity,
            "nll_per_token": float(scores.nll.sum() / scores.tokens.sum()),
            "tokens": int(scores.tokens.sum()),
            "chunks": int(scores.nll.shape[0]),
            "seconds": round(time.time() - started, 1),
            "notes": notes,
            "chunk_nll": scores.nll.tolist(),
            "chunk_tokens": scores.tokens.tolist(),
        }
        rows[(method, budget)] = row
        with open(out / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"{method:9s} budget {budget:.2f}: ppl {row['perplexity']:.3f} at FLOPs {row['flops_ratio']:.3f}"
        )
    dynprune.unwrap(gated)
    return collect(cfg, out)


def collect(cfg: PerplexityConfig, out: Path) -> list[dict[str, Any]]:
    """Tables (perplexity.csv / .md, meta.json) from the rows finished so far in OUT/rows.jsonl."""
    if not _check_fingerprint(out, _fingerprint(cfg)):
        raise ValueError(f"{out} holds no sweep (no fingerprint.json)")
    rows = _read_rows(out / "rows.jsonl")
    if not rows:
        raise ValueError(f"no finished rows in {out / 'rows.jsonl'}")
    finished = _with_intervals(rows, cfg.resamples)
    _write_tables(finished, out, cfg)
    return finished


def _method(
    method: str, budget: float, gated: Any, cfg: PerplexityConfig, calib: torch.Tensor, shared: dict[str, Any]
) -> tuple[Scorer, Callable[[], float], str]:
    """(scorer, FLOPs ratio after scoring, notes) of one method at one budget."""
    from dynprune.eval.baselines import shortgpt, structured, teal

    from dynprune import UnitMasks

    fm, p = gated.flops, cfg.prompt_len
    ratios: list[torch.Tensor] = []
    mean_ratio = lambda: float(torch.cat(ratios).mean())  # noqa: E731
    if method == "dense":
        return (lambda ids: gated(ids, use_cache=False).logits[:, p:]), (lambda: 1.0), ""
    if method in ("griffin", "learned"):

        def held_gates(ids: torch.Tensor) -> torch.Tensor:
            cache = gated.new_cache()
            gated(ids[:, :p], budget=budget, cache=cache, use_cache=True)
            ratios.append(cache.decision.info.flops_ratio)
            return gated(ids[:, p:], cache=cache, use_cache=True).logits

        prefill = "dense" if method == "griffin" else "gated"
        return (
            held_gates,
            mean_ratio,
            f"prompt (prefill) {prefill}; continuation under the prompt's held gates",
        )
    if method == "teal":
        sp = shared.get("teal")
        if sp is None:
            sp = shared["teal"] = teal.ActivationSparsifier(gated.parts)
            with torch.no_grad(), sp.active(start=0):
                for i in range(0, calib.shape[0], cfg.batch_size):
                    gated(calib[i : i + cfg.batch_size], use_cache=False)
        sparsity = teal.sparsity_for_budget(fm, budget, p)
        sp.calibrate(sparsity)

        def sparse(ids: torch.Tensor) -> torch.Tensor:
            with sp.active(start=p):
                return gated(ids, use_cache=False).logits[:, p:]

        notes = f"uniform sparsity {sparsity:.3f} per site; ideal sparse-kernel FLOPs; prompt dense"
        return sparse, (lambda: teal.flops_ratio(fm, sp.density(), p)), notes
    n = gated.n_gated

    def fixed_masks(masks: UnitMasks) -> Scorer:
        def scorer(ids: torch.Tensor) -> torch.Tensor:
            b = ids.shape[0]
            expand = lambda t: t[None].expand(b, *t.shape).clone()  # noqa: E731
            batch_masks = UnitMasks(expand(masks.head), expand(masks.ffn), expand(masks.layer))
            out = gated(ids, masks=batch_masks, use_cache=False).logits[:, p:]
            ratios.append(gated.last.flops_ratio)
            return out

        return scorer

    if method == "ln_structured":
        heads, neurons = structured.uniform_counts(fm, budget, cfg.seq_len, multiple=fm.slice_size)
        slices = neurons // fm.slice_size
        counts = torch.tensor([[1, heads, slices]] * n)  # (L, 3): every layer the same prefix
        masks = UnitMasks.from_counts(counts[None], fm.n_heads, fm.n_slices)
        masks = UnitMasks(masks.head[0], masks.ffn[0], torch.ones(n, dtype=torch.bool))
        notes = f"every layer keeps {heads}/{fm.n_heads} head units and {slices}/{fm.n_slices} FFN slices (weight-norm order)"
        return fixed_masks(masks), mean_ratio, notes
    if "influence" not in shared:
        shared["influence"] = shortgpt.block_influence(gated.model, calib, cfg.batch_size)
    keep = shortgpt.layers_to_keep(shared["influence"], fm, budget, cfg.seq_len)
    masks = UnitMasks(
        torch.ones(n, fm.n_heads, dtype=torch.bool), torch.ones(n, fm.n_slices, dtype=torch.bool), keep
    )
    removed = [i for i in range(n) if not bool(keep[i])]
    return fixed_masks(masks), mean_ratio, f"removed layers {removed} (lowest block influence on train books)"


def _scores(row: dict[str, Any]) -> ChunkScores:
    return ChunkScores(np.asarray(row["chunk_nll"]), np.asarray(row["chunk_tokens"]))


def _with_intervals(rows: list[dict[str, Any]], resamples: int) -> list[dict[str, Any]]:
    dense = next((r for r in rows if r["method"] == "dense"), None)
    ref = None if dense is None else _scores(dense)
    out = []
    for r in rows:
        stats = bootstrap(_scores(r), ref, resamples)
        row = {k: v for k, v in r.items() if not k.startswith("chunk_")} | stats
        if ref is not None:
            row["ppl_ratio_to_dense"] = r["perplexity"] / ref.perplexity
        out.append(row)
    return out


def _write_tables(rows: list[dict[str, Any]], out: Path, cfg: PerplexityConfig) -> None:
    import csv

    from dynprune.eval.report import machine_description

    with open(out / "perplexity.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    lines = [
        "| method | budget | FLOPs ratio | perplexity [95% CI] | × dense [95% CI] | notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r.get("ppl_ratio_to_dense")
        rtxt = "" if ratio is None else f"{ratio:.3f} [{r['ratio_lo']:.3f}, {r['ratio_hi']:.3f}]"
        lines.append(
            f"| {r['method']} | {r['budget']:.2f} | {r['flops_ratio']:.3f} | {r['perplexity']:.2f} "
            f"[{r['ppl_lo']:.2f}, {r['ppl_hi']:.2f}] | {rtxt} | {r['notes']} |"
        )
    (out / "perplexity.md").write_text("\n".join(lines) + "\n")
    meta = {
        "config": asdict(cfg),
        "machine": machine_description(),
        "scored_tokens_per_row": int(cfg.chunks * (cfg.seq_len - cfg.prompt_len - 1)),
        "protocol": "docs/training_free.md; dynprune/eval/perplexity.py",
        "interval": f"bootstrap over {cfg.chunks} chunks, {cfg.resamples} resamples, percentile 95%",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
