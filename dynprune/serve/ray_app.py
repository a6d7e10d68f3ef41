"""Replicas under Ray Serve: the same app (routes, batcher, metrics) in N replica actors behind
Ray Serve's HTTP proxy, which balances requests; each replica batches its own traffic.

Two ways to start it (needs ``pip install 'dynprune[ray]'``):

    dynprune serve --checkpoint DIR --replicas 2 [--port 8000 ...]
    serve run dynprune.serve.ray_app:build checkpoint=DIR replicas=2 max_batch=16

/metrics and /health answer per replica (whichever one the proxy picks). The proxy routes to the
first replica that is up, so /health answers before every replica is; ``dynprune serve`` prints
"ready on ... (N replicas under Ray Serve)" once all N are.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import asdict, fields
from typing import Any

from .config import ServeConfig


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError as err:
        raise SystemExit("dynprune serve --replicas needs Ray Serve: pip install 'dynprune[ray]'") from err
    return ray, serve


def deployment(cfg: ServeConfig, checkpoint: str | None, model: str | None, replicas: int, seed: int = 0):
    """A bound Ray Serve application of ``replicas`` copies of the dynprune app."""
    _, serve = _import_ray()
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // replicas)
    cfg_dict = {**asdict(cfg), "threads": threads}

    @serve.ingress()
    class DynpruneReplica:
        def __init__(self, cfg_dict: dict[str, Any], checkpoint: str | None, model: str | None, seed: int):
            import torch

            from .engine import load_engine

            self.cfg = ServeConfig(**cfg_dict)
            torch.set_num_threads(self.cfg.threads)
            self.engine = load_engine(self.cfg, checkpoint=checkpoint, model=model, seed=seed)

        def __serve_build_asgi_app__(self):
            from .app import create_app

            return create_app(self.engine, self.cfg)

    dep = serve.deployment(
        DynpruneReplica,
        name="dynprune",
        num_replicas=replicas,
        # the replica's own batcher queues and refuses (429): let requests through to it
        max_ongoing_requests=cfg.max_queue + cfg.max_batch,
        ray_actor_options={"num_cpus": 0},
        health_check_period_s=5,
    )
    return dep.bind(cfg_dict, checkpoint, model, seed)


def _parse(kind: type, name: str, value: str) -> Any:
    if kind is not bool:
        return kind(value)
    if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value.lower() in ("true", "1")


def build(args: dict[str, str]):
    """Application builder for ``serve run dynprune.serve.ray_app:build checkpoint=DIR replicas=N ...``
    (any ServeConfig field as key=value; host/port come from Ray Serve's own HTTP options)."""
    args = dict(args)
    checkpoint, model = args.pop("checkpoint", None), args.pop("model", None)
    replicas, seed = int(args.pop("replicas", 1)), int(args.pop("seed", 0))
    types = {f.name: type(getattr(ServeConfig(), f.name)) for f in fields(ServeConfig)}
    unknown = sorted(set(args) - set(types))
    if unknown:
        raise ValueError(
            f"unknown arguments {unknown}; known: checkpoint, model, replicas, seed, {sorted(types)}"
        )
    cfg = ServeConfig(**{k: _parse(types[k], k, v) for k, v in args.items()})
    return deployment(cfg, checkpoint, model, replicas, seed)


def serve_replicas(
    cfg: ServeConfig, checkpoint: str | None, model: str | None, replicas: int, seed: int
) -> int:
    """`dynprune serve --replicas N`: a local Ray instance, N replicas, until SIGTERM/SIGINT."""
    ray, serve = _import_ray()
    ray.init(
        address="local",
        include_dashboard=False,
        _node_ip_address="127.0.0.1" if cfg.host in ("127.0.0.1", "localhost") else None,
        log_to_driver=True,
        configure_logging=False,
    )
    # our handlers replace the ones ray.init installs, before the app starts: the proxy may answer
    # before serve.run returns, and a SIGTERM then must still end in a graceful shutdown (exit 0)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port}, detached=False)
        try:
            serve.run(deployment(cfg, checkpoint, model, replicas, seed), name="dynprune", route_prefix="/")
        except Exception as err:  # a replica failed to start (bad checkpoint, ...): say why
            print(f"dynprune serve: error: replicas did not start: {err}", file=sys.stderr)
            return 1
        print(
            f"dynprune serve: ready on http://{cfg.host}:{cfg.port} ({replicas} replicas under Ray Serve)",
            file=sys.stderr,
            flush=True,
        )
        stop.wait()
        serve.shutdown()  # replicas finish their in-flight requests (graceful_shutdown_timeout_s)
        print("dynprune serve: stopped", file=sys.stderr, flush=True)
        return 0
    finally:
        ray.shutdown()
