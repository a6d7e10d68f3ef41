"""What the serve benchmarks share: `dynprune serve` child processes on free loopback ports and
an aiohttp load generator (bursts and closed loops) that records status, body and latency."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any


class LocalServer:
    """A `dynprune serve` child process on a free loopback port. ``source``: the model options
    (``["--checkpoint", DIR]`` or ``["--model", PATH, ...]``), ``options``: the server's limits."""

    def __init__(self, source: list[str], log: Path, *options: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "dynprune.cli", "serve", *source]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", *options]
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=dict(os.environ))

    def wait_ready(self, timeout: float = 180) -> LocalServer:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); log: {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready after {timeout} s; log: {self.log}")

    def stop(self) -> int:
        """SIGTERM (the server drains), then wait; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode


def start_servers(specs: dict[str, tuple[list[str], Path, list[str]]]) -> dict[str, LocalServer]:
    """Start a server per name (``name -> (source, log, options)``); if one cannot be started, the
    ones already started are stopped before the error propagates (no orphan processes)."""
    started: dict[str, LocalServer] = {}
    try:
        for name, (source, log, options) in specs.items():
            started[name] = LocalServer(source, log, *options)
    except BaseException:
        for server in started.values():
            server.stop()
        raise
    return started


def client(url: str, timeout: float):
    """The load generator's HTTP client: aiohttp, about 0.25 ms of CPU per request here against
    httpx's 2.6-3.4 ms — the load generator shares the server's cores on one machine, so a heavy
    client takes CPU from the server it measures (results/serve/README.md)."""
    import aiohttp

    return aiohttp.ClientSession(
        base_url=url,
        timeout=aiohttp.ClientTimeout(total=timeout),
        connector=aiohttp.TCPConnector(limit=0),  # one connection per in-flight request, as a browser fleet
    )


async def post(session, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST ``body`` as JSON: ``status`` (int, or "lost:<error>"), ``body`` (JSON of a 200),
    ``retry_after`` and ``latency_s``."""
    start = time.perf_counter()
    try:
        async with session.post(path, json=body) as r:
            status, retry = r.status, r.headers.get("retry-after")
            answer = await r.json() if status == 200 else None
    except Exception as err:  # lost: connection error, client timeout
        status, answer, retry = f"lost:{type(err).__name__}", None, None
    return {"status": status, "body": answer, "retry_after": retry, "latency_s": time.perf_counter() - start}


Send = Callable[[Any, Any], Awaitable[dict[str, Any]]]  # (session, job) -> result of post() + job fields


async def burst(url: str, jobs: list[Any], send: Send, timeout: float) -> tuple[list[dict], float]:
    """Every job at once; (results in job order, wall seconds)."""
    async with client(url, timeout) as session:
        start = time.perf_counter()
        out = await asyncio.gather(*(send(session, job) for job in jobs))
        return list(out), time.perf_counter() - start


async def closed_loop(
    url: str, jobs: list[Any], send: Send, concurrency: int, timeout: float
) -> tuple[list[dict], float]:
    """``concurrency`` clients, each sending its next job when its last answer came; (results, wall s)."""
    queue = list(reversed(jobs))
    results: list[dict] = []

    async def worker(session):
        while queue:
            results.append(await send(session, queue.pop()))

    async with client(url, timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


def count(values: Iterable[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out
