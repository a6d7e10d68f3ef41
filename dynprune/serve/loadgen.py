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

SERVERS = ("batching on", "batching off", "overload")  # what run_phases drives


class LocalServer:
    """A `dynprune serve` child process on a free loopback port. ``source``: the model options
    (``["--checkpoint", DIR]`` or ``["--model", PATH, ...]``), ``options``: the server's limits,
    ``env``: variables set for it on top of this process's environment."""

    def __init__(self, source: list[str], log: Path, *options: str, env: dict[str, str] | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "dynprune.cli", "serve", *source]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", *options]
        self.log_path = log
        self._out = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            cmd, stdout=self._out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def log(self) -> str:
        """The server's output so far."""
        if not self._out.closed:
            self._out.flush()
        return self.log_path.read_text(errors="replace")

    def _exited(self) -> RuntimeError:
        return RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")

    def wait_ready(self, timeout: float = 180) -> LocalServer:
        """Wait until /health answers 200; stop the server and raise if it exits or times out."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._exited()
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def wait_for_log(self, text: str, timeout: float = 120.0) -> LocalServer:
        """Wait until the server's output contains ``text`` (e.g. its "ready on" line)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return self
            if self.proc.poll() is not None:
                raise self._exited()
            time.sleep(0.2)
        raise RuntimeError(f"{text!r} not in the server's output after {timeout} s:\n{self.log()}")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the server drains), then wait; its exit code."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode


def deadline(seconds: float, prog: str) -> Callable[[], float]:
    """A ``left()``: the seconds left of a run bounded to ``seconds``; past it, SystemExit."""
    start = time.monotonic()

    def left() -> float:
        remaining = seconds - (time.monotonic() - start)
        if remaining <= 0:
            raise SystemExit(f"{prog}: --deadline-s {seconds} reached")
        return remaining

    return left


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


def bench_servers(
    source: list[str], logs: Path, common: list[str], max_batch: int, max_wait_ms: float, queue: int
) -> dict[str, LocalServer]:
    """The ``SERVERS`` of a serve benchmark: batching on (``max_batch``, ``max_wait_ms``, a queue of
    ``queue``), batching off (batches of 1, same queue), overload (a queue of 2 batches)."""
    batching = ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
    return start_servers(
        {
            "batching on": (source, logs / "on.log", [*common, *batching, "--max-queue", str(queue)]),
            "batching off": (
                source,
                logs / "off.log",
                [*common, "--max-batch", "1", "--max-wait-ms", "0", "--max-queue", str(queue)],
            ),
            "overload": (
                source,
                logs / "overload.log",
                [*common, *batching, "--max-queue", str(2 * max_batch)],
            ),
        }
    )


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


def run_phases(
    servers: dict[str, LocalServer],
    texts: list[str],
    send: Send,
    variants: dict[str, tuple[float, ...]],
    mixed: tuple[float, ...],
    args: Any,
    timeout: Callable[[], float],
    row: Callable[[list[dict], float], dict[str, Any]],
    ready_s: float = 300,
) -> tuple[dict[str, Any], list[dict]]:
    """The three phases of a serve benchmark on the ``SERVERS``: a burst of ``args.burst``
    concurrent jobs at the ``mixed`` budgets (batching on); closed loops of ``args.requests`` jobs
    from ``args.concurrency`` clients for every (server, variant) of batching on/off × ``variants``
    in ``args.rounds`` interleaved rounds (``row(results, wall_s)``: a round's numbers); a burst of
    ``args.overload`` at the small-queue server, once every server is ready (at most ``ready_s``
    seconds, fewer if ``timeout()`` says so). ``timeout()``: seconds a phase may take now.
    The servers are stopped at the end, also on error. Returns the report's ``burst`` /
    ``closed_loop`` / ``overload`` / ``exit_codes`` parts and every result to check (the overload's
    200s only)."""
    import sys

    from tqdm import tqdm

    exit_codes: dict[str, int] = {}
    try:
        for server in servers.values():
            server.wait_ready(timeout=min(ready_s, timeout()))

        def at_mixed(n: int) -> list[tuple[str, float]]:
            return [(t, mixed[i % len(mixed)]) for i, t in enumerate(texts[:n])]

        res, wall = asyncio.run(burst(servers["batching on"].url, at_mixed(args.burst), send, timeout()))
        everything = list(res)
        parts: dict[str, Any] = {
            "burst": {
                "requests": len(res),
                "ok": sum(r["status"] == 200 for r in res),
                "statuses": count(r["status"] for r in res),
                "wall_s": wall,
                "max_batch_seen": max((r["body"]["batch_size"] for r in res if r["body"]), default=0),
            }
        }
        rows: list[dict[str, Any]] = []
        plan = [(s, v) for s in SERVERS[:2] for v in variants]
        bar = tqdm(total=args.rounds * len(plan), desc="closed loop", file=sys.stderr, mininterval=5)
        for rnd in range(args.rounds):
            for server, variant in plan if rnd % 2 == 0 else list(reversed(plan)):
                budgets = variants[variant]
                jobs = [(t, budgets[i % len(budgets)]) for i, t in enumerate(texts[: args.requests])]
                url = servers[server].url
                res, wall = asyncio.run(closed_loop(url, jobs, send, args.concurrency, timeout()))
                everything += res
                rows.append({"round": rnd, "server": server, "variant": variant, **row(res, wall)})
                bar.update()
        bar.close()
        parts["closed_loop"] = rows
        res, wall = asyncio.run(burst(servers["overload"].url, at_mixed(args.overload), send, timeout()))
        everything += [r for r in res if r["status"] == 200]
        parts["overload"] = {
            "requests": len(res),
            "queue": 2 * args.max_batch,
            "statuses": count(r["status"] for r in res),
            "wall_s": wall,
            "all_429_have_retry_after": all(r["retry_after"] for r in res if r["status"] == 429),
        }
    finally:  # SIGTERM: each server drains and exits
        exit_codes.update({name: server.stop() for name, server in servers.items()})
    parts["exit_codes"] = exit_codes
    return parts, everything
