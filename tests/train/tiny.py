"""Tiny models and data files for training tests (built locally in milliseconds, no downloads)."""

from __future__ import annotations

import random
from pathlib import Path

POS = ["good", "great", "fine", "wonderful", "funny", "smart", "moving", "best"]
NEG = ["bad", "awful", "dull", "boring", "worst", "weak", "stupid", "poor"]
FILL = ["the", "movie", "film", "was", "a", "story", "and", "it", "plot", "actors", "really", "very"]


SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DIGITS = [str(d) for d in range(10)]


def tiny_tokenizer(path: Path):
    """A WordPiece tokenizer over the synthetic vocabulary (+ digits), saved into ``path``."""
    from transformers import BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + FILL + POS + NEG + DIGITS + [f"##{d}" for d in DIGITS]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(path)
    return tok


def tiny_model_dir(
    path: Path, *, layers: int = 2, hidden: int = 64, ffn: int = 128, num_labels: int = 2
) -> Path:
    """A randomly initialised tiny BERT classifier with its own small tokenizer, saved as a HF dir."""
    from tests.helpers import tiny_model

    tok = tiny_tokenizer(path)
    model = tiny_model(
        "bert",
        0,
        layers,
        hidden=hidden,
        ffn=ffn,
        num_labels=num_labels,
        vocab=len(tok),
        context=128,
        pad_token_id=0,
    )
    model.save_pretrained(path)
    return path


def sentiment_rows(n: int, seed: int = 0, classes: tuple[str, ...] = ("neg", "pos")) -> list[tuple[str, str]]:
    """Synthetic reviews whose label is carried by sentiment words (learnable in a few steps)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = classes[i % len(classes)]
        words = [rng.choice(FILL) for _ in range(rng.randint(3, 14))]
        cue = POS if classes.index(label) % 2 else NEG
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(cue))
        words.append(str(i))  # unique texts (the loader de-duplicates)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]], text: str = "text", label: str = "label") -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([text, label])
        w.writerows(rows)
    return path
