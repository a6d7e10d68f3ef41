"""The ``lm:`` section of a training config: causal-LM distillation (``task: causal_lm``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


@dataclass
class LMSection:
    """Text, windows and what trains when ``task: causal_lm`` (docs/training_lm.md).

    The student is the base model under gates (after the dense stage: the fine-tuned base); the
    teacher is that model, dense and frozen.
    Loss = distill.logits_weight * T^2 KL(teacher || student) over every next-token distribution
    + distill.task_weight * next-token cross-entropy + the Lagrangian FLOPs target.
    """

    # Local .txt file (one text) or JSON-lines file (.jsonl / .json, one {"text": ...} object a
    # line); null = the packaged King James Bible, split by book (dynprune.assets.KJV_SPLIT_BOOKS)
    path: str | None = None
    text_column: str = "text"
    # Tokens per training / evaluation window (non-overlapping windows of the token stream)
    seq_len: int = 256
    # Windows used: evenly spaced over the training text (null = all) / over the validation text
    train_windows: int | None = None
    eval_windows: int = 16
    # Local files: this fraction of the token stream (its end) is held out for validation
    validation_fraction: float = 0.05
    # Also fine-tune the base weights in the gated stage (optim.gated_lr); default: routers only
    tune_base: bool = False

    def __post_init__(self) -> None:
        if self.seq_len < 8:
            raise ValueError(f"lm.seq_len must be >= 8 tokens, got {self.seq_len}")
        if self.train_windows is not None and self.train_windows <= 0:
            raise ValueError(f"lm.train_windows must be > 0 or null, got {self.train_windows}")
        if self.eval_windows <= 0:
            raise ValueError(f"lm.eval_windows must be > 0, got {self.eval_windows}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"lm.validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if not self.text_column:
            raise ValueError("lm.text_column must be a non-empty field name")
        if self.path is not None:
            p = Path(self.path)
            if not p.is_file():
                raise ValueError(f"lm.path: file {self.path!r} does not exist")
            if p.suffix.lower() not in TEXT_SUFFIXES:
                raise ValueError(
                    f"lm.path: {self.path!r} is neither plain text nor JSON lines (expected one of "
                    f"{', '.join(TEXT_SUFFIXES)})"
                )
