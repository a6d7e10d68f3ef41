"""Perplexity of a causal LM on held-out King James books: dense, training-free gates, baselines.

``dynprune eval perplexity`` (eval/perplexity_cli.py) runs :func:`sweep`. Protocol
(docs/training_free.md):

- Text: the test books of :data:`dynprune.assets.KJV_SPLIT_BOOKS` (split by book), tokenized
  book by book and concatenated; ``n_chunks`` windows of ``seq_len`` tokens, evenly spaced over
  the stream, no overlap. Calibration (TEAL thresholds, block influence) uses one window from
  the middle of each of ``calibration_chunks`` *train* books, evenly spaced over the canon.
- Each chunk is a prompt of ``prompt_len`` tokens and its continuation. Scored: the tokens
  predicted from continuation positions, targets ``ids[prompt_len + 1 :]``
  (``seq_len − prompt_len − 1`` per chunk), so every method is scored on the same tokens and
  the prompt plays the part of a generation's prefill. The training-free router runs the prompt
  dense and the continuation under the gates it chose (through the GatedKVCache, exactly like
  ``generate``); TEAL keeps the prompt dense too; layer removal is static (every position).
- Interval: deterministic methods have no seed spread; the interval is a bootstrap over chunks
  (percentile, ``resamples`` draws), for perplexity and for the ratio to dense (paired: the
  same resampled chunks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

Tensor = torch.Tensor
Scorer = Callable[[Tensor], Tensor]  # ids (B, T) -> logits of positions prompt_len.. (B, T - P, V)


@dataclass
class ChunkScores:
    """Summed negative log-likelihood and scored-token count per chunk."""

    nll: np.ndarray  # (N,) float64
    tokens: np.ndarray  # (N,) int

    @property
    def perplexity(self) -> float:
        return math.exp(float(self.nll.sum()) / float(self.tokens.sum()))


def continuation_nll(logits: Tensor, ids: Tensor, prompt_len: int) -> tuple[Tensor, Tensor]:
    """logits (B, T − P, V) of positions P..T−1, ids (B, T) -> (nll sum (B,), count (B,)) of the
    targets ids[:, P + 1:] (predicted by positions P..T−2)."""
    if logits.shape[1] != ids.shape[1] - prompt_len:
        raise ValueError(f"expected logits of {ids.shape[1] - prompt_len} positions, got {logits.shape[1]}")
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # (B, T − P − 1, V)
    targets = ids[:, prompt_len + 1 :]
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)  # (B, T − P − 1)
    return nll.sum(1), torch.full((ids.shape[0],), targets.shape[1])


@torch.no_grad()
def score_chunks(
    scorer: Scorer, chunks: Tensor, prompt_len: int, batch_size: int = 4, progress: str | None = None
) -> ChunkScores:
    """Run ``scorer`` over ``chunks`` (N, T) in batches; per-chunk NLL sums and token counts."""
    from tqdm.auto import tqdm

    nll, count = [], []
    starts = range(0, chunks.shape[0], batch_size)
    for start in tqdm(starts, desc=progress, disable=progress is None, leave=False):
        ids = chunks[start : start + batch_size]
        s, c = continuation_nll(scorer(ids), ids, prompt_len)
        nll.append(s)
        count.append(c)
    return ChunkScores(torch.cat(nll).numpy(), torch.cat(count).numpy())


def bootstrap(
    scores: ChunkScores,
    reference: ChunkScores | None,
    resamples: int,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Percentile intervals over resampled chunks: perplexity, and its ratio to ``reference``
    (paired: the same chunks)."""
    n = scores.nll.shape[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    ppl = np.exp(scores.nll[idx].sum(1) / scores.tokens[idx].sum(1))
    alpha = (1.0 - confidence) / 2
    out = dict(zip(("ppl_lo", "ppl_hi"), np.quantile(ppl, [alpha, 1 - alpha]).tolist()))
    if reference is not None:
        if reference.nll.shape != scores.nll.shape:
            raise ValueError("the paired interval needs the same chunks")
        ref = np.exp(reference.nll[idx].sum(1) / reference.tokens[idx].sum(1))
        lo, hi = np.quantile(ppl / ref, [alpha, 1 - alpha]).tolist()
        out |= {"ratio_lo": lo, "ratio_hi": hi}
    return out


def token_stream(tokenizer, books: Sequence[tuple[str, str]]) -> Tensor:
    """Token ids of the books, each tokenized on its own, concatenated (1-D)."""
    ids: list[int] = []
    for _, text in books:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: Tensor, seq_len: int, n_chunks: int) -> Tensor:
    """``n_chunks`` non-overlapping windows (n_chunks, seq_len), evenly spaced over ``stream``."""
    available = stream.shape[0] // seq_len
    if n_chunks > available:
        raise ValueError(f"only {available} windows of {seq_len} tokens in the text, asked for {n_chunks}")
    picks = np.linspace(0, available - 1, n_chunks).round().astype(int)
    return torch.stack([stream[i * seq_len : (i + 1) * seq_len] for i in picks])


def book_windows(tokenizer, books: Sequence[tuple[str, str]], seq_len: int, n_chunks: int) -> Tensor:
    """One window (n_chunks, seq_len) from the middle of each of ``n_chunks`` books evenly spaced
    over ``books`` (calibration text: a spread of books without tokenizing all of them)."""
    if n_chunks > len(books):
        raise ValueError(f"{n_chunks} calibration windows need as many books, there are {len(books)}")
    out = []
    for i in np.linspace(0, len(books) - 1, n_chunks).round().astype(int):
        name, text = books[i]
        mid = len(text) // 2
        ids = tokenizer(text[mid : mid + 12 * seq_len], add_special_tokens=False)["input_ids"]
        if len(ids) < seq_len:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][-seq_len:]
        if len(ids) < seq_len:
            raise ValueError(f"book {name!r} is shorter than {seq_len} tokens")
        out.append(torch.tensor(ids[:seq_len], dtype=torch.long))
    return torch.stack(out)
