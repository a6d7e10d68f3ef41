"""ServeConfig: limits and batching knobs of one server (typed, validated at construction)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    """Everything `dynprune serve` can be told, checked before any model is loaded.

    Batching: the batcher gathers queued texts until ``max_batch`` texts are
    waiting or the oldest has waited ``max_wait_ms``, then runs them in ONE
    forward (each text at its own budget). ``max_queue`` texts may wait; a
    request that does not fit gets 429. A request not answered within
    ``timeout_s`` gets 504 and its queued texts are dropped.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256
    timeout_s: float = 30.0
    max_texts: int = 64  # texts per request
    max_text_chars: int = 20_000  # characters per text (longer texts are truncated to max_length tokens)
    max_length: int = 128  # tokens per text (truncated beyond)
    pad_multiple: int = 8  # a batch is padded to a multiple of this many tokens
    max_body_bytes: int = 1_000_000
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    # --model wraps a plain model with an UNTRAINED router: budgets below 1.0 are refused (their output
    # is not meaningful) unless this is set (smoke tests of batching and per-row budgets)
    untrained_budgets: bool = False
    # requests with a mean budget ({"mean": m}) share one governor per budget (dynprune.govern): the
    # calibrated knob is corrected from what served texts spent, so the server's running mean of
    # executed FLOPs stays at m when traffic differs from the validation split it was fitted on
    govern_mean: bool = False

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            if self.host != "localhost":
                raise ValueError(f"--host must be an IP address or 'localhost', got {self.host!r}") from None
        if not (0 <= self.port <= 65535):
            raise ValueError(f"--port must be in 0..65535 (0 = any free port), got {self.port}")
        for name in ("max_batch", "max_queue", "max_texts", "max_text_chars", "max_length", "pad_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.max_length % self.pad_multiple:
            raise ValueError(
                f"--max-length ({self.max_length}) must be a multiple of --pad-multiple ({self.pad_multiple}): "
                "the tokenizer pads a batch to a multiple of it and cannot exceed the maximum length"
            )
        if self.max_body_bytes < 1024:
            raise ValueError(f"--max-body-bytes must be >= 1024, got {self.max_body_bytes}")
        if not (self.max_wait_ms >= 0 and self.max_wait_ms < 60_000):
            raise ValueError(f"--max-wait-ms must be in [0, 60000), got {self.max_wait_ms}")
        if not (self.timeout_s > 0 and self.timeout_s <= 3600):
            raise ValueError(f"--timeout-s must be in (0, 3600], got {self.timeout_s}")
        if self.max_queue < self.max_texts:
            raise ValueError(
                f"--max-queue ({self.max_queue}) must be >= --max-texts ({self.max_texts}): "
                "otherwise a full-size request could never be queued"
            )
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}")
