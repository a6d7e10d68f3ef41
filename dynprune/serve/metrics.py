"""Prometheus metrics of one server (its own registry: two apps in one process never mix)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from dynprune.governor import MeanGovernor

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
# why a request got no answer from the model
REJECTION_REASONS = (
    "invalid",
    "too_large",
    "queue_full",
    "timeout",
    "draining",
    "unsupported",
    "error",
    "not_ready",
)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "dynprune_request_latency_seconds",
            "Request latency from arrival to response, by endpoint and status code",
            ["endpoint", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "dynprune_batch_size", "Texts per model forward", buckets=BATCH_BUCKETS, registry=r
        )
        self.forward_seconds = Histogram(
            "dynprune_forward_seconds", "Time of one batched forward", buckets=LATENCY_BUCKETS, registry=r
        )
        self.flops_ratio = Histogram(
            "dynprune_flops_ratio", "Executed FLOPs / dense FLOPs per text", buckets=RATIO_BUCKETS, registry=r
        )
        self.rejections = Counter(
            "dynprune_rejections",
            "Requests answered without a model result, by reason",
            ["reason"],
            registry=r,
        )
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)
        self.dropped = Counter(
            "dynprune_dropped_texts", "Queued texts dropped because their request gave up", registry=r
        )
        self.generated_tokens = Counter(
            "dynprune_generated_tokens", "Tokens generated (/v1/generate, /v1/completions)", registry=r
        )
        self.queue_depth = Gauge("dynprune_queue_depth", "Texts waiting for a forward", registry=r)
        self.queue_depth.set_function(queue_depth)
        self.governed_spent = Gauge(
            "dynprune_governed_mean_flops_ratio",
            "Mean executed FLOPs ratio of the texts a governed mean budget served (--govern-mean)",
            ["budget"],
            registry=r,
        )
        self.governed_knob = Gauge(
            "dynprune_governed_knob",
            "The governed policy's knob now (threshold or confidence), by mean budget (--govern-mean)",
            ["budget"],
            registry=r,
        )

    def watch_governor(self, spec: str, governor: MeanGovernor) -> None:
        """Expose a governed mean budget's running mean and knob (read at each scrape)."""
        self.governed_spent.labels(spec).set_function(
            lambda: float("nan") if governor.mean_spent is None else governor.mean_spent
        )
        self.governed_knob.labels(spec).set_function(lambda: governor.knob)

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.forward_seconds.observe(seconds)

    def reject(self, reason: str) -> None:
        if reason not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        self.rejections.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
