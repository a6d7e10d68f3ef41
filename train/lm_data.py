"""Causal-LM text for training: the packaged King James split by book, or a local text file,
tokenized into one stream and cut into fixed, non-overlapping windows.

- Packaged (``lm.path: null``): training windows from the train books of
  :data:`dynprune.assets.KJV_SPLIT_BOOKS`, validation windows from its validation books (the
  test books are never read here: they are ``dynprune eval perplexity``'s).
- A ``.txt`` file is one text; a ``.jsonl`` / ``.json`` file holds one JSON object a line with
  a string field ``lm.text_column`` (texts joined by the tokenizer's end-of-text token). The last
  ``lm.validation_fraction`` of the token stream is held out for validation.

Windows are evenly spaced over their stream (:func:`dynprune.eval.perplexity.windows`, the one
windowing of the perplexity evaluation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dynprune.eval.perplexity import token_stream, windows
from dynprune.train.data import DataError
from dynprune.train.lm_config import LMSection

Tensor = torch.Tensor


@dataclass
class LMData:
    train: Tensor  # (N_train, seq_len) token ids
    validation: Tensor  # (N_val, seq_len)
    source: str


def read_texts(path: str | Path, text_column: str = "text") -> list[str]:
    """The texts of a local .txt (one text) or JSON-lines file; DataError on anything malformed."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"text file {str(p)!r} does not exist")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{p} is not UTF-8 text: {err}") from err
    if p.suffix.lower() == ".txt":
        texts = [raw]
    else:
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{p}, line {n}: not a JSON object ({err.msg})") from err
            if not isinstance(row, dict) or text_column not in row:
                raise DataError(f"{p}, line {n}: no {text_column!r} field (set lm.text_column)")
            if not isinstance(row[text_column], str):
                raise DataError(
                    f"{p}, line {n}: {text_column!r} is {type(row[text_column]).__name__}, not a string"
                )
            texts.append(row[text_column])
    if not any(t.strip() for t in texts):
        raise DataError(f"{p} holds no text")
    return texts


def _pick(stream: Tensor, seq_len: int, n: int | None, where: str) -> Tensor:
    available = stream.shape[0] // seq_len
    if available == 0 or (n is not None and n > available):
        raise DataError(
            f"{where}: {stream.shape[0]} tokens give {available} windows of {seq_len}, "
            f"{'at least 1' if n is None else n} needed (lower lm.seq_len or the window counts)"
        )
    return windows(stream, seq_len, available if n is None else n)


def load_lm_data(cfg: LMSection, tokenizer: Any) -> LMData:
    """Training and validation windows (N, seq_len) of the text ``cfg`` names."""
    if cfg.path is None:
        from dynprune.assets import kjv_books

        train = token_stream(tokenizer, kjv_books("train"))
        val = token_stream(tokenizer, kjv_books("validation"))
        source = "packaged King James Bible: train books / validation books (dynprune.assets.KJV_SPLIT_BOOKS)"
    else:
        texts = read_texts(cfg.path, cfg.text_column)
        eos = tokenizer.eos_token or ""
        stream = token_stream(tokenizer, [("", t + eos) for t in texts])
        cut = int(stream.shape[0] * (1 - cfg.validation_fraction))
        train, val = stream[:cut], stream[cut:]
        source = (
            f"{cfg.path} ({len(texts)} texts), last {cfg.validation_fraction:.0%} of tokens for validation"
        )
    return LMData(
        _pick(train, cfg.seq_len, cfg.train_windows, "training text"),
        _pick(val, cfg.seq_len, cfg.eval_windows, "validation text"),
        source,
    )
