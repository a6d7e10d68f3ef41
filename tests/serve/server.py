"""Start a real `dynprune serve` process on a free loopback port and wait until /health is ready."""

from __future__ import annotations

import socket
from pathlib import Path

from dynprune.serve.loadgen import LocalServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess(LocalServer):
    """A test server: one torch thread, no tokenizer threads (tests run many servers at once)."""

    def __init__(self, source: list[str], *options: str, log: Path):
        env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        super().__init__(source, log, "--threads", "1", *options, env=env)

    def wait_ready(self, timeout: float = 300.0) -> ServerProcess:
        super().wait_ready(timeout)
        return self

    def stop(self, timeout: float = 30.0) -> int:
        return super().stop(timeout)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of sample ``name{labels}`` in a Prometheus text exposition (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def sse_events(response) -> list[tuple[str, str]]:
    """(event, data) of every server-sent event in a streamed httpx response (event defaults
    to 'message'), in order."""
    events, event, data = [], "message", []
    for line in response.iter_lines():
        if line == "":
            if data:
                events.append((event, "\n".join(data)))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].strip())
    if data:
        events.append((event, "\n".join(data)))
    return events
